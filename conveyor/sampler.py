"""Batched sampling over the rows of one step, each row with its own parameters.

Policy, in order (vLLM's semantics): penalties (repetition over prompt + output; presence and frequency
over output), the min_tokens mask on EOS and stop ids, then greedy rows take the argmax and the others go
through temperature, top-k, top-p and min-p before drawing. A seeded request draws from its own
generator, so its tokens do not depend on the rest of the batch. Log-probabilities are reported from the
raw model distribution (before any of these transforms). A transform no row uses is skipped entirely.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from conveyor.engine.request import Request
from conveyor.outputs import Logprob


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row (None where not asked): the chosen token first, then the top-N alternatives.
    logprobs: list[dict[int, Logprob] | None] | None = None


class Sampler:
    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        raw_logprobs = None
        if any(r.sampling_params.logprobs is not None for r in requests):
            raw_logprobs = torch.log_softmax(logits.float(), dim=-1)
        logits = apply_penalties(logits, requests)
        logits = mask_early_stops(logits, requests)
        token_ids = sample(logits, requests)
        logprobs = None if raw_logprobs is None else gather_logprobs(raw_logprobs, token_ids, requests)
        return SamplerOutput(token_ids.tolist(), logprobs)


def _row_tensor(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    params = [r.sampling_params for r in requests]
    use_repetition = any(p.repetition_penalty != 1.0 for p in params)
    use_additive = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)
    if not (use_repetition or use_additive):
        return logits
    logits = logits.clone()
    vocab = logits.shape[1]
    device = logits.device
    if use_repetition:
        seen = torch.zeros_like(logits, dtype=torch.bool)
        for row, request in enumerate(requests):
            ids = [t for t in request.all_token_ids if t < vocab]
            seen[row, torch.tensor(ids, dtype=torch.long, device=device)] = True
        penalty = _row_tensor([p.repetition_penalty for p in params], logits).expand_as(logits)
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits = torch.where(seen, penalized, logits)
    if use_additive:
        counts = torch.zeros_like(logits)
        for row, request in enumerate(requests):
            if request.output_token_ids:
                ids = torch.tensor(request.output_token_ids, dtype=torch.long, device=device)
                counts[row].scatter_add_(0, ids, torch.ones_like(ids, dtype=counts.dtype))
        frequency = _row_tensor([p.frequency_penalty for p in params], logits)
        presence = _row_tensor([p.presence_penalty for p in params], logits)
        logits = logits - frequency * counts - presence * (counts > 0).to(logits.dtype)
    return logits


def mask_early_stops(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Until a request has min_tokens outputs, it cannot pick EOS or one of its stop token ids."""
    rows, ids = [], []
    for row, request in enumerate(requests):
        params = request.sampling_params
        if request.num_output_tokens < params.min_tokens:
            for token in set(request.eos_token_ids) | set(params.stop_token_ids):
                if token < logits.shape[1]:
                    rows.append(row)
                    ids.append(token)
    if not rows:
        return logits
    logits = logits.clone()
    logits[torch.tensor(rows, device=logits.device), torch.tensor(ids, device=logits.device)] = float("-inf")
    return logits


def sample(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    token_ids = logits.argmax(dim=-1)
    random_rows = [row for row, r in enumerate(requests) if not r.sampling_params.greedy]
    if not random_rows:
        return token_ids
    index = torch.tensor(random_rows, device=logits.device)
    chosen = [requests[row] for row in random_rows]
    probs = filtered_probs(logits[index].float(), chosen)
    # Exponential race: argmax(p / q) with q ~ Exp(1) draws from p. Each row's q comes from its own
    # generator when seeded, so a seeded row's draw does not depend on its neighbours.
    noise = torch.empty_like(probs, device="cpu")
    for row, request in enumerate(chosen):
        noise[row].exponential_(generator=request.generator)
    token_ids[index] = (probs / noise.to(probs.device)).argmax(dim=-1)
    return token_ids


def filtered_probs(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p (each only if some row uses it); returns probabilities."""
    params = [r.sampling_params for r in requests]
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
                    requests: list[Request]) -> list[dict[int, Logprob] | None]:
    wanted = max(r.sampling_params.logprobs or 0 for r in requests)
    top_values, top_ids = raw_logprobs.topk(max(wanted, 1), dim=-1)
    chosen = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    ranks = (raw_logprobs > chosen.unsqueeze(1)).sum(dim=-1) + 1
    chosen_list, rank_list = chosen.tolist(), ranks.tolist()
    top_values_list, top_ids_list = top_values.tolist(), top_ids.tolist()
    result: list[dict[int, Logprob] | None] = []
    for row, request in enumerate(requests):
        count = request.sampling_params.logprobs
        if count is None:
            result.append(None)
            continue
        token = int(token_ids[row])
        position = {token: Logprob(chosen_list[row], rank_list[row])}
        for rank, (alt, value) in enumerate(zip(top_ids_list[row][:count], top_values_list[row][:count]), 1):
            position.setdefault(alt, Logprob(value, rank))
        result.append(position)
    return result
