"""Batched sampling with per-row parameters, against straightforward one-row references."""

from __future__ import annotations

import math

import pytest
import torch

from conveyor.engine.batch import CachedRequestState
from conveyor.engine.sampler import Sampler, SamplingMetadata, SamplingRow, apply_penalties, filtered_probs
from conveyor.engine.scheduler_output import NewRequestData
from conveyor.sampling_params import SamplingParams

VOCAB = 50
EOS = 1


def _request(prompt: list[int] | None = None, output: list[int] | None = None, **params: object) -> SamplingRow:
    """One row as the runner builds it: a seeded request gets its own generator, min_tokens bans EOS."""
    state = CachedRequestState.from_new_request(
        NewRequestData("r", prompt or [3, 4, 5], SamplingParams(**params), eos_token_ids=[EOS]))
    state.token_ids.extend(output or [])
    return state.sampling_row()


def _rows(*rows: SamplingRow) -> SamplingMetadata:
    return SamplingMetadata(list(rows))


@pytest.fixture
def logits() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(4, VOCAB) * 3


def test_greedy_is_argmax_and_top_k_1_or_tiny_top_p_match_it(logits: torch.Tensor) -> None:
    requests = [_request(temperature=0.0), _request(temperature=1.0, top_k=1),
                _request(temperature=1.0, top_p=1e-6, seed=1), _request(temperature=0.7, min_p=1.0, seed=2)]
    assert Sampler()(logits, SamplingMetadata(requests)).token_ids == logits.argmax(-1).tolist()


def test_top_k_top_p_min_p_keep_the_right_tokens(logits: torch.Tensor) -> None:
    row = logits[0:1]
    probs = filtered_probs(row, [SamplingParams(top_k=5)])
    assert (probs > 0).sum() == 5 and set(probs.nonzero()[:, 1].tolist()) == set(row.topk(5).indices[0].tolist())
    probs = filtered_probs(row, [SamplingParams(top_p=0.5)])
    kept = probs[0] > 0
    full = row.softmax(-1)[0]
    assert full[kept].sum() >= 0.5 and full[kept].sum() - full[kept].min() < 0.5  # smallest set reaching 0.5
    probs = filtered_probs(row, [SamplingParams(min_p=0.2)])
    assert torch.equal(probs[0] > 0, full >= 0.2 * full.max())


def test_penalties_match_their_definitions(logits: torch.Tensor) -> None:
    row = logits[0:1]
    request = _request(prompt=[2, 3], output=[3, 7, 7], repetition_penalty=1.5, presence_penalty=0.5,
                       frequency_penalty=0.25)
    expected = row.clone()[0]
    for token in {2, 3, 7}:  # repetition: prompt and output tokens
        expected[token] = expected[token] / 1.5 if expected[token] > 0 else expected[token] * 1.5
    for token, count in {3: 1, 7: 2}.items():  # presence and frequency: output tokens only
        expected[token] -= 0.5 + 0.25 * count
    assert torch.allclose(apply_penalties(row, _rows(request))[0], expected)


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS], logits[0, 9] = 10.0, 9.0
    early = _request(temperature=0.0, min_tokens=2, stop_token_ids=[9], output=[4])
    assert Sampler()(logits, _rows(early)).token_ids[0] not in (EOS, 9)
    done = _request(temperature=0.0, min_tokens=1, output=[4])
    assert Sampler()(logits, _rows(done)).token_ids == [EOS]


def test_seeded_rows_do_not_depend_on_the_batch(logits: torch.Tensor) -> None:
    sampler = Sampler()
    solo = _request(seed=42)
    alone = [sampler(logits[3:4], _rows(solo)).token_ids[0] for _ in range(8)]
    torch.manual_seed(123)  # unseeded neighbours draw from the global generator; that must not matter
    batch = [_request(temperature=0.0), _request(), _request(seed=7), _request(seed=42)]
    mixed = [sampler(logits, SamplingMetadata(batch)).token_ids[3] for _ in range(8)]
    assert mixed == alone
    other = _request(seed=43)
    assert [sampler(logits[3:4], _rows(other)).token_ids[0] for _ in range(8)] != alone


def test_logprobs_are_from_the_raw_distribution(logits: torch.Tensor) -> None:
    requests = [_request(temperature=0.0, logprobs=3), _request(temperature=0.5, seed=1, repetition_penalty=2.0,
                                                                 logprobs=0), _request(temperature=0.0)]
    output = Sampler()(logits[:3], SamplingMetadata(requests))
    raw = torch.log_softmax(logits[:3], -1)
    assert output.logprobs is not None and output.logprobs[2] is None
    for row in (0, 1):
        position = output.logprobs[row]
        token = output.token_ids[row]
        assert list(position)[0] == token
        assert math.isclose(position[token].logprob, raw[row, token].item(), rel_tol=1e-5)
        assert position[token].rank == int((raw[row] > raw[row, token]).sum()) + 1
    top = output.logprobs[0]
    assert [lp.rank for lp in top.values()] == [1, 2, 3]
    assert list(top) == raw[0].topk(3).indices.tolist()
    assert len(output.logprobs[1]) == 1  # logprobs=0: just the chosen token


def test_unseeded_sampling_follows_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    sampler = Sampler()
    counts = torch.zeros(4)
    for _ in range(4000):
        counts[sampler(logits, _rows(_request(temperature=1.0))).token_ids[0]] += 1
    assert torch.allclose(counts / 4000, logits.softmax(-1)[0], atol=0.03)
