"""SchedulerOutput -> the flat tensors one forward pass needs.

The step's tokens are concatenated with no padding: `input_ids[T]`, `positions[T]`, `slot_mapping[T]`
(where each new K/V goes in the paged cache). Attention metadata is built once per step and shared by
all layers of a kind (full-context or sliding-window): decode rows get a gather table of their blocks and
a mask; prefill chunks get their key slots and a causal (windowed) mask.
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
class WindowView:
    """Attention inputs for one kind of layer (full context, or a sliding window)."""

    prefills: list[PrefillChunk]
    decode_blocks: torch.Tensor  # [D, num_gathered_blocks] block ids per decode row (0 = padding)
    decode_mask: torch.Tensor  # [D, 1, 1, num_gathered_blocks * block_size] bool


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T]
    num_decodes: int
    decode_token_indices: torch.Tensor  # [D] rows of the flat batch that are single-token steps
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
    decode_rows: list[int] = []
    decode_entries: list[tuple[list[int], int]] = []  # (block table, context length after the step)
    prefill_entries: list[tuple[int, int, list[int], int, int]] = []  # (q_start, q_end, blocks, start, end)

    for scheduled in output.scheduled:
        request, start, end = scheduled.request, scheduled.start, scheduled.end
        row = len(input_ids)
        input_ids.extend(request.all_token_ids[start:end])
        positions.extend(range(start, end))
        blocks = scheduled.block_ids
        slot_mapping.extend(blocks[i // block_size] * block_size + i % block_size for i in range(start, end))
        if end - start == 1:
            decode_rows.append(row)
            decode_entries.append((blocks, end))
        else:
            prefill_entries.append((row, row + end - start, blocks, start, end))
        if scheduled.samples:
            logits_indices.append(len(input_ids) - 1)
            sampling_requests.append(request)

    def view(window: int | None) -> WindowView:
        blocks, mask = _decode_gather(decode_entries, block_size, window, device)
        prefills = [_prefill_chunk(*entry, block_size, window, device) for entry in prefill_entries]
        return WindowView(prefills, blocks, mask)

    full = view(None)
    attention = AttentionMetadata(
        slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
        num_decodes=len(decode_rows),
        decode_token_indices=torch.tensor(decode_rows, dtype=torch.long, device=device),
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


def _decode_gather(entries: list[tuple[list[int], int]], block_size: int, window: int | None,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per decode row: the blocks holding its visible keys, padded to a common count, and the mask."""
    if not entries:
        empty = torch.zeros((0, 1), dtype=torch.long, device=device)
        return empty, torch.zeros((0, 1, 1, block_size), dtype=torch.bool, device=device)
    first_blocks = [_first_visible_key(length - 1, window) // block_size for _, length in entries]
    num_gathered = max((length + block_size - 1) // block_size - first
                       for (_, length), first in zip(entries, first_blocks))
    table = torch.zeros((len(entries), num_gathered), dtype=torch.long)
    lengths = torch.tensor([length for _, length in entries])
    first_keys = torch.tensor([_first_visible_key(length - 1, window) for _, length in entries])
    for row, ((blocks, _), first) in enumerate(zip(entries, first_blocks)):
        used = blocks[first:first + num_gathered]
        table[row, :len(used)] = torch.tensor(used, dtype=torch.long)
    # Absolute position of every gathered slot, to mask what lies outside [first key, length).
    key_positions = (torch.tensor(first_blocks)[:, None] * block_size
                     + torch.arange(num_gathered * block_size)[None, :])
    mask = (key_positions >= first_keys[:, None]) & (key_positions < lengths[:, None])
    return table.to(device), mask[:, None, None, :].to(device)


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
