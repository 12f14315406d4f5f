"""Turns sampled tokens into what callers see: detokenized text, stop checks, `RequestOutput`s.

One place for all of it: the engine hands every request that got a token here, learns whether it must
stop, and gets back an output whose `delta_text` / `delta_token_ids` say what is new since the last one.
While streaming, text that might be the start of a stop string is held back until it is known not to be.
"""

from __future__ import annotations

from dataclasses import dataclass

from conveyor.engine.request import Request, RequestStatus
from conveyor.outputs import CompletionOutput, RequestMetrics, RequestOutput
from conveyor.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class _TextState:
    """Detokenized text of one request and how much of it has been handed out."""

    detokenizer: IncrementalDetokenizer
    text: str = ""
    num_emitted_chars: int = 0
    num_emitted_tokens: int = 0
    stop_holdback: int = 0  # chars kept back while streaming: they might start a stop string


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self._text: dict[str, _TextState] = {}

    def add_request(self, request: Request) -> None:
        params = request.sampling_params
        detokenizer = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
        holdback = max((len(s) for s in params.stop), default=1) - 1
        self._text[request.request_id] = _TextState(detokenizer, stop_holdback=holdback)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._text

    def process_token(self, request: Request) -> RequestStatus | None:
        """Detokenize the request's newest token; the finished status if it must stop now, else None."""
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

    def make_output(self, request: Request) -> RequestOutput:
        """The request's output now; a finished request's text state is released."""
        state = self._text.get(request.request_id)
        text, delta_text, delta_tokens = "", "", []
        if state is not None:
            visible = len(state.text) if request.is_finished else max(
                state.num_emitted_chars, len(state.text) - state.stop_holdback)
            text = state.text[:visible]
            delta_text = text[state.num_emitted_chars:]
            delta_tokens = request.output_token_ids[state.num_emitted_tokens:]
            state.num_emitted_chars, state.num_emitted_tokens = visible, request.num_output_tokens
        if request.is_finished:
            self._text.pop(request.request_id, None)
        completion = CompletionOutput(
            index=0, text=text, token_ids=list(request.output_token_ids),
            finish_reason=request.status.finish_reason, stop_reason=request.stop_reason,
            # a copy: the request's list grows with the next step while a server still reads this output
            logprobs=None if request.logprobs is None else list(request.logprobs),
            cumulative_logprob=request.cumulative_logprob if request.logprobs is not None else None)
        metrics = RequestMetrics(arrival_time=request.arrival_time, first_scheduled_time=request.first_scheduled_time,
                                 first_token_time=request.first_token_time, finished_time=request.finished_time,
                                 num_preemptions=request.num_preemptions)
        return RequestOutput(request_id=request.request_id, prompt=request.prompt,
                             prompt_token_ids=request.prompt_token_ids, outputs=[completion],
                             finished=request.is_finished, metrics=metrics, delta_text=delta_text,
                             delta_token_ids=delta_tokens, num_cached_tokens=request.num_cached_tokens or 0,
                             prompt_logprobs=request.prompt_logprobs)

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
