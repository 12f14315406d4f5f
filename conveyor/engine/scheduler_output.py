"""The one contract between the scheduler and the model runner: what runs in a step, as plain data.

Nothing here is live engine state. A request's prompt and sampling parameters cross once, in
`NewRequestData`, the first time it is scheduled; after that each step sends only deltas (token counts and
the block ids added to its table). The runner keeps its own copy of each request's tokens and block
table, updated from these values, as vLLM v1's worker does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from conveyor.sampling_params import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    """Sent once, when a request is first scheduled: what the runner needs to keep for it."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int]


@dataclass(frozen=True)
class ScheduledRequest:
    """`num_new_tokens` tokens of a request, its positions `start..end-1`."""

    request_id: str
    start: int  # tokens already in the cache before this step
    num_new_tokens: int
    new_block_ids: list[int]  # appended to its block table this step (after preemption: the whole table)
    samples: bool  # the cache will hold every known token, so the next one is sampled
    is_decode: bool  # one token of generated text (a recompute after preemption counts as prefill)

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    step_index: int
    scheduled: list[ScheduledRequest]  # running requests first, then newly admitted ones
    new_requests: list[NewRequestData] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)  # their blocks are gone
    finished_request_ids: list[str] = field(default_factory=list)  # finished or aborted since the last step
    num_waiting: int = 0  # after this step's admissions
    num_running: int = 0
    num_used_blocks: int = 0
    num_total_blocks: int = 0
    num_prefix_cache_queries: int = 0  # tokens of the requests admitted since the last step
    num_prefix_cache_hits: int = 0  # of those, tokens found in the prefix cache

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
