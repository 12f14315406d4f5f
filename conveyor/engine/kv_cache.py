"""The paged KV cache's bookkeeping: a pool of fixed-size blocks and each request's block table.

The tensors live in the model runner; this module only decides which block ids a request owns. Token i
of a request lives in slot `block_table[i // block_size] * block_size + i % block_size`.
"""

from __future__ import annotations

import heapq

from conveyor.engine.request import Request


class BlockPool:
    """Free block ids, handed out lowest first so the blocks in use stay packed at the pool's start."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_total_blocks = num_blocks
        self._free = list(range(num_blocks))  # a heap (already sorted)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise MemoryError(f"asked for {count} KV blocks, {len(self._free)} free")
        return [heapq.heappop(self._free) for _ in range(count)]

    def free(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            heapq.heappush(self._free, block_id)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_total_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_total_blocks - self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.pool.num_total_blocks

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_block_ids(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grow the request's table to cover its computed tokens plus `num_new_tokens`; all or nothing."""
        table = self._tables.setdefault(request.request_id, [])
        needed = self.blocks_for_tokens(request.num_computed_tokens + num_new_tokens) - len(table)
        if needed <= 0:
            return True
        if needed > self.pool.num_free_blocks:
            return False
        table.extend(self.pool.allocate(needed))
        return True

    def free(self, request: Request) -> None:
        """Return all the request's blocks to the pool at once (idempotent)."""
        self.pool.free(self._tables.pop(request.request_id, []))

    def check_invariants(self) -> None:
        owned = [b for table in self._tables.values() for b in table]
        assert len(owned) == len(set(owned)), "a block is owned twice"
        assert len(owned) + self.pool.num_free_blocks == self.pool.num_total_blocks, (
            f"blocks leaked: {len(owned)} owned + {self.pool.num_free_blocks} free != {self.pool.num_total_blocks}")
        assert not set(owned) & set(self.pool._free), "a block is both owned and free"
