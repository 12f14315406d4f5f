"""A record of every engine step: who ran, how many tokens each, how long, and the cache and queues.

Tests use it to prove the batching behaviour; the benchmarks draw batch-composition timelines from it.
Bounded, so a long-running server does not grow it without limit.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import asdict, dataclass


@dataclass
class ScheduledEntry:
    request_id: str
    num_tokens: int
    kind: str  # "prefill" (a prompt chunk or a recompute) or "decode"


@dataclass
class StepRecord:
    step_index: int
    start_time: float  # monotonic seconds
    duration: float  # whole step, scheduling to outputs
    forward_seconds: float
    sample_seconds: float
    scheduled: list[ScheduledEntry]
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    preempted: list[str]
    finished: list[str]

    @property
    def num_tokens(self) -> int:
        return sum(e.num_tokens for e in self.scheduled)

    @property
    def overhead_seconds(self) -> float:
        """Time spent outside the model forward and sampling: scheduling, batch building, bookkeeping."""
        return self.duration - self.forward_seconds - self.sample_seconds


class StepTrace:
    def __init__(self, max_steps: int = 200_000) -> None:
        self.steps: deque[StepRecord] = deque(maxlen=max_steps)

    def append(self, record: StepRecord) -> None:
        self.steps.append(record)

    def clear(self) -> None:
        self.steps.clear()

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.steps)

    def to_jsonl(self, path: str) -> None:
        with open(path, "w") as f:
            for record in self.steps:
                f.write(json.dumps(asdict(record)) + "\n")
