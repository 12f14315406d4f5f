"""What a batch-composition timeline is: for every engine step, what each request did in it.

The benchmark pictures (`conveyor.bench.plots`) and the live dashboard (`conveyor.server.dashboard`) both
draw from these definitions, so a cell and its colour mean the same in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from conveyor.engine.stats import StepStats


@dataclass(frozen=True)
class CellKind:
    name: str
    code: int
    label: str
    color: str


EMPTY = CellKind("empty", 0, "not in the step", "#ffffff")
PREFILL = CellKind("prefill", 1, "prefill chunk", "#f28e2b")
DECODE = CellKind("decode", 2, "decode", "#4e79a7")
# Static batching only: the slot of a finished request kept in the batch until its longest is done.
IDLE = CellKind("idle", 3, "idle slot (padding)", "#d3d3d3")
# Evicted in this step for want of blocks; it rejoins later with a recompute (a prefill).
PREEMPTED = CellKind("preempted", 4, "preempted", "#e15759")
CELL_KINDS = (EMPTY, PREFILL, DECODE, IDLE, PREEMPTED)  # in code order


def step_cells(step: StepStats) -> list[tuple[str, int]]:
    """(request id, kind code) of every request the step touched: the scheduled ones in batch order, then
    the ones it preempted (a victim is never also scheduled in that step)."""
    cells = [(e.request_id, PREFILL.code if e.kind == "prefill" else DECODE.code) for e in step.scheduled]
    cells += [(request_id, PREEMPTED.code) for request_id in step.preempted]
    return cells


def timeline_matrix(steps: list[StepStats], useful_decodes: dict[str, int] | None = None
                    ) -> tuple[np.ndarray, list[str]]:
    """[request, step] -> kind code, one row per request in order of first appearance. A decode beyond a
    request's useful count (static batching keeps finished requests in the batch until its longest is
    done) is idle."""
    columns = [step_cells(step) for step in steps]
    row: dict[str, int] = {}
    for cells in columns:
        for request_id, _ in cells:
            row.setdefault(request_id, len(row))
    matrix = np.full((len(row), len(steps)), EMPTY.code, dtype=np.int8)
    decodes: dict[str, int] = {}
    limits = useful_decodes or {}
    for column, cells in enumerate(columns):
        for request_id, kind in cells:
            if kind == DECODE.code:
                decodes[request_id] = decodes.get(request_id, 0) + 1
                if decodes[request_id] > limits.get(request_id, decodes[request_id]):
                    kind = IDLE.code
            matrix[row[request_id], column] = kind
    return matrix, list(row)
