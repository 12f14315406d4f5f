"""The search on a synthetic cost model: the highest rate meeting the SLOs, and candidates that cannot."""

from __future__ import annotations

import pytest

from conveyor.bench.workloads import w1_requests
from conveyor.config import EngineConfig, ModelConfig
from conveyor.tune.cost_model import AttentionShape, CostModel
from conveyor.tune.search import MAX_HALVINGS, Candidate, Slo, Tuner, rank
from conveyor.tune.workloads import w2_workload

MODEL = ModelConfig(architecture="llama", vocab_size=1000, hidden_size=8, intermediate_size=16, num_layers=2,
                    num_heads=2, num_kv_heads=1, head_dim=4, rms_norm_eps=1e-6, rope_theta=1e4,
                    max_position_embeddings=4096)
# 10 ms a step plus 1 ms a token: a 512-token prompt alone takes 0.52 s.
COST = CostModel(AttentionShape(16, 2), (0.010, 0.001, 0, 0, 0, 0, 0, 0))


def _tuner(slo: Slo, margin: float = 0.0) -> Tuner:
    workload = w2_workload(w1_requests(seed=1, num_requests=24, max_output=32), burstiness=1.0, seed=1)
    return Tuner(EngineConfig(dtype="float32"), "model", MODEL, COST, workload, slo, margin=margin)


def test_the_highest_rate_is_where_the_slo_stops_holding() -> None:
    tuner = _tuner(Slo(ttft=1.0, itl=None))
    evaluation = tuner.evaluate(Candidate(8, 512), rate_hint=1.0)
    assert evaluation.max_rate > 0 and not evaluation.unbounded
    assert evaluation.best is not None and evaluation.best.summary["ttft_s"]["p99"] <= 1.0
    meets_above = [p.meets_slo for p in evaluation.points if p.rate > evaluation.max_rate]
    assert meets_above and not any(meets_above)
    slightly_more, _ = tuner.run(Candidate(8, 512), evaluation.max_rate * 1.05)
    assert not tuner.slo.met_by(slightly_more)


def test_a_candidate_that_misses_even_unloaded_is_given_up_quickly() -> None:
    tuner = _tuner(Slo(ttft=0.1, itl=None))  # no 512-token prompt can start in 100 ms
    evaluation = tuner.evaluate(Candidate(8, 512), rate_hint=1.0)
    assert evaluation.max_rate == 0.0 and len(evaluation.points) == MAX_HALVINGS + 1


def test_a_tighter_step_budget_wins_an_itl_slo_and_the_ranking_says_so() -> None:
    # Long chunks stretch every decode step beside them: 1024-token steps take up to 1.03 s.
    tuner = _tuner(Slo(ttft=None, itl=0.3))
    small, large = tuner.evaluate(Candidate(8, 128), 1.0), tuner.evaluate(Candidate(8, 1024), 1.0)
    assert small.max_rate > large.max_rate
    assert rank([large, small]) == [small, large]


def test_a_kv_pool_too_small_for_a_request_is_reported_not_raised() -> None:
    evaluation = _tuner(Slo()).evaluate(Candidate(8, 512, kv_cache_memory="1KiB"), 1.0)
    assert evaluation.max_rate == 0 and "the whole KV pool holds 16 tokens" in evaluation.error
    assert evaluation.shown is None


def test_the_margin_tightens_every_objective_and_rejects_nonsense() -> None:
    tight = Slo(ttft=2.0, tpot=None, itl=0.3).with_margin(0.1)
    assert tight.ttft == pytest.approx(1.8) and tight.itl == pytest.approx(0.27) and tight.tpot is None
    for margin in (-0.1, 1.0):
        with pytest.raises(ValueError, match="the SLO margin must be in"):
            Slo().with_margin(margin)


def test_the_search_keeps_its_margin_under_the_slo_but_judges_nothing_else_by_it() -> None:
    candidate, rate = Candidate(8, 512), 1.0
    _, summary = _tuner(Slo(ttft=None, itl=None)).run(candidate, rate)
    p99 = summary["ttft_s"]["p99"]
    # An SLO 5% above the simulated p99: met with no margin, missed with a 10% one.
    slo = Slo(ttft=1.05 * p99, itl=None)
    assert _tuner(slo).evaluate_at(candidate, rate).max_rate == rate
    with_margin = _tuner(slo, margin=0.1)
    assert with_margin.evaluate_at(candidate, rate).max_rate == 0.0
    assert with_margin.slo == slo and with_margin.search_slo.ttft == pytest.approx(0.945 * p99)
    # the same margin carries over to the prediction at another step cost
    assert with_margin.at_step_cost(1.0).search_slo == with_margin.search_slo
