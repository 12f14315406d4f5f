"""What the engine returns for a request (shaped like vLLM's RequestOutput)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = most likely


# One generated position: token id -> Logprob, the chosen token first, then the top-N alternatives.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (not computed again)
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first.
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    # Streaming: the text and token ids added since the previous output of this request.
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)


class OutputTrimmer:
    """One request's outputs cut down to what changed since its previous output, for a hop that carries
    every output of the request in order (an engine process's pipe, a Serve stream), where
    `OutputRebuilder` makes them whole again. A whole output repeats the prompt's ids and the cumulative
    text, token ids and logprobs at every step: ~100 KB a step at 32 requests of W1, for ~3 KB of news.

    What a trimmed output keeps: `delta_text` and `delta_token_ids` (as every output has them), the
    logprobs of the new tokens only, the prompt (text, ids) and `prompt_logprobs` on the first output
    only (later ones send only positions scored since, none once the prompt is done), and the rest as is
    (finish and stop reason, cumulative logprob, metrics, cached tokens). `text` and `token_ids` are
    empty. One completion an output: an engine request's (n > 1 is split into requests above the engine).
    """

    def __init__(self) -> None:
        self.num_prompt_logprobs: int | None = None  # sent so far; None before the first output
        self.num_logprobs = 0

    def trim(self, output: RequestOutput) -> RequestOutput:
        completion = output.outputs[0]
        first = self.num_prompt_logprobs is None
        prompt_logprobs = output.prompt_logprobs
        if prompt_logprobs is not None:
            scored = len(prompt_logprobs)
            prompt_logprobs = prompt_logprobs[self.num_prompt_logprobs or 0:] or (
                [] if first else None)  # on the first output always: it says prompt logprobs are on
            self.num_prompt_logprobs = scored
        elif first:
            self.num_prompt_logprobs = 0
        logprobs = completion.logprobs
        if logprobs is not None:
            logprobs = logprobs[self.num_logprobs:]
            self.num_logprobs = len(completion.logprobs or ())
        trimmed = CompletionOutput(completion.index, "", [], completion.finish_reason, completion.stop_reason,
                                   logprobs, completion.cumulative_logprob)
        return RequestOutput(output.request_id, output.prompt if first else None,
                             output.prompt_token_ids if first else [], [trimmed], output.finished, output.metrics,
                             output.num_cached_tokens, prompt_logprobs, output.delta_text, output.delta_token_ids)


class OutputRebuilder:
    """One request's whole outputs again from `OutputTrimmer`'s, each a fresh object (a reader may keep
    an earlier output while the next is rebuilt)."""

    def __init__(self) -> None:
        self.first: RequestOutput | None = None  # the prompt's text and ids, from the first output
        self.prompt_logprobs: list[PositionLogprobs | None] | None = None
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[PositionLogprobs] | None = None

    def rebuild(self, trimmed: RequestOutput) -> RequestOutput:
        completion = trimmed.outputs[0]
        if self.first is None:
            self.first = trimmed
            self.prompt_logprobs = None if trimmed.prompt_logprobs is None else list(trimmed.prompt_logprobs)
            self.logprobs = None if completion.logprobs is None else []
        elif trimmed.prompt_logprobs and self.prompt_logprobs is not None:
            self.prompt_logprobs += trimmed.prompt_logprobs
        self.text += trimmed.delta_text
        self.token_ids += trimmed.delta_token_ids
        if self.logprobs is not None and completion.logprobs:
            self.logprobs += completion.logprobs
        whole = CompletionOutput(completion.index, self.text, list(self.token_ids), completion.finish_reason,
                                 completion.stop_reason, None if self.logprobs is None else list(self.logprobs),
                                 completion.cumulative_logprob)
        # The prompt's lists are shared from one output to the next, as the engine shares them.
        return RequestOutput(trimmed.request_id, self.first.prompt, self.first.prompt_token_ids, [whole],
                             trimmed.finished, trimmed.metrics, trimmed.num_cached_tokens, self.prompt_logprobs,
                             trimmed.delta_text, trimmed.delta_token_ids)
