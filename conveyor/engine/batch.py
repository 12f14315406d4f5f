"""SchedulerOutput -> the flat tensors one forward pass needs.

The step's tokens are concatenated with no padding: `input_ids[T]`, `positions[T]`, `slot_mapping[T]`
(where each new K/V goes in the paged cache). Attention metadata is built once per step and shared by
all layers of a kind (full-context or sliding-window): decode rows get a gather table of their blocks and
a mask; prefill chunks get their key slots and a causal (windowed) mask. Decode rows are grouped by
context length, so a short row is not padded up to the longest one in the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from conveyor.engine.request import Request
from conveyor.engine.scheduler_output import SchedulerOutput


@dataclass
class PrefillChunk:
    """One request's multi-token chunk: queries [query_start, query_end) of the flat batch."""

    query_start: int
    query_end: int
    key_slots: torch.Tensor  # [L] cache slots of the keys it may see (prefix + the chunk itself)
    mask: torch.Tensor  # [Tq, L] bool, True where the query may attend


@dataclass
class DecodeGroup:
    """Single-token rows of similar context length, attended in one batched call."""

    token_indices: torch.Tensor  # [D] rows of the flat batch
    blocks: torch.Tensor  # [D, num_gathered_blocks] block ids per row (0 = padding)
    mask: torch.Tensor  # [D, 1, 1, num_gathered_blocks * block_size] bool


@dataclass
class WindowView:
    """Attention inputs for one kind of layer (full context, or a sliding window)."""

    prefills: list[PrefillChunk]
    decode_groups: list[DecodeGroup]


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T]
    num_decodes: int
    full: WindowView
    sliding: WindowView  # the same object as `full` when the model has no sliding window


@dataclass
class ModelInput:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attention: AttentionMetadata
    logits_indices: torch.Tensor  # [S] last row of each request that samples this step
    sampling_requests: list[Request]  # row i of the logits belongs to sampling_requests[i]


def build_model_input(output: SchedulerOutput, block_size: int, sliding_window: int | None,
                      device: torch.device) -> ModelInput:
    input_ids: list[int] = []
    positions: list[int] = []
    slot_mapping: list[int] = []
    logits_indices: list[int] = []
    sampling_requests: list[Request] = []
    decode_entries: list[tuple[int, list[int], int]] = []  # (row, block table, context length after the step)
    prefill_entries: list[tuple[int, int, list[int], int, int]] = []  # (q_start, q_end, blocks, start, end)

    for scheduled in output.scheduled:
        request, start, end = scheduled.request, scheduled.start, scheduled.end
        row = len(input_ids)
        input_ids.extend(request.all_token_ids[start:end])
        positions.extend(range(start, end))
        blocks = scheduled.block_ids
        slot_mapping.extend(blocks[i // block_size] * block_size + i % block_size for i in range(start, end))
        if end - start == 1:
            decode_entries.append((row, blocks, end))
        else:
            prefill_entries.append((row, row + end - start, blocks, start, end))
        if scheduled.samples:
            logits_indices.append(len(input_ids) - 1)
            sampling_requests.append(request)

    def view(window: int | None) -> WindowView:
        groups = [_decode_group(group, block_size, window, device)
                  for group in _group_by_length(decode_entries, block_size, window)]
        prefills = [_prefill_chunk(*entry, block_size, window, device) for entry in prefill_entries]
        return WindowView(prefills, groups)

    full = view(None)
    attention = AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
        num_decodes=len(decode_entries),
        full=full,
        sliding=view(sliding_window) if sliding_window is not None else full,
    )
    return ModelInput(
        input_ids=torch.tensor(input_ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        attention=attention,
        logits_indices=torch.tensor(logits_indices, dtype=torch.long, device=device),
        sampling_requests=sampling_requests,
    )


def _first_visible_key(query_position: int, window: int | None) -> int:
    # A query at position p sees keys k with k <= p and, on sliding layers, k > p - window.
    return 0 if window is None else max(0, query_position - window + 1)


def _num_visible_blocks(length: int, block_size: int, window: int | None) -> int:
    return -(-length // block_size) - _first_visible_key(length - 1, window) // block_size


def _group_by_length(entries: list[tuple[int, list[int], int]], block_size: int, window: int | None,
                     slack: float = 1.3) -> list[list[tuple[int, list[int], int]]]:
    """Longest first; a row joins the current group while the group's longest is within `slack` of it."""
    ordered = sorted(entries, key=lambda e: -_num_visible_blocks(e[2], block_size, window))
    groups: list[list[tuple[int, list[int], int]]] = []
    for entry in ordered:
        blocks = _num_visible_blocks(entry[2], block_size, window)
        if not groups or _num_visible_blocks(groups[-1][0][2], block_size, window) > slack * blocks + 1:
            groups.append([])
        groups[-1].append(entry)
    return groups


def _decode_group(entries: list[tuple[int, list[int], int]], block_size: int, window: int | None,
                  device: torch.device) -> DecodeGroup:
    """Per row: the blocks holding its visible keys, padded to the group's longest, and the mask."""
    first_blocks = [_first_visible_key(length - 1, window) // block_size for _, _, length in entries]
    num_gathered = max(_num_visible_blocks(length, block_size, window) for _, _, length in entries)
    table = torch.zeros((len(entries), num_gathered), dtype=torch.long)
    for row, ((_, blocks, _), first) in enumerate(zip(entries, first_blocks)):
        used = blocks[first:first + num_gathered]
        table[row, :len(used)] = torch.tensor(used, dtype=torch.long)
    lengths = torch.tensor([length for _, _, length in entries])
    first_keys = torch.tensor([_first_visible_key(length - 1, window) for _, _, length in entries])
    # Absolute position of every gathered slot, to mask what lies outside [first key, length).
    key_positions = (torch.tensor(first_blocks)[:, None] * block_size
                     + torch.arange(num_gathered * block_size)[None, :])
    mask = (key_positions >= first_keys[:, None]) & (key_positions < lengths[:, None])
    rows = torch.tensor([row for row, _, _ in entries], dtype=torch.long)
    return DecodeGroup(rows.to(device), table.to(device), mask[:, None, None, :].to(device))


def _prefill_chunk(query_start: int, query_end: int, blocks: list[int], start: int, end: int,
                   block_size: int, window: int | None, device: torch.device) -> PrefillChunk:
    first_key = _first_visible_key(start, window)
    key_positions = torch.arange(first_key, end)
    block_table = torch.tensor(blocks, dtype=torch.long)
    key_slots = block_table[key_positions // block_size] * block_size + key_positions % block_size
    query_positions = torch.arange(start, end)
    mask = key_positions[None, :] <= query_positions[:, None]
    if window is not None:
        mask &= key_positions[None, :] > query_positions[:, None] - window
    return PrefillChunk(query_start, query_end, key_slots.to(device), mask.to(device))
