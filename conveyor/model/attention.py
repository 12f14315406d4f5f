"""Attention over the paged KV cache, and the per-step metadata that keeps requests apart.

This module is the one contract between the engine and the model about attention: the engine describes
each request's share of the flat batch as a `SequenceSpan` (plain ints and block ids), and
`build_attention_metadata` turns the spans into tensors that every layer of a kind (full context or
sliding window) shares. It imports nothing from the engine.

Decode rows get a gather table of their blocks and a mask, grouped by context length so a short row is
not padded up to the step's longest (the C++ decode kernel takes them all in one group: it reads each row's
own bounds); prefill chunks get the cache slots of their keys and a causal
(windowed) mask for the torch path, and their block table and first position for the C++ kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# A decode attention kernel reading the paged cache in place (conveyor.model.paged_decode):
# (q [D, Hq, Dh], k_cache, v_cache, DecodeGroup.blocks, DecodeGroup.key_bounds, scale) -> [D, Hq, Dh].
DecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]
# A prefill attention kernel reading the paged cache in place (conveyor.model.paged_prefill):
# (q [Tq, Hq, Dh], k_cache, v_cache, PrefillChunk.block_table, PrefillChunk.start, window or 0, scale) -> [Tq, Hq, Dh].
PrefillKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int, float], torch.Tensor]


@dataclass(frozen=True)
class SequenceSpan:
    """One request in a step: flat rows from `query_start` hold its positions `start..end-1`."""

    query_start: int
    start: int
    end: int
    block_ids: list[int]  # the request's block table, covering at least `end` tokens

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass
class PrefillChunk:
    """One request's multi-token chunk: queries [query_start, query_end) of the flat batch."""

    query_start: int
    query_end: int
    key_slots: torch.Tensor  # [L] cache slots of the keys it may see (prefix + the chunk itself)
    mask: torch.Tensor  # [Tq, L] bool, True where the query may attend
    block_table: torch.Tensor  # [n] the request's block ids (int64), for the kernel reading the cache in place
    start: int  # position of the chunk's first query


@dataclass
class DecodeGroup:
    """Single-token rows of similar context length, attended in one batched call."""

    token_indices: torch.Tensor  # [D] rows of the flat batch, ascending
    blocks: torch.Tensor  # [D, num_gathered_blocks] block ids per row (0 = padding)
    key_bounds: torch.Tensor  # [D, 2] each row's visible keys [first, end), counted from its first block's slot 0
    block_size: int
    rows: slice | None = None  # the same rows as a slice when they are consecutive (a view, not a gather)

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """[D, 1, 1, num_gathered_blocks * block_size] bool, True on each row's visible keys: what the torch
        path's SDPA needs (the C++ kernel reads `key_bounds`), built once per step on first use."""
        slots = torch.arange(self.blocks.shape[1] * self.block_size, device=self.blocks.device)[None, :]
        visible = (slots >= self.key_bounds[:, :1]) & (slots < self.key_bounds[:, 1:])
        return visible[:, None, None, :]


@dataclass
class WindowView:
    """Attention inputs for one kind of layer (full context, or a sliding window)."""

    prefills: list[PrefillChunk]
    decode_groups: list[DecodeGroup]
    # What `one_decode_group` needs: the decode rows' spans and how the groups were built.
    decode_spans: list[SequenceSpan] = field(default_factory=list)
    block_size: int = 1
    window: int | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @functools.cached_property
    def one_decode_group(self) -> DecodeGroup | None:
        """Every decode row in one group, for the C++ kernel: it reads each row's own key bounds, so the
        padding that grouping by length saves the torch path costs it nothing, while each extra group is a
        call of its own, with its rows gathered and scattered and fewer rows to spread over the threads."""
        if len(self.decode_groups) <= 1:
            return self.decode_groups[0] if self.decode_groups else None
        return _decode_group(self.decode_spans, self.block_size, self.window, self.device)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new K/V goes in the flattened cache
    num_decodes: int
    full: WindowView
    sliding: WindowView  # the same object as `full` when the model has no sliding window


