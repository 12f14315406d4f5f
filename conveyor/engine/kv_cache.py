"""The paged KV cache's bookkeeping: a pool of fixed-size blocks and each request's block table.

The K/V tensors live in the model runner; this module only decides which block ids each request owns.
Token i of a request lives in slot `block_table[i // block_size] * block_size + i % block_size`, so a
request's context need not be contiguous and it takes memory one block at a time, as it grows.

Every block is either free (in the pool) or owned by exactly one request. Prefix caching will add a third
state, "cached": a freed block that still holds a known prefix and can be handed to a request sharing it.
The free queue is already ordered for that: freed blocks join its tail and allocation takes from its head,
so the least recently freed block is reused first, which is the LRU eviction order a prefix cache wants.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from conveyor.engine.request import Request


class BlockPool:
    """The free block ids, as a FIFO queue: freed blocks are reused last (see the module docstring)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_total_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def free_block_ids(self) -> list[int]:
        return list(self._free)

    def allocate(self, count: int) -> list[int] | None:
        """`count` block ids, or None (taking nothing) when fewer are free."""
        if count < 0:
            raise ValueError(f"cannot allocate {count} blocks")
        if count > len(self._free):
            return None
        return [self._free.popleft() for _ in range(count)]

    def free(self, block_ids: Iterable[int]) -> None:
        self._free.extend(block_ids)


class KVCacheManager:
    """Per-request block tables over one `BlockPool`. Allocation is all or nothing."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._block_tables: dict[str, list[int]] = {}

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_total_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_total_blocks - self.pool.num_free_blocks

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

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grow the request's table to cover its computed tokens plus `num_new_tokens`; all or nothing.

        Returns False, changing nothing, when the pool cannot supply the blocks.
        """
        needed = self.num_blocks_needed(request, num_new_tokens)
        if needed == 0:
            return True
        new_blocks = self.pool.allocate(needed)
        if new_blocks is None:
            return False
        self._block_tables.setdefault(request.request_id, []).extend(new_blocks)
        return True

    def free(self, request: Request) -> None:
        """Return all the request's blocks to the pool at once. Idempotent."""
        # NOTE: reversed, as vLLM does: a sequence's last blocks are the least likely to be shared by a
        # later prompt, so once prefix caching exists they should be the first to be reused.
        self.pool.free(reversed(self._block_tables.pop(request.request_id, [])))

    def check_invariants(self) -> None:
        """Raise AssertionError unless every block is either free or owned by exactly one request."""
        owned = [block for table in self._block_tables.values() for block in table]
        free = self.pool.free_block_ids()
        if sorted(owned + free) != list(range(self.num_total_blocks)):
            raise AssertionError(
                f"KV blocks corrupted: {len(owned)} owned ({len(set(owned))} distinct) + {len(free)} free "
                f"({len(set(free))} distinct), {len(set(owned) & set(free))} both owned and free; "
                f"the pool has {self.num_total_blocks}")
