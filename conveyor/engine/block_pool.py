"""The KV blocks themselves: reference counts, the free queue (least recently used first) and the prefix
cache index.

A block is in one of three states:
- owned: in one or more requests' block tables (`ref_count > 0`; more than one when a cached prefix is
  shared);
- cached: owned by nobody but still holding a full block of a known prefix, findable by its hash and
  evictable: it waits in the free queue and is reused (its hash dropped) when nothing older is left;
- free: owned by nobody and holding nothing worth finding.
Cached and free blocks both sit in the free queue: allocation takes its head, frees join its tail, and a
cache hit pulls a block out of the middle. So free + cached + owned = total, always.

A cache hit never trusts a hash alone. Each cached block records its own token ids and its parent block
(by id and by generation, a counter bumped each time the block is allocated anew); a lookup walks a
prefix from its first block and accepts a block only if its tokens are the request's and its parent is
the block accepted one level up, unchanged since. A hash collision can only cause a miss.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class CachedBlockKey:
    """What a cached block holds: its tokens and the exact parent block it continues."""

    token_ids: tuple[int, ...]
    parent: tuple[int, int] | None  # (block id, generation) of the previous block; None for the first


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_total_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # head = reused first
        self.ref_counts = [0] * num_blocks
        self.generations = [0] * num_blocks
        self._hashes: list[int | None] = [None] * num_blocks
        self._keys: list[CachedBlockKey | None] = [None] * num_blocks
        self._cached: dict[int, int] = {}  # block hash -> block id
        self.num_cached_blocks = 0  # cached blocks that nobody owns (evictable)

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: free ones and evictable cached ones."""
        return len(self._free)

    def free_block_ids(self) -> list[int]:
        return list(self._free)

    def allocate(self, count: int) -> list[int] | None:
        """`count` fresh blocks (evicting cached ones, oldest first), or None (taking nothing) when fewer
        are free."""
        if count < 0:
            raise ValueError(f"cannot allocate {count} blocks")
        if count > len(self._free):
            return None
        blocks = []
        for _ in range(count):
            block, _ = self._free.popitem(last=False)
            if self._hashes[block] is not None:
                self.num_cached_blocks -= 1
                self._forget(block)
            self.ref_counts[block] = 1
            self.generations[block] += 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[int]) -> None:
        """Take a reference to cached blocks (a prefix hit); evictable ones leave the free queue."""
        for block in blocks:
            if self.ref_counts[block] == 0:
                del self._free[block]
                self.num_cached_blocks -= 1
            self.ref_counts[block] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block; a block nobody owns joins the tail of the free queue."""
        for block in blocks:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free[block] = None
                if self._hashes[block] is not None:
                    self.num_cached_blocks += 1

    def cache(self, block: int, block_hash: int, key: CachedBlockKey) -> None:
        """Make an owned, full block findable. A hash already taken keeps its block (this one is a
        duplicate and stays unfindable)."""
        if block_hash in self._cached or self._hashes[block] is not None:
            return
        self._hashes[block], self._keys[block] = block_hash, key
        self._cached[block_hash] = block

    def lookup(self, block_hash: int, key: CachedBlockKey) -> int | None:
        """The cached block holding exactly `key`, or None."""
        block = self._cached.get(block_hash)
        if block is None or self._keys[block] != key:
            return None
        return block

    def cached_hashes(self) -> list[int]:
        """The hashes of every findable block, owned or evictable (what a prefix-aware router matches)."""
        return list(self._cached)

    def key_of(self, block: int) -> tuple[int, int]:
        """How a child block names this one as its parent."""
        return block, self.generations[block]

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (blocks stay where they are); returns how many blocks were findable."""
        forgotten = len(self._cached)
        for block in list(self._cached.values()):
            self._forget(block)
        self.num_cached_blocks = 0
        return forgotten

    def _forget(self, block: int) -> None:
        block_hash = self._hashes[block]
        if block_hash is not None and self._cached.get(block_hash) == block:
            del self._cached[block_hash]
        self._hashes[block] = self._keys[block] = None
