"""A record of every engine step (its `StepStats`): who ran, how many tokens each, how long, and the
cache and queues.

Tests use it to prove the batching behaviour; the benchmarks draw batch-composition timelines from it.
Bounded, so a long-running server does not grow it without limit.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict

from conveyor.engine.stats import StepStats


class StepTrace:
    def __init__(self, max_steps: int = 200_000) -> None:
        self.steps: deque[StepStats] = deque(maxlen=max_steps)

    def append(self, record: StepStats) -> None:
        self.steps.append(record)

    def clear(self) -> None:
        self.steps.clear()

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[StepStats]:
        return iter(self.steps)

    def to_jsonl(self, path: str) -> None:
        with open(path, "w") as f:
            for record in self.steps:
                f.write(json.dumps(asdict(record)) + "\n")
