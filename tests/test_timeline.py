"""The one definition of a timeline cell, shared by the benchmark pictures and the dashboard."""

from __future__ import annotations

from conveyor.engine.stats import ScheduledEntry, StepStats
from conveyor.engine.timeline import DECODE, EMPTY, IDLE, PREEMPTED, PREFILL, step_cells, timeline_matrix


def _step(index: int, scheduled: list[tuple[str, int, str]], preempted: list[str] | None = None) -> StepStats:
    return StepStats(step_index=index, start_time=0.0, duration=0.0, prepare_seconds=0.0, forward_seconds=0.0,
                     sample_seconds=0.0, scheduled=[ScheduledEntry(*entry) for entry in scheduled],
                     num_generation_tokens=0, num_running=0, num_waiting=0, kv_blocks_used=0, kv_blocks_total=8,
                     preempted=preempted or [])


def test_cells_rows_in_arrival_order_preemptions_and_idle_decodes() -> None:
    steps = [_step(0, [("a", 5, "prefill")]),
             _step(1, [("a", 1, "decode"), ("b", 3, "prefill")]),
             _step(2, [("a", 1, "decode")], preempted=["b"]),
             _step(3, [("a", 1, "decode"), ("b", 4, "prefill")])]
    assert step_cells(steps[2]) == [("a", DECODE.code), ("b", PREEMPTED.code)]
    matrix, order = timeline_matrix(steps, useful_decodes={"a": 2})
    assert order == ["a", "b"]
    assert matrix.tolist() == [[PREFILL.code, DECODE.code, DECODE.code, IDLE.code],
                               [EMPTY.code, PREFILL.code, PREEMPTED.code, PREFILL.code]]
