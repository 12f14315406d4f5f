"""The continuous-batching scheduler: one rule, no prefill or decode phases (as in vLLM's v1 scheduler).

Every request has `num_computed_tokens` (K/V in the cache) and `num_tokens` (prompt + generated). Each
step spends a budget of `max_num_batched_tokens` tokens, bringing requests' computed counts toward their
totals: running requests first (a decode costs one token; a chunked prompt continues), then waiting ones
in arrival order, up to `max_num_seqs` running. Any prompt may be cut into chunks across steps. While
requests are waiting, one prompt chunk takes at most a quarter of the budget, so a short request arriving
behind a very long prompt gets its first token within a few steps instead of waiting out the whole prompt.

When the KV pool cannot hold a running request's next tokens, the newest running request is preempted by
recompute: its blocks are freed and it goes back to the front of the queue with nothing computed. A
request that could never fit is refused when it is added.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from conveyor.config import EngineConfig
from conveyor.engine.kv_cache import KVCacheManager
from conveyor.engine.request import Request, RequestStatus
from conveyor.engine.scheduler_output import ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, config: EngineConfig, num_kv_blocks: int, max_model_len: int) -> None:
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = max_model_len
        self.long_prefill_threshold = max(config.block_size, config.max_num_batched_tokens // 4)
        self.kv_cache = KVCacheManager(num_kv_blocks, config.block_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.num_preemptions = 0
        self.step_index = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def add_request(self, request: Request) -> None:
        """Queue a request, or raise ValueError (changing nothing) if it could never run."""
        prompt_len, max_tokens = request.num_prompt_tokens, request.sampling_params.max_tokens
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if prompt_len >= self.max_model_len:
            raise ValueError(f"the prompt has {prompt_len} tokens but max_model_len is {self.max_model_len}: "
                             "no room is left for an output token")
        if max_tokens is not None and prompt_len + max_tokens > self.max_model_len:
            raise ValueError(f"the prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) is "
                             f"{prompt_len + max_tokens} tokens, over max_model_len ({self.max_model_len})")
        # The last sampled token never needs K/V, hence the -1.
        most_tokens = (prompt_len + max_tokens if max_tokens is not None else self.max_model_len) - 1
        pool_tokens = self.kv_cache.num_total_blocks * self.kv_cache.block_size
        if most_tokens > pool_tokens:
            raise ValueError(f"the request may need {most_tokens} tokens of KV cache but the whole pool holds "
                             f"{pool_tokens}; raise kv_cache_memory or lower max_tokens")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        # A prompt chunk is capped only when someone else is waiting for room.
        capped, uncapped = self.long_prefill_threshold, self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []

        # 1. Running requests, oldest first.
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = self._num_new_tokens(request, budget, capped if self.waiting else uncapped)
            while not self.kv_cache.allocate_slots(request, num_new):
                victim = self.running.pop()  # NOTE: the newest running request; possibly `request` itself
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                scheduled.append(self._scheduled(request, num_new))
                budget -= num_new
                index += 1
                continue
            break  # `request` was the newest and got preempted: nobody is left after it

        # 2. Waiting requests, in arrival order. NOTE: not in a step that preempted: that would thrash.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            request = self.waiting[0]
            num_new = self._num_new_tokens(request, budget, capped if len(self.waiting) > 1 else uncapped)
            if not self.kv_cache.allocate_slots(request, num_new):
                break  # NOTE: no skipping ahead of the queue's head, so nothing starves
            self.waiting.popleft()
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            scheduled.append(self._scheduled(request, num_new))
            budget -= num_new

        output = SchedulerOutput(
            step_index=self.step_index, scheduled=scheduled, preempted_request_ids=preempted,
            num_waiting=len(self.waiting), num_running=len(self.running),
            num_used_blocks=self.kv_cache.num_used_blocks, num_total_blocks=self.kv_cache.num_total_blocks)
        self.step_index += 1
        return output

    def update_from_output(self, output: SchedulerOutput, sampled_token_ids: dict[str, int]) -> list[Request]:
        """Advance the counters of what ran; append sampled tokens. Returns the requests that got one."""
        updated = []
        for scheduled in output.scheduled:
            request = scheduled.request
            if request.is_finished:
                continue
            request.num_computed_tokens += scheduled.num_new_tokens
            if scheduled.samples:
                request.append_output_token(sampled_token_ids[request.request_id])
                if request.first_token_time is None:
                    request.first_token_time = time.monotonic()
                updated.append(request)
        return updated

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """Finish or abort: leave the queue or the batch and free every block at once. Idempotent."""
        assert status.finished
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.kv_cache.free(request)
        request.status = status
        request.finished_time = time.monotonic()

    def _num_new_tokens(self, request: Request, budget: int, chunk_cap: int) -> int:
        remaining = request.num_tokens - request.num_computed_tokens
        return min(remaining, budget) if remaining == 1 else min(remaining, budget, chunk_cap)

    def _scheduled(self, request: Request, num_new: int) -> ScheduledRequest:
        return ScheduledRequest(request, num_new, list(self.kv_cache.get_block_ids(request.request_id)))

    def _preempt(self, request: Request) -> None:
        lost = request.num_computed_tokens
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        logger.warning("preempted request %s (recompute): dropped %d computed tokens; %d preemptions so far",
                       request.request_id, lost, self.num_preemptions)
