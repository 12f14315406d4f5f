"""LLMEngine: one `step()` = schedule, run the model on the flat batch, sample, update, emit outputs.

The engine owns the tokenizer, the scheduler and the model runner. It is synchronous and single-threaded;
`conveyor.engine.async_engine` runs it in a background loop for the server, and `conveyor.engine.llm`'s
`LLM` drives it for offline batches.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

from conveyor.config import EngineConfig
from conveyor.engine.request import Request, RequestStatus
from conveyor.engine.runner import ModelRunner
from conveyor.engine.scheduler import Scheduler
from conveyor.engine.scheduler_output import SchedulerOutput
from conveyor.engine.trace import ScheduledEntry, StepRecord, StepTrace
from conveyor.model.loader import load_model_weights, resolve_model_path
from conveyor.outputs import CompletionOutput, RequestMetrics, RequestOutput
from conveyor.sampling_params import SamplingParams
from conveyor.tokenizer import IncrementalDetokenizer, load_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 8192


@dataclass
class _TextState:
    """Detokenized text of one request and how much of it has been handed out."""

    detokenizer: IncrementalDetokenizer
    text: str = ""
    num_emitted_chars: int = 0
    num_emitted_tokens: int = 0
    stop_holdback: int = 0  # chars kept back while streaming: they might start a stop string


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        started = time.perf_counter()
        self.model_path = resolve_model_path(config.model)
        self.model_config, weights = load_model_weights(self.model_path)
        self.tokenizer = load_tokenizer(config.tokenizer or self.model_path, chat_template=config.chat_template)
        model_limit = self.model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > model_limit:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's limit of {model_limit}")
        self.max_model_len = config.max_model_len or min(model_limit, DEFAULT_MAX_MODEL_LEN)
        self.runner = ModelRunner(config, self.model_config, weights, self.max_model_len)
        del weights
        self.scheduler = Scheduler(config, self.runner.num_kv_blocks, self.max_model_len)
        self.trace = StepTrace() if config.enable_step_trace else None
        self.eos_token_ids = sorted(set(self.model_config.eos_token_ids) | set(self.tokenizer.eos_token_ids))
        self._text: dict[str, _TextState] = {}
        self._finished_since_last_step: list[RequestOutput] = []
        self._ids = itertools.count()
        self.step_index = 0
        self.last_step_num_requests = 0
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0
        logger.info("engine ready in %.1f s: %s (%s), max_model_len %d", time.perf_counter() - started,
                    self.model_config.name or self.model_path, self.model_config.architecture, self.max_model_len)

    # ---- requests in and out -------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> Request:
        """Queue a request; it joins the batch at the next step. Raises ValueError for impossible ones."""
        params = params or SamplingParams()
        if params.n != 1:
            raise ValueError("LLMEngine takes n=1 requests; LLM.generate and the server fan out n > 1")
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self._text:
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
        request = Request(request_id, token_ids, params, prompt=text_prompt, arrival_time=arrival_time,
                          eos_token_ids=self.eos_token_ids)
        self.scheduler.add_request(request)  # raises for requests that could never fit
        detokenizer = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
        holdback = max((len(s) for s in params.stop), default=1) - 1
        self._text[request_id] = _TextState(detokenizer, stop_holdback=holdback)
        return request

    def abort_request(self, request_id: str) -> None:
        """Drop a request wherever it is; its KV blocks are freed at once."""
        request = self.scheduler.get_request(request_id)
        if request is None or request.is_finished:
            return
        self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        self._finished_since_last_step.append(self._make_output(request))
        self._text.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- the step ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one forward step; return an output for every request that got a token or finished."""
        started = time.perf_counter()
        outputs, self._finished_since_last_step = self._finished_since_last_step, []
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return outputs
        result = self.runner.execute(scheduled)
        self.last_step_num_requests = len(scheduled.scheduled)
        self.num_prompt_tokens_total += sum(
            s.num_new_tokens for s in scheduled.scheduled if s.start < s.request.num_prompt_tokens)
        updated = self.scheduler.update_from_output(scheduled, result.sampled_token_ids)
        finished_ids = []
        for request in updated:
            self.num_generation_tokens_total += 1
            if request.logprobs is not None and request.request_id in result.logprobs:
                position = result.logprobs[request.request_id]
                request.logprobs.append(position)
                request.cumulative_logprob += position[request.output_token_ids[-1]].logprob
            status = self._check_stop(request)
            if status is not None:
                self.scheduler.finish_request(request.request_id, status)
                finished_ids.append(request.request_id)
            outputs.append(self._make_output(request))
            if request.is_finished:
                self._text.pop(request.request_id, None)
        if self.trace is not None:
            self._record_step(scheduled, started, result.forward_seconds, result.sample_seconds, finished_ids)
        self.step_index += 1
        return outputs

    def _check_stop(self, request: Request) -> RequestStatus | None:
        params = request.sampling_params
        token = request.output_token_ids[-1]
        state = self._text[request.request_id]
        state.text += state.detokenizer.add(token)
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if params.stop and self._truncate_at_stop_string(request, state):
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    @staticmethod
    def _truncate_at_stop_string(request: Request, state: _TextState) -> bool:
        params = request.sampling_params
        # Only the tail can hold a new match: the last token's text plus the longest stop string.
        search_from = max(0, state.num_emitted_chars - max(len(s) for s in params.stop))
        found = [(state.text.find(s, search_from), s) for s in params.stop]
        found = [(i, s) for i, s in found if i >= 0]
        if not found:
            return False
        index, stop = min(found)
        state.text = state.text[: index + len(stop)] if params.include_stop_str_in_output else state.text[:index]
        request.stop_reason = stop
        return True

    def _make_output(self, request: Request) -> RequestOutput:
        state = self._text.get(request.request_id)
        text, delta_text, delta_tokens = "", "", []
        if state is not None:
            visible = len(state.text) if request.is_finished else max(
                state.num_emitted_chars, len(state.text) - state.stop_holdback)
            text = state.text[:visible]
            delta_text = text[state.num_emitted_chars:]
            delta_tokens = request.output_token_ids[state.num_emitted_tokens:]
            state.num_emitted_chars, state.num_emitted_tokens = visible, request.num_output_tokens
        completion = CompletionOutput(
            index=0, text=text, token_ids=list(request.output_token_ids),
            finish_reason=request.status.finish_reason, stop_reason=request.stop_reason,
            logprobs=request.logprobs,
            cumulative_logprob=request.cumulative_logprob if request.logprobs is not None else None)
        metrics = RequestMetrics(arrival_time=request.arrival_time, first_scheduled_time=request.first_scheduled_time,
                                 first_token_time=request.first_token_time, finished_time=request.finished_time,
                                 num_preemptions=request.num_preemptions)
        return RequestOutput(request_id=request.request_id, prompt=request.prompt,
                             prompt_token_ids=request.prompt_token_ids, outputs=[completion],
                             finished=request.is_finished, metrics=metrics, delta_text=delta_text,
                             delta_token_ids=delta_tokens)

    def _record_step(self, output: SchedulerOutput, started: float, forward_seconds: float,
                     sample_seconds: float, finished_ids: list[str]) -> None:
        assert self.trace is not None
        entries = [ScheduledEntry(s.request.request_id, s.num_new_tokens, "decode" if s.is_decode else "prefill")
                   for s in output.scheduled]
        self.trace.append(StepRecord(
            step_index=self.step_index, start_time=started, duration=time.perf_counter() - started,
            forward_seconds=forward_seconds, sample_seconds=sample_seconds, scheduled=entries,
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_blocks_used=self.scheduler.kv_cache.num_used_blocks, kv_blocks_total=self.runner.num_kv_blocks,
            preempted=list(output.preempted_request_ids), finished=finished_ids))
