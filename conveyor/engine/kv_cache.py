"""The paged KV cache's bookkeeping: each request's block table over one `BlockPool`, and the prefix cache.

The K/V tensors live in the model runner; this module only decides which block ids each request owns.
Token i of a request lives in slot `block_table[i // block_size] * block_size + i % block_size`, so a
request's context need not be contiguous and it takes memory one block at a time, as it grows.

Prefix caching (on unless disabled): once a block of a request is full of computed tokens it is
registered under a hash of (its parent block's hash, its token ids), so a later request whose tokens
start the same way (a shared system prompt, the previous turns of a conversation, its own tokens after a
preemption) takes those blocks instead of recomputing them. Their K/V depend only on the tokens before
and in them, so the hit is exact. A hit is always block-aligned and at most `num_tokens - 1` tokens long:
at least one token is computed, so the request samples.
"""

from __future__ import annotations

from conveyor.engine.block_pool import BlockPool, CachedBlockKey
from conveyor.engine.request import Request

_ROOT_HASH = 0x636F6E766579  # the parent hash of every request's first block


def hash_block(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    """A block's prefix-cache hash. Python's hash of ints and tuples is the same in every process."""
    return hash((parent_hash, token_ids))


def prefix_block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """The hashes the prefix cache files a prompt's full blocks under: what a router outside the engine
    matches against the hashes an engine reports (`BlockPool.cached_hashes`)."""
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        hashes.append(hash_block(hashes[-1] if hashes else _ROOT_HASH, tuple(token_ids[start:start + block_size])))
    return hashes


class KVCacheManager:
    """Per-request block tables over one `BlockPool`. Allocation is all or nothing."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._block_tables: dict[str, list[int]] = {}
        self._num_registered: dict[str, int] = {}  # leading blocks of each table already findable
        self._block_hashes: dict[str, list[int]] = {}  # each request's full blocks' hashes, grown lazily

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_total_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take (evictable cached ones included)."""
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        """Blocks owned by at least one request."""
        return self.pool.num_total_blocks - self.pool.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks owned by nobody that still hold a findable prefix."""
        return self.pool.num_cached_blocks

    def num_blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_block_ids(self, request_id: str, first: int = 0) -> list[int]:
        """A copy of the request's block table from entry `first` on (empty if it owns nothing)."""
        return self._block_tables.get(request_id, [])[first:]

    def num_blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        """Blocks the request still lacks to hold its computed tokens plus `num_new_tokens` more."""
        num_owned = len(self._block_tables.get(request.request_id, ()))
        return max(0, self.num_blocks_for_tokens(request.num_computed_tokens + num_new_tokens) - num_owned)

    def num_allocatable_tokens(self, request: Request) -> int:
        """New tokens the request could hold right now: its table's spare slots plus every free block."""
        num_owned = len(self._block_tables.get(request.request_id, ()))
        return (num_owned + self.pool.num_free_blocks) * self.block_size - request.num_computed_tokens

    # ---- prefix cache ------------------------------------------------------------------------------

    def block_hashes(self, request: Request, num_blocks: int) -> list[int]:
        """Hashes of the request's first `num_blocks` blocks (all of them full of known tokens)."""
        hashes = self._block_hashes.setdefault(request.request_id, [])
        tokens, size = request.all_token_ids, self.block_size
        while len(hashes) < num_blocks:
            index = len(hashes)
            parent = hashes[-1] if hashes else _ROOT_HASH
            hashes.append(hash_block(parent, tuple(tokens[index * size:(index + 1) * size])))
        return hashes[:num_blocks]

    def find_cached_prefix(self, request: Request) -> list[int]:
        """The cached blocks holding the longest prefix of the request's tokens (at most num_tokens - 1).
        None for a request that wants prompt logprobs: they come from computing every prompt position."""
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks: list[int] = []
        for index, block_hash in enumerate(self.block_hashes(request, max_blocks)):
            block = self.pool.lookup(block_hash, self._key(request, index, blocks[-1] if blocks else None))
            if block is None:
                break
            blocks.append(block)
        return blocks

    def register_full_blocks(self, request: Request) -> None:
        """Make the request's blocks that are now full of computed tokens findable (after a step)."""
        if not self.enable_prefix_caching:
            return
        table = self._block_tables.get(request.request_id, [])
        num_full = min(request.num_computed_tokens // self.block_size, len(table))
        first = self._num_registered.get(request.request_id, 0)
        if num_full <= first:
            return
        hashes = self.block_hashes(request, num_full)
        for index in range(first, num_full):
            parent = table[index - 1] if index else None
            self.pool.cache(table[index], hashes[index], self._key(request, index, parent))
        self._num_registered[request.request_id] = num_full

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix; returns how many blocks were findable. Running requests go on."""
        return self.pool.reset_prefix_cache()

    def _key(self, request: Request, index: int, parent_block: int | None) -> CachedBlockKey:
        size = self.block_size
        tokens = tuple(request.all_token_ids[index * size:(index + 1) * size])
        return CachedBlockKey(tokens, None if parent_block is None else self.pool.key_of(parent_block))

    # ---- allocation ----------------------------------------------------------------------------

    def allocate_slots(self, request: Request, num_new_tokens: int, cached_blocks: list[int] | None = None) -> bool:
        """Grow the request's table to cover its computed tokens, the `cached_blocks` it takes as its
        prefix (from `find_cached_prefix`, only while it owns nothing) and `num_new_tokens` more.

        All or nothing: returns False, changing nothing, when the pool cannot supply the blocks.
        """
        cached_blocks = cached_blocks or []
        num_owned = len(self._block_tables.get(request.request_id, ()))
        if cached_blocks and num_owned:
            raise ValueError(f"request {request.request_id!r} already owns blocks; a cached prefix comes first")
        num_tokens = request.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens
        needed = max(0, self.num_blocks_for_tokens(num_tokens) - num_owned - len(cached_blocks))
        # NOTE: a cached block nobody owns sits in the free queue; taking it leaves one fewer to allocate.
        evictable_taken = sum(1 for block in cached_blocks if self.pool.ref_counts[block] == 0)
        if needed > self.pool.num_free_blocks - evictable_taken:
            return False
        if cached_blocks:
            self.pool.touch(cached_blocks)
            self._num_registered[request.request_id] = len(cached_blocks)
        new_blocks = self.pool.allocate(needed)
        assert new_blocks is not None
        if cached_blocks or new_blocks:
            self._block_tables.setdefault(request.request_id, []).extend(cached_blocks + new_blocks)
        return True

    def free(self, request: Request) -> None:
        """Drop all the request's blocks at once (cached ones stay findable until evicted). Idempotent."""
        # NOTE: reversed, as vLLM does: a sequence's last blocks are the least likely to be shared by a
        # later prompt, so they join the free queue first and are evicted first.
        self.pool.free(reversed(self._block_tables.pop(request.request_id, [])))
        self._num_registered.pop(request.request_id, None)

    def forget(self, request: Request) -> None:
        """Drop what the manager remembers of a finished request (its hashes); frees nothing."""
        self._block_hashes.pop(request.request_id, None)

    def check_invariants(self) -> None:
        """Raise AssertionError unless every block is free (or cached) with no owner, or owned by exactly
        as many tables as its reference count says."""
        counts = [0] * self.num_total_blocks
        for table in self._block_tables.values():
            for block in table:
                counts[block] += 1
        free = self.pool.free_block_ids()
        problems = []
        if len(set(free)) != len(free):
            problems.append("a block is in the free queue twice")
        if any(counts[block] for block in free):
            problems.append(f"{sum(1 for b in free if counts[b])} blocks both free and owned")
        if counts != self.pool.ref_counts:
            problems.append("reference counts differ from the block tables")
        if sum(1 for c in counts if c) + len(free) != self.num_total_blocks:
            problems.append("a block is neither free nor owned")
        if problems:
            raise AssertionError(f"KV blocks corrupted: {'; '.join(problems)} ({len(free)} free, "
                                 f"{sum(1 for c in counts if c)} owned, the pool has {self.num_total_blocks})")
