"""The one contract between the scheduler and the model runner: what runs in a step."""

from __future__ import annotations

from dataclasses import dataclass, field

from conveyor.engine.request import Request


@dataclass
class ScheduledRequest:
    """`num_new_tokens` tokens of `request`, starting at `request.num_computed_tokens`."""

    request: Request
    num_new_tokens: int
    block_ids: list[int]  # the request's whole block table, after this step's allocation
    # Captured when scheduled, so they stay true after the step advances the request's counters.
    start: int = field(init=False)
    samples: bool = field(init=False)  # the cache will hold every known token, so the next one is sampled

    def __post_init__(self) -> None:
        self.start = self.request.num_computed_tokens
        self.samples = self.start + self.num_new_tokens == self.request.num_tokens

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens

    @property
    def is_decode(self) -> bool:
        """One token of generated text (a recompute after preemption counts as prefill)."""
        return self.num_new_tokens == 1 and self.start >= self.request.num_prompt_tokens


@dataclass
class SchedulerOutput:
    step_index: int
    scheduled: list[ScheduledRequest]  # running requests first, then newly admitted ones
    preempted_request_ids: list[str] = field(default_factory=list)
    num_waiting: int = 0  # after this step's admissions
    num_running: int = 0
    num_used_blocks: int = 0
    num_total_blocks: int = 0

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
