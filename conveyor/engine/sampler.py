"""Batched sampling over the rows of one step, each row with its own parameters.

Policy, in order (vLLM's semantics): penalties (repetition over prompt + output; presence and frequency
over output), logit biases, the structured-output grammar mask (rows that have one), the min_tokens mask
on EOS and stop ids, then greedy rows take the argmax and the others go through temperature, top-k, top-p
and min-p before drawing. A seeded request draws from its own generator, so its tokens do not depend on
the rest of the batch. Log-probabilities are reported from the raw model distribution (before any of
these transforms). A transform no row uses is skipped entirely.

The logits come in the model's dtype (a bf16 model's lm_head makes bf16 logits): the transforms that
compute on them (penalties, biases) and the log-probabilities run in fp32, as before, but a step that
needs neither never copies its logits to fp32 (for 32 rows of a 262k vocabulary, a fresh 32 MiB buffer):
a greedy row's argmax reads them as they are, which picks the same token (widening bf16 to fp32 is exact).
The argmax itself is `conveyor.model.argmax`'s (a vectorized kernel on a CPU; torch's elsewhere).

The sampler sees one `SamplingMetadata` value per step (per-row parameters, token histories and
generators), never a request object, so it can be tested with plain lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from conveyor.engine.structured_output import unpack_bitmasks
from conveyor.model.argmax import ArgmaxRows, torch_argmax
from conveyor.outputs import Logprob
from conveyor.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingRow:
    """One row of the logits: how its request samples and what it has seen so far."""

    params: SamplingParams
    token_ids: Sequence[int]  # prompt + output so far (for the repetition penalty)
    num_prompt_tokens: int
    banned_token_ids: Sequence[int] = ()  # EOS and stop ids while the request is short of min_tokens
    generator: torch.Generator | None = None  # a seeded request's own generator
    token_bitmask: torch.Tensor | None = None  # structured output: int32 bits of the allowed next tokens

    @property
    def output_token_ids(self) -> Sequence[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass(frozen=True)
class SamplingMetadata:
    """A whole step's sampling inputs: row i describes row i of the logits."""

    rows: list[SamplingRow]

    @property
    def params(self) -> list[SamplingParams]:
        return [row.params for row in self.rows]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row (None where not asked): the chosen token first, then the top-N alternatives.
    logprobs: list[dict[int, Logprob] | None] | None = None


class Sampler:
    def __init__(self, argmax: ArgmaxRows = torch_argmax) -> None:
        self.argmax = argmax  # what greedy rows take: the same index whatever computes it

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        params = metadata.params
        raw_logprobs = None
        if any(p.logprobs is not None for p in params):
            raw_logprobs = torch.log_softmax(logits.float(), dim=-1)
        if any(p.logit_bias or p.repetition_penalty != 1.0 or p.presence_penalty != 0.0
               or p.frequency_penalty != 0.0 for p in params):
            logits = logits.float()  # the arithmetic transforms add and scale in fp32 (a no-op on fp32 logits)
            logits = apply_penalties(logits, metadata)
            logits = apply_logit_bias(logits, metadata)
        # The masks only set -inf, exact in any dtype; random rows are cast to fp32 in `sample`.
        logits = apply_grammar_masks(logits, metadata)
        logits = mask_early_stops(logits, metadata)
        token_ids = sample(logits, metadata, self.argmax)
        logprobs = None if raw_logprobs is None else gather_logprobs(raw_logprobs, token_ids, metadata)
        return SamplerOutput(token_ids.tolist(), logprobs)


