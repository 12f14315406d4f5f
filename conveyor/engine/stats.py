"""Statistics as values: each engine step returns one `StepStats`.

Metrics, the periodic log line, the step trace and the benchmarks all read these values; nothing reads
the scheduler's internals from another thread. (vLLM's `SchedulerStats` / `IterationStats` play this role.)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ScheduledEntry:
    request_id: str
    num_tokens: int
    kind: str  # "prefill" (a prompt chunk or a recompute) or "decode"
    start: int = 0  # tokens already in the cache before this step
    samples: bool = False  # the step samples this request's next token


@dataclass(frozen=True)
class QueueStats:
    """The queues and the KV pool as they stand: after a step, or after adds and aborts between steps."""

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_cached: int
    kv_blocks_total: int

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the pool owned by requests (0 to 1)."""
        return self.kv_blocks_used / max(1, self.kv_blocks_total)


@dataclass(frozen=True)
class StepStats:
    """What one step did and the state it left: tokens and requests by kind, queues, KV blocks, timings."""

    step_index: int
    start_time: float  # monotonic seconds
    duration: float  # the whole step, scheduling to outputs
    prepare_seconds: float  # building the flat batch
    forward_seconds: float
    sample_seconds: float
    scheduled: list[ScheduledEntry]
    num_generation_tokens: int  # tokens sampled (prompt chunks that did not finish their prompt sample none)
    num_running: int  # after the step (finished requests have left)
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    kv_blocks_cached: int = 0  # owned by nobody but kept, findable, for their prefix (evictable)
    prefix_cache_queries: int = 0  # tokens of the requests admitted in this step
    prefix_cache_hits: int = 0  # of those, tokens found in the prefix cache
    preempted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(e.num_tokens for e in self.scheduled)

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens of prompt chunks and recomputes (prefill work)."""
        return sum(e.num_tokens for e in self.scheduled if e.kind == "prefill")

    @property
    def num_decode_requests(self) -> int:
        return sum(1 for e in self.scheduled if e.kind == "decode")

    @property
    def num_prefill_requests(self) -> int:
        return len(self.scheduled) - self.num_decode_requests

    @property
    def kv_blocks_free(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_used - self.kv_blocks_cached

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of the pool owned by requests (0 to 1)."""
        return self.kv_blocks_used / max(1, self.kv_blocks_total)

    @property
    def overhead_seconds(self) -> float:
        """Time spent outside the model forward and sampling: scheduling, batch building, bookkeeping."""
        return self.duration - self.forward_seconds - self.sample_seconds
