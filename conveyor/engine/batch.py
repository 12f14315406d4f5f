"""SchedulerOutput + the runner's per-request state -> the flat tensors of one forward pass and the
step's sampling metadata.

The step's tokens are concatenated with no padding: `input_ids[T]`, `positions[T]`; each request's share
becomes a `SequenceSpan`, from which `conveyor.model.attention` builds the slot mapping and the attention
metadata. Only the last row of a request that samples this step is projected to logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import llguidance
import torch

from conveyor.engine.sampler import SamplingMetadata, SamplingRow
from conveyor.engine.scheduler_output import NewRequestData, SchedulerOutput
from conveyor.engine.structured_output import GrammarCompiler
from conveyor.model.attention import AttentionMetadata, SequenceSpan, build_attention_metadata
from conveyor.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class CachedRequestState:
    """The runner's own copy of a request, kept from its first step to its last and updated from deltas:
    its tokens (the runner appends what it samples), its block table and how it samples."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    eos_token_ids: list[int]
    block_ids: list[int]
    generator: torch.Generator | None  # a seeded request's own: same tokens whatever the batch holds
    # Structured output: this sequence's own grammar state, advanced with each token appended.
    matcher: llguidance.LLMatcher | None = None
    grammar: GrammarCompiler | None = None

    @classmethod
    def from_new_request(cls, data: NewRequestData, grammar: GrammarCompiler | None = None) -> CachedRequestState:
        params = data.sampling_params
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator()
            generator.manual_seed(params.seed)
        matcher = None
        if params.structured_outputs is not None:
            assert grammar is not None, "structured outputs need the engine's grammar compiler"
            matcher = grammar.new_matcher(params.structured_outputs)
        return cls(data.request_id, list(data.prompt_token_ids), len(data.prompt_token_ids), params,
                   list(data.eos_token_ids), [], generator, matcher, grammar)

    def sampling_row(self) -> SamplingRow:
        params = self.sampling_params
        banned: list[int] = []
        if len(self.token_ids) - self.num_prompt_tokens < params.min_tokens:
            banned = sorted(set(self.eos_token_ids) | set(params.stop_token_ids))
        bitmask = None
        if self.matcher is not None and self.grammar is not None:
            bitmask = self.grammar.fill_bitmask(self.matcher)
            banned = []  # the grammar decides when the output may end
        return SamplingRow(params, self.token_ids, self.num_prompt_tokens, banned, self.generator, bitmask)

    def append_token(self, token: int) -> bool:
        """Append a sampled token; True when the grammar (if any) is complete and nothing may follow."""
        self.token_ids.append(token)
        if self.matcher is None:
            return False
        if not self.matcher.consume_token(token):
            logger.warning("request %s: the grammar rejected token %d (%s); stopping it", self.request_id, token,
                           self.matcher.get_error())
            return True
        return self.matcher.is_stopped()


def apply_scheduler_output(states: dict[str, CachedRequestState], output: SchedulerOutput,
                           grammar: GrammarCompiler | None = None) -> None:
    """Bring the runner's per-request states up to date with a step's deltas: drop finished requests,
    forget preempted tables (their tokens, and so their grammar state, stay: they recompute), add new
    requests, extend block tables."""
    for request_id in output.finished_request_ids:
        states.pop(request_id, None)
    for request_id in output.preempted_request_ids:
        states[request_id].block_ids.clear()
    for data in output.new_requests:
        states[data.request_id] = CachedRequestState.from_new_request(data, grammar)
    for scheduled in output.scheduled:
        states[scheduled.request_id].block_ids.extend(scheduled.new_block_ids)


@dataclass(frozen=True)
class PromptLogprobsSpan:
    """A request's prompt positions `start..start+count-1` in this step, each scoring the prompt token after
    it, at flat rows `first_row..first_row+count-1`."""

    request_id: str
    start: int
    count: int
    first_row: int
    target_ids: list[int]  # the prompt tokens scored: positions start+1 .. start+count
    num_top: int


@dataclass
class ModelInput:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attention: AttentionMetadata
    logits_indices: torch.Tensor  # [S] last row of each request that samples this step
    sampling_request_ids: list[str]  # row i of the logits belongs to this request
    sampling: SamplingMetadata
    prompt_logprobs: list[PromptLogprobsSpan]  # empty unless a request in the step asked for them


def build_model_input(output: SchedulerOutput, states: dict[str, CachedRequestState], block_size: int,
                      sliding_window: int | None, device: torch.device) -> ModelInput:
    input_ids: list[int] = []
    positions: list[int] = []
    spans: list[SequenceSpan] = []
    logits_indices: list[int] = []
    sampling_states: list[CachedRequestState] = []
    prompt_spans: list[PromptLogprobsSpan] = []
    for scheduled in output.scheduled:
        state = states[scheduled.request_id]
        start, end = scheduled.start, scheduled.end
        assert end <= len(state.token_ids), f"{scheduled.request_id}: tokens {start}..{end} are not all known"
        num_top = state.sampling_params.prompt_logprobs
        last = min(end, state.num_prompt_tokens - 1)  # the last prompt position scores no prompt token
        if num_top is not None and start < last:
            prompt_spans.append(PromptLogprobsSpan(state.request_id, start, last - start, len(input_ids),
                                                   state.token_ids[start + 1:last + 1], num_top))
        spans.append(SequenceSpan(len(input_ids), start, end, state.block_ids))
        input_ids.extend(state.token_ids[start:end])
        positions.extend(range(start, end))
        if scheduled.samples:
            logits_indices.append(len(input_ids) - 1)
            sampling_states.append(state)
    # One tensor (one copy to an accelerator) viewed three ways: a decode step is a handful of ints.
    num_tokens = len(input_ids)
    packed = torch.tensor(input_ids + positions + logits_indices, dtype=torch.long, device=device)
    return ModelInput(
        input_ids=packed[:num_tokens],
        positions=packed[num_tokens:2 * num_tokens],
        attention=build_attention_metadata(spans, block_size, sliding_window, device),
        logits_indices=packed[2 * num_tokens:],
        sampling_request_ids=[state.request_id for state in sampling_states],
        sampling=SamplingMetadata([state.sampling_row() for state in sampling_states]),
        prompt_logprobs=prompt_spans,
    )