def _row_tensor(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def apply_penalties(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    params = metadata.params
    use_repetition = any(p.repetition_penalty != 1.0 for p in params)
    use_additive = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)
    if not (use_repetition or use_additive):
        return logits
    logits = logits.clone()
    vocab = logits.shape[1]
    device = logits.device
    if use_repetition:
        seen = torch.zeros_like(logits, dtype=torch.bool)
        for row, sampling_row in enumerate(metadata.rows):
            ids = [t for t in sampling_row.token_ids if t < vocab]
            seen[row, torch.tensor(ids, dtype=torch.long, device=device)] = True
        penalty = _row_tensor([p.repetition_penalty for p in params], logits).expand_as(logits)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    if use_additive:
        counts = torch.zeros_like(logits)
        for row, sampling_row in enumerate(metadata.rows):
            if sampling_row.output_token_ids:
                ids = torch.tensor(list(sampling_row.output_token_ids), dtype=torch.long, device=device)
                counts[row].scatter_add_(0, ids, torch.ones_like(ids, dtype=counts.dtype))
        frequency = _row_tensor([p.frequency_penalty for p in params], logits)
        presence = _row_tensor([p.presence_penalty for p in params], logits)
        logits = logits - frequency * counts - presence * (counts > 0).to(logits.dtype)
    return logits


def apply_grammar_masks(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Structured-output rows keep only the tokens their grammar allows. Only those rows are touched:
    an unconstrained neighbour costs nothing."""
    rows = [row for row, sampling_row in enumerate(metadata.rows) if sampling_row.token_bitmask is not None]
    if not rows:
        return logits
    bitmasks = torch.stack([metadata.rows[row].token_bitmask for row in rows])  # type: ignore[misc]
    allowed = unpack_bitmasks(bitmasks.to(logits.device), logits.shape[1])
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return logits


def apply_logit_bias(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Add each row's `logit_bias` to its tokens' logits, in place: one indexed add for the whole step.
    NOTE: not a copy: cloning a step's logits (rows x a 262k vocabulary) would cost far more than the add,
    and the sampler's caller never reads them again (the raw logprobs are taken before)."""
    rows, ids, biases = [], [], []
    for row, params in enumerate(metadata.params):
        for token, bias in (params.logit_bias or {}).items():
            rows.append(row)
            ids.append(token)
            biases.append(bias)
    if not rows:
        return logits
    index = (torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device))
    logits.index_put_(index, torch.tensor(biases, dtype=logits.dtype, device=logits.device), accumulate=True)
    return logits


def mask_early_stops(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Until a request has min_tokens outputs, it cannot pick EOS or one of its stop token ids."""
    rows, ids = [], []
    for row, sampling_row in enumerate(metadata.rows):
        for token in sampling_row.banned_token_ids:
            if token < logits.shape[1]:
                rows.append(row)
                ids.append(token)
    if not rows:
        return logits
    logits = logits.clone()
    logits[torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device)] = float("-inf")
    return logits


def sample(logits: torch.Tensor, metadata: SamplingMetadata, argmax: ArgmaxRows = torch_argmax) -> torch.Tensor:
    token_ids = argmax(logits)
    random_rows = [index for index, row in enumerate(metadata.rows) if not row.params.greedy]
    if not random_rows:
        return token_ids
    index = torch.tensor(random_rows, device=logits.device)
    chosen = [metadata.rows[row] for row in random_rows]
    probs = filtered_probs(logits[index].float(), [row.params for row in chosen])
    # Exponential race: argmax(p / q) with q ~ Exp(1) draws from p. Each row's q comes from its own
    # generator when seeded, so a seeded row's draw does not depend on its neighbours.
    noise = torch.empty_like(probs, device="cpu")
    for row, sampling_row in enumerate(chosen):
        noise[row].exponential_(generator=sampling_row.generator)
    token_ids[index] = (probs / noise.to(probs.device)).argmax(dim=-1)
    return token_ids


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p (each only if some row uses it); returns probabilities."""
    logits = logits / _row_tensor([p.temperature for p in params], logits)
    if any(p.top_k > 0 for p in params) or any(p.top_p < 1.0 for p in params):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[1]
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=logits.device)
        remove = ranks >= top_k.unsqueeze(1)
        sorted_probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        remove |= mass_before >= _row_tensor([p.top_p for p in params], logits)
        remove[:, 0] = False
        logits = logits.scatter(1, order, sorted_logits.masked_fill(remove, float("-inf")))
    probs = logits.softmax(dim=-1)
    if any(p.min_p > 0.0 for p in params):
        min_p = _row_tensor([p.min_p for p in params], probs)
        probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs


def gather_logprobs(raw_logprobs: torch.Tensor, token_ids: torch.Tensor,
                    metadata: SamplingMetadata) -> list[dict[int, Logprob] | None]:
    return position_logprobs(raw_logprobs, token_ids, [p.logprobs for p in metadata.params])


def position_logprobs(raw_logprobs: torch.Tensor, token_ids: torch.Tensor,
                      counts: list[int | None]) -> list[dict[int, Logprob] | None]:
    """Per row: `token_ids[row]`'s logprob and rank, then the top `counts[row]` alternatives (None where
    `counts[row]` is None)."""
    wanted = max(count or 0 for count in counts)
    top_values, top_ids = raw_logprobs.topk(max(wanted, 1), dim=-1)
    chosen = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    ranks = (raw_logprobs > chosen.unsqueeze(1)).sum(dim=-1) + 1
    chosen_list, rank_list = chosen.tolist(), ranks.tolist()
    top_values_list, top_ids_list = top_values.tolist(), top_ids.tolist()
    token_list = token_ids.tolist()
    result: list[dict[int, Logprob] | None] = []
    for row, count in enumerate(counts):
        if count is None:
            result.append(None)
            continue
        token = token_list[row]
        position = {token: Logprob(chosen_list[row], rank_list[row])}
        for rank, (alt, value) in enumerate(zip(top_ids_list[row][:count], top_values_list[row][:count]), 1):
            position.setdefault(alt, Logprob(value, rank))
        result.append(position)
    return result