def slot_mapping(block_ids: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Physical cache slots of tokens `start..end-1` of a request whose block table is `block_ids`."""
    return [block_ids[i // block_size] * block_size + i % block_size for i in range(start, end)]


def build_attention_metadata(spans: list[SequenceSpan], block_size: int, sliding_window: int | None,
                             device: torch.device) -> AttentionMetadata:
    slots: list[int] = []
    for span in spans:
        slots += slot_mapping(span.block_ids, span.start, span.end, block_size)
    decodes = [span for span in spans if span.num_tokens == 1]
    prefills = [span for span in spans if span.num_tokens > 1]

    def view(window: int | None) -> WindowView:
        groups = [_decode_group(group, block_size, window, device)
                  for group in _group_by_length(decodes, block_size, window)]
        chunks = [_prefill_chunk(span, block_size, window, device) for span in prefills]
        return WindowView(chunks, groups, decodes, block_size, window, device)

    full = view(None)
    # A window no span reaches past sees every key the full view sees: share its tensors.
    window_needed = sliding_window is not None and max((span.end for span in spans), default=0) > sliding_window
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        num_decodes=len(decodes),
        full=full,
        sliding=view(sliding_window) if window_needed else full,
    )


def _first_visible_key(query_position: int, window: int | None) -> int:
    # A query at position p sees keys k with k <= p and, on sliding layers, k > p - window.
    return 0 if window is None else max(0, query_position - window + 1)


def _num_visible_blocks(length: int, block_size: int, window: int | None) -> int:
    return -(-length // block_size) - _first_visible_key(length - 1, window) // block_size


def _group_by_length(decodes: list[SequenceSpan], block_size: int, window: int | None,
                     slack: float = 1.3) -> list[list[SequenceSpan]]:
    """Longest first; a row joins the current group while the group's longest is within `slack` of it."""
    ordered = sorted(decodes, key=lambda span: -_num_visible_blocks(span.end, block_size, window))
    groups: list[list[SequenceSpan]] = []
    for span in ordered:
        blocks = _num_visible_blocks(span.end, block_size, window)
        if not groups or _num_visible_blocks(groups[-1][0].end, block_size, window) > slack * blocks + 1:
            groups.append([])
        groups[-1].append(span)
    return groups


def _decode_group(spans: list[SequenceSpan], block_size: int, window: int | None,
                  device: torch.device) -> DecodeGroup:
    """Per row: the blocks holding its visible keys, padded to the group's longest, and its key bounds.
    Built as one list of ints and one tensor (three views): a decode step's metadata is dispatch-bound."""
    spans = sorted(spans, key=lambda span: span.query_start)
    num_gathered = max(_num_visible_blocks(span.end, block_size, window) for span in spans)
    rows: list[int] = []
    bounds: list[int] = []
    table: list[int] = []
    for span in spans:
        first_key = _first_visible_key(span.end - 1, window)
        first_block = first_key // block_size
        used = span.block_ids[first_block:first_block + num_gathered]
        rows.append(span.query_start)
        bounds += (first_key - first_block * block_size, span.end - first_block * block_size)
        table += used
        table += [0] * (num_gathered - len(used))
    count = len(spans)
    packed = torch.tensor(rows + bounds + table, dtype=torch.long, device=device)
    consecutive = rows[-1] - rows[0] == count - 1
    return DecodeGroup(packed[:count], packed[3 * count:].view(count, num_gathered),
                       packed[count:3 * count].view(count, 2), block_size,
                       slice(rows[0], rows[0] + count) if consecutive else None)


def _prefill_chunk(span: SequenceSpan, block_size: int, window: int | None, device: torch.device) -> PrefillChunk:
    first_key = _first_visible_key(span.start, window)
    key_positions = torch.arange(first_key, span.end)
    block_table = torch.tensor(span.block_ids, dtype=torch.long)
    key_slots = block_table[key_positions // block_size] * block_size + key_positions % block_size
    query_positions = torch.arange(span.start, span.end)
    mask = key_positions[None, :] <= query_positions[:, None]
    if window is not None:
        mask &= key_positions[None, :] > query_positions[:, None] - window
    return PrefillChunk(span.query_start, span.query_start + span.num_tokens, key_slots.to(device), mask.to(device),
                        block_table.to(device), span.start)


class PagedAttention(nn.Module):
    """Attention over the paged KV cache, one request's queries against that request's keys only.

    The step's new K/V are written into the cache at `slot_mapping` first; then
    - single-token decode rows attend in batched calls, one per group of similar lengths: each row
      gathers its own blocks (the whole context, or only the sliding window), and a per-row mask hides
      the slots outside it;
    - each prefill chunk attends alone, its queries against its cached prefix plus the chunk itself,
      causally (and within the window on sliding layers).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        # The C++ kernels reading the blocks in place (conveyor.model.paged_decode, .paged_prefill), or None
        # for torch's path.
        self.decode_kernel: DecodeKernel | None = None
        self.prefill_kernel: PrefillKernel | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hk, D]; caches: [num_blocks, block_size, Hk, D]. Returns [T, Hq*D]."""
        k_flat = k_cache.view(-1, self.num_kv_heads, self.head_dim)
        v_flat = v_cache.view(-1, self.num_kv_heads, self.head_dim)
        k_flat.index_copy_(0, meta.slot_mapping, k)
        v_flat.index_copy_(0, meta.slot_mapping, v)

        view = meta.sliding if self.sliding_window is not None else meta.full
        out = torch.empty_like(q)
        groups = view.decode_groups
        if self.decode_kernel is not None and len(groups) > 1:
            groups = [view.one_decode_group]  # type: ignore[list-item]  # not None: there are decode rows
        for group in groups:
            rows = group.rows if group.rows is not None else group.token_indices
            out[rows] = self._decode(q[rows], k_cache, v_cache, group)
        for chunk in view.prefills:
            rows = slice(chunk.query_start, chunk.query_end)
            if self.prefill_kernel is not None:
                out[rows] = self.prefill_kernel(q[rows].contiguous(), k_cache, v_cache, chunk.block_table,
                                                chunk.start, self.sliding_window or 0, self.scale)
                continue
            keys, values = k_flat.index_select(0, chunk.key_slots), v_flat.index_select(0, chunk.key_slots)
            out[rows] = self._prefill(q[rows], keys, values, chunk.mask)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup) -> torch.Tensor:
        if self.decode_kernel is not None:
            return self.decode_kernel(q.contiguous(), k_cache, v_cache, group.blocks, group.key_bounds, self.scale)
        num_decodes = q.shape[0]
        # NOTE: index_select, not advanced indexing: on CPU it is an order of magnitude faster here.
        blocks = group.blocks.flatten()
        keys = k_cache.index_select(0, blocks).view(num_decodes, -1, self.num_kv_heads, self.head_dim)
        values = v_cache.index_select(0, blocks).view(num_decodes, -1, self.num_kv_heads, self.head_dim)
        # A decode row has one query per head, so the query heads that share a KV head can stand as that
        # head's query positions ([B, Hk, Hq / Hk, D], no causal mask among them): SDPA then reads each
        # K/V head once instead of expanding it per query head (enable_gqa).
        queries = q.view(num_decodes, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        out = F.scaled_dot_product_attention(queries, keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=group.mask, scale=self.scale)
        return out.reshape(num_decodes, self.num_heads, self.head_dim)

    def _prefill(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),  # [1, Hq, Tq, D]
            keys.transpose(0, 1).unsqueeze(0), values.transpose(0, 1).unsqueeze(0),
            attn_mask=mask, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.squeeze(0).transpose(0, 1)


