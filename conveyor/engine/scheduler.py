"""The continuous-batching scheduler: one rule, no prefill or decode phases (as in vLLM's v1 scheduler).

Every request has `num_computed_tokens` (K/V in the cache) and `num_tokens` (prompt + generated). A step
spends a budget of `max_num_batched_tokens` tokens bringing computed counts up to totals, in three passes:

1. Running requests, oldest first. A decode costs one token; an unfinished prompt continues. They already
   hold KV blocks, and finishing them frees those blocks soonest.
2. Waiting requests in arrival order, while fewer than `max_num_seqs` run. Admission never skips ahead of
   a head of the queue that does not fit, so a large request is not overtaken forever by small ones.
3. Budget still left goes back, oldest first, to prompt chunks that passes 1 and 2 held short.

Any prompt may be chunked across steps. While a waiting request could take a free seat, passes 1 and 2 give
one prompt chunk at most 1/`prefill_chunk_share` of the budget. Without that cap a 2,000-token prompt under a
256-token budget takes every token of eight steps, and a ten-token request behind it waits for all of them
(head-of-line blocking); with it, the short request is admitted at the next step and samples in it. Pass 3
returns whatever admission did not use, so the cap never leaves the machine idle.

Prefix caching: a waiting request starts from the longest block-aligned prefix of its tokens already in
the KV cache (`kv_cache.py`), so only the rest is computed and budgeted. If the first block it would
compute is being filled by a request planned in this step, admission stops for this step: next step that
block is a hit, and a prefix shared by requests arriving together is computed once.

Memory: when the KV pool cannot hold a running request's next tokens, the newest running request is
preempted by recompute (it has the least work invested): its blocks are freed and it goes back to the
front of the queue with nothing computed, to recompute its prompt and generated tokens as one prefill.
Admission never preempts. A request that could never run is refused in `add_request`, so neither
preemption nor admission can loop forever.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from conveyor.config import EngineConfig
from conveyor.engine.kv_cache import KVCacheManager
from conveyor.engine.request import Request, RequestStatus
from conveyor.engine.scheduler_output import NewRequestData, ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)

class Scheduler:
    def __init__(self, config: EngineConfig, num_kv_blocks: int, max_model_len: int) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = max_model_len
        self.prefill_chunk_cap = max(1, config.max_num_batched_tokens // config.prefill_chunk_share)
        self.kv_cache = KVCacheManager(num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the newest, preempted first, is last
        self.requests: dict[str, Request] = {}  # every unfinished request, waiting or running
        self.num_preemptions = 0
        self.step_index = 0  # counts non-empty steps
        self._prefix_cache_queries = self._prefix_cache_hits = 0  # tokens, since the last step
        # What the runner has been told: requests it keeps state for, and how many of each one's block ids.
        self._num_blocks_sent: dict[str, int] = {}
        self._finished_since_last_step: list[str] = []

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self.requests.get(request_id)

    def add_request(self, request: Request) -> None:
        """Queue a request, or raise ValueError (changing nothing) if it could never run."""
        request_id, prompt_len = request.request_id, request.num_prompt_tokens
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if prompt_len >= self.max_model_len:
            raise ValueError(f"request {request_id!r}: the prompt has {prompt_len} tokens but max_model_len "
                             f"is {self.max_model_len}; it must be shorter to leave room for an output token")
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is None:
            # NOTE: no limit means "until max_model_len" (the engine stops it there). Its SamplingParams
            # may be shared with other requests, so the effective limit is not written back.
            max_tokens = self.max_model_len - prompt_len
        elif prompt_len + max_tokens > self.max_model_len:
            raise ValueError(f"request {request_id!r}: the prompt ({prompt_len} tokens) plus max_tokens "
                             f"({max_tokens}) is {prompt_len + max_tokens} tokens, over max_model_len "
                             f"({self.max_model_len})")
        # NOTE: the last sampled token is never fed back to the model, so it needs no K/V: hence the -1.
        kv_tokens = prompt_len + max_tokens - 1
        num_blocks = self.kv_cache.num_blocks_for_tokens(kv_tokens)
        pool_blocks = self.kv_cache.num_total_blocks
        pool_tokens = pool_blocks * self.kv_cache.block_size
        if num_blocks > pool_blocks:
            raise ValueError(
                f"request {request_id!r} may need {kv_tokens} tokens of KV cache ({num_blocks} blocks) but "
                f"the whole KV pool holds {pool_tokens} tokens ({pool_blocks} blocks); lower max_tokens or "
                "give the KV cache more memory (kv_cache_memory / num_kv_blocks)")
        self.requests[request_id] = request
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's tokens: running requests first, then waiting ones (see the module docstring)."""
        budget = self.max_num_batched_tokens
        planned: dict[Request, int] = {}  # request -> tokens this step, in output order
        preempted: list[str] = []

        # 1. Running requests, oldest first. The cap leaves room for pass 2 if it can admit anyone.
        could_admit = bool(self.waiting) and len(self.running) < self.max_num_seqs
        cap = self.prefill_chunk_cap if could_admit else self.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget, cap)
            if not self._allocate_or_preempt(request, num_new, preempted):
                break  # NOTE: `request` was the newest running request and preempted itself: none follow
            planned[request] = num_new
            budget -= num_new
            index += 1

        # 2. Waiting requests, first come first served.
        # NOTE: none in a step that preempted: they would take the blocks just freed and the victim would
        # be preempted again next step (thrashing).
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            request = self.waiting[0]
            cached_blocks = self.kv_cache.find_cached_prefix(request)  # new, or preempted: nothing computed
            if self._next_block_is_being_computed(request, len(cached_blocks), planned):
                break  # NOTE: a request ahead fills that block in this step; next step it is a cache hit
            num_cached = len(cached_blocks) * self.kv_cache.block_size
            # NOTE: capped too, even the last in the queue: pass 3 then hands what is left to the oldest.
            num_new = min(request.num_tokens - num_cached, budget, self.prefill_chunk_cap)
            if not self.kv_cache.allocate_slots(request, num_new, cached_blocks):
                break  # NOTE: the head waits for blocks; skipping it could starve it behind smaller ones
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens is None:  # what the caller is told: the first admission's hit
                request.num_cached_tokens = num_cached
            if self.kv_cache.enable_prefix_caching:
                self._prefix_cache_queries += request.num_tokens
                self._prefix_cache_hits += num_cached
            self.waiting.popleft()
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            planned[request] = num_new
            budget -= num_new

        # 3. Budget admission left unused goes back to chunks the cap held short, oldest first, as far as
        # free blocks allow. NOTE: it never preempts: this is extra work, not owed work.
        for request, num_new in list(planned.items()):
            extra = min(request.num_tokens - request.num_computed_tokens - num_new, budget,
                        self.kv_cache.num_allocatable_tokens(request) - num_new)
            if extra > 0 and self.kv_cache.allocate_slots(request, num_new + extra):
                planned[request] = num_new + extra
                budget -= extra

        new_requests = [self._new_request_data(request) for request in planned
                        if request.request_id not in self._num_blocks_sent]
        scheduled = [self._scheduled_request(request, num_new) for request, num_new in planned.items()]
        finished, self._finished_since_last_step = self._finished_since_last_step, []
        output = SchedulerOutput(
            step_index=self.step_index, scheduled=scheduled, new_requests=new_requests,
            preempted_request_ids=preempted, finished_request_ids=finished, num_waiting=len(self.waiting),
            num_running=len(self.running), num_used_blocks=self.kv_cache.num_used_blocks,
            num_total_blocks=self.kv_cache.num_total_blocks, num_prefix_cache_queries=self._prefix_cache_queries,
            num_prefix_cache_hits=self._prefix_cache_hits)
        self._prefix_cache_queries = self._prefix_cache_hits = 0
        if scheduled:
            self.step_index += 1
        return output

    def _next_block_is_being_computed(self, request: Request, num_cached_blocks: int,
                                      planned: dict[Request, int]) -> bool:
        """Whether the first block the request would compute is one a request planned in this step fills.

        Several requests sharing a prefix that is not cached yet (a common system prompt, the n samples of
        one prompt) then compute it once: the first computes, the others wait a step and hit the cache.
        """
        size = self.kv_cache.block_size
        if (not self.kv_cache.enable_prefix_caching or num_cached_blocks >= (request.num_tokens - 1) // size
                or request.sampling_params.prompt_logprobs is not None):
            return False
        wanted = self.kv_cache.block_hashes(request, num_cached_blocks + 1)[-1]
        for other, num_new in planned.items():
            first, end = other.num_computed_tokens // size, (other.num_computed_tokens + num_new) // size
            if end > first and wanted in self.kv_cache.block_hashes(other, end)[first:]:
                return True
        return False

    @staticmethod
    def _new_request_data(request: Request) -> NewRequestData:
        return NewRequestData(request.request_id, list(request.prompt_token_ids), request.sampling_params,
                              list(request.eos_token_ids))

    def _scheduled_request(self, request: Request, num_new: int) -> ScheduledRequest:
        request_id, start = request.request_id, request.num_computed_tokens
        num_sent = self._num_blocks_sent.get(request_id, 0)
        new_block_ids = self.kv_cache.get_block_ids(request_id, first=num_sent)
        self._num_blocks_sent[request_id] = num_sent + len(new_block_ids)
        return ScheduledRequest(request_id, start, num_new, new_block_ids,
                                samples=start + num_new == request.num_tokens,
                                is_decode=num_new == 1 and start >= request.num_prompt_tokens)

    def update_from_output(self, output: SchedulerOutput, sampled_token_ids: dict[str, int]) -> list[Request]:
        """Advance the counters of what ran; append sampled tokens. Returns the requests that got one.

        Stop checks (EOS, stop strings, max_tokens) are the engine's; it then calls `finish_request`.
        """
        updated = []
        for scheduled in output.scheduled:
            request = self.requests.get(scheduled.request_id)
            if request is None:
                continue  # NOTE: aborted while its step ran; its blocks are already back in the pool
            request.num_computed_tokens += scheduled.num_new_tokens
            self.kv_cache.register_full_blocks(request)
            if scheduled.samples:
                request.append_output_token(sampled_token_ids[request.request_id])
                if request.first_token_time is None:
                    request.first_token_time = time.monotonic()
                updated.append(request)
        return updated

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """Finish or abort: leave the queue or the batch and free every block at once. Idempotent."""
        if not status.finished:
            raise ValueError(f"finish_request needs a finished status, got {status}")
        request = self.requests.pop(request_id, None)
        if request is None:
            return  # NOTE: unknown or already finished (an abort racing completion): nothing to do
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.kv_cache.free(request)
        self.kv_cache.forget(request)
        if self._num_blocks_sent.pop(request_id, None) is not None:
            self._finished_since_last_step.append(request_id)  # the runner drops its state next step
        request.status = status
        request.finished_time = time.monotonic()

    def _allocate_or_preempt(self, request: Request, num_new: int, preempted: list[str]) -> bool:
        """Allocate, preempting the newest running requests until it fits; False if `request` itself went."""
        while not self.kv_cache.allocate_slots(request, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        lost = request.num_computed_tokens
        self.kv_cache.free(request)
        self._num_blocks_sent[request.request_id] = 0  # the runner drops its table too (preempted ids)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        logger.warning("KV cache full: preempted request %s by recompute, dropping %d computed tokens "
                       "(%d preemptions so far); raise kv_cache_memory to avoid this",
                       request.request_id, lost, self.num_preemptions)
