"""LLMEngine: one `step()` = schedule, run the model on the flat batch, sample, update, emit outputs.

The engine owns the tokenizer, the scheduler, the model runner and the output processor. It is
synchronous and single-threaded; `conveyor.engine.async_engine` runs it in a loop for the server, and
`conveyor.engine.llm`'s `LLM` drives it for offline batches. Each step returns its outputs and one
`StepStats` value, which is all that metrics, logs, the trace and the benchmarks read.
"""

from __future__ import annotations

import itertools
import logging
import time

from conveyor.config import EngineConfig
from conveyor.engine.output_processor import OutputProcessor
from conveyor.engine.request import Request, RequestStatus
from conveyor.engine.runner import ModelRunner
from conveyor.engine.scheduler import Scheduler
from conveyor.engine.scheduler_output import SchedulerOutput
from conveyor.engine.stats import QueueStats, ScheduledEntry, StepStats
from conveyor.engine.structured_output import GrammarCompiler
from conveyor.engine.trace import StepTrace
from conveyor.model.generation_config import read_sampling_defaults
from conveyor.model.loader import load_model_weights, resolve_model_path
from conveyor.outputs import Logprob, RequestOutput
from conveyor.sampling_params import SamplingParams
from conveyor.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        started = time.perf_counter()
        self.model_path = resolve_model_path(config.model)
        self.model_config, weights = load_model_weights(self.model_path)
        dtype, quantization, why = config.precision()
        logger.info("precision: %s (dtype %s; %s)", quantization or dtype, dtype, why)
        self.config = config = config.resolved(self.model_path, self.model_config)
        assert config.tokenizer is not None and config.max_model_len is not None and config.num_kv_blocks
        self.tokenizer = load_tokenizer(config.tokenizer, chat_template=config.chat_template)
        self.max_model_len = config.max_model_len
        self.eos_token_ids = sorted(set(self.model_config.eos_token_ids) | set(self.tokenizer.eos_token_ids))
        self.grammar = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, self.eos_token_ids)
        self.runner = ModelRunner(config, self.model_config, weights, self.grammar, self.tokenizer)
        del weights
        self.scheduler = Scheduler(config, config.num_kv_blocks, self.max_model_len)
        self.output_processor = OutputProcessor(self.tokenizer, self.max_model_len)
        self.trace = StepTrace() if config.enable_step_trace else None
        self.sampling_defaults = read_sampling_defaults(self.model_path, config.generation_config)
        try:
            SamplingParams(**self.sampling_defaults)
        except (TypeError, ValueError) as error:
            raise ValueError(f"the model's sampling defaults {self.sampling_defaults} are invalid: {error}; "
                             "pass --generation-config vllm to ignore them") from None
        self._finished_since_last_step: list[RequestOutput] = []
        self._ids = itertools.count()
        logger.info("engine ready in %.1f s: %s (%s), max_model_len %d", time.perf_counter() - started,
                    self.model_config.name or self.model_path, self.model_config.architecture, self.max_model_len)

    # ---- requests in and out -------------------------------------------------------------------

    def default_sampling_params(self, **overrides: object) -> SamplingParams:
        """SamplingParams with the model's defaults (`--generation-config`) under `overrides`."""
        return SamplingParams(**{**self.sampling_defaults, **overrides})  # type: ignore[arg-type]

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> Request:
        """Queue a request; it joins the batch at the next step. Raises ValueError for impossible ones."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError("LLMEngine takes n=1 requests; LLM.generate and the server fan out n > 1")
        if params.structured_outputs is not None:
            self.grammar.compile(params.structured_outputs)  # raises for a bad one; the server compiled it already
        request_id = request_id if request_id is not None else str(next(self._ids))
        if self.output_processor.has_request(request_id):
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text_prompt: str | None = prompt
            token_ids = self.tokenizer.encode(prompt)
        else:
            text_prompt, token_ids = None, list(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty: it must contain at least one token")
        vocab_size = self.model_config.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab_size}); got {bad[:5]}")
        bad = [t for t in params.logit_bias or {} if t >= vocab_size]
        if bad:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab_size}); got {bad[:5]}")
        request = Request(request_id, token_ids, params, prompt=text_prompt, arrival_time=arrival_time,
                          eos_token_ids=self.eos_token_ids)
        self.scheduler.add_request(request)  # raises for requests that could never fit
        self.output_processor.add_request(request)
        return request

    def abort_request(self, request_id: str) -> None:
        """Drop a request wherever it is; its KV blocks are freed at once."""
        request = self.scheduler.get_request(request_id)
        if request is None or request.is_finished:
            return
        self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        self._finished_since_last_step.append(self.output_processor.make_output(request))

    def queue_stats(self) -> QueueStats:
        """The queues and the KV pool now (the engine thread's view; other threads get the value)."""
        kv_cache = self.scheduler.kv_cache
        return QueueStats(num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
                          kv_blocks_used=kv_cache.num_used_blocks, kv_blocks_cached=kv_cache.num_cached_blocks,
                          kv_blocks_total=kv_cache.num_total_blocks)

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (running requests keep their blocks); returns how many blocks were
        findable."""
        return self.scheduler.kv_cache.reset_prefix_cache()

    def cached_block_hashes(self) -> list[int]:
        """The prefix cache's block hashes (see `kv_cache.prefix_block_hashes`), for a router to match."""
        return self.scheduler.kv_cache.pool.cached_hashes()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- the step ------------------------------------------------------------------------------

    def step(self) -> tuple[list[RequestOutput], StepStats | None]:
        """Run one forward step. Returns an output for every request that got a token or finished, and
        the step's statistics (None when there was nothing to run)."""
        started = time.perf_counter()
        outputs, self._finished_since_last_step = self._finished_since_last_step, []
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            self.runner.update_states(scheduled)  # finished requests still leave the runner
            return outputs, None
        result = self.runner.execute(scheduled)
        self._record_prompt_logprobs(result.prompt_logprobs)
        updated = self.scheduler.update_from_output(scheduled, result.sampled_token_ids)
        finished_ids = []
        for request in updated:
            if request.logprobs is not None and request.request_id in result.logprobs:
                position = result.logprobs[request.request_id]
                request.logprobs.append(position)
                request.cumulative_logprob += position[request.output_token_ids[-1]].logprob
            status = self.output_processor.process_token(request)
            if status is None and request.request_id in result.grammar_completed:
                status = RequestStatus.FINISHED_STOPPED  # the grammar admits nothing more (not even text)
            if status is not None:
                self.scheduler.finish_request(request.request_id, status)
                finished_ids.append(request.request_id)
            outputs.append(self.output_processor.make_output(request))
        stats = StepStats(
            step_index=scheduled.step_index, start_time=started, duration=time.perf_counter() - started,
            prepare_seconds=result.prepare_seconds, forward_seconds=result.forward_seconds,
            sample_seconds=result.sample_seconds, scheduled=_entries(scheduled), num_generation_tokens=len(updated),
            **vars(self.queue_stats()), prefix_cache_queries=scheduled.num_prefix_cache_queries,
            prefix_cache_hits=scheduled.num_prefix_cache_hits,
            preempted=list(scheduled.preempted_request_ids), finished=finished_ids)
        if self.trace is not None:
            self.trace.append(stats)
        return outputs, stats

    def _record_prompt_logprobs(self, scored: dict[str, tuple[int, list[dict[int, Logprob]]]]) -> None:
        """Append each request's newly scored prompt positions; a recompute after preemption scores some
        again, and those are not appended twice."""
        for request_id, (start, positions) in scored.items():
            request = self.scheduler.get_request(request_id)
            if request is None or request.prompt_logprobs is None:
                continue
            for offset, position in enumerate(positions):
                if start + 1 + offset == len(request.prompt_logprobs):
                    request.prompt_logprobs.append(position)


def _entries(output: SchedulerOutput) -> list[ScheduledEntry]:
    return [ScheduledEntry(s.request_id, s.num_new_tokens, "decode" if s.is_decode else "prefill", s.start, s.samples)
            for s in output.scheduled]
