"""Validation judges real runs as the search judges simulated ones, and the server-overhead term: its fit and
its effect on the simulation."""

from __future__ import annotations

import argparse
import asyncio
import json

import httpx
import numpy as np
import pytest

from conveyor.bench.serve import RequestResult
from conveyor.bench.workloads import w1_requests
from conveyor.config import EngineConfig
from conveyor.tune.cli import describe_overhead
from conveyor.tune.cost_model import RowShape, ServerOverhead, is_few_row_step
from conveyor.tune.overhead import (
    _read_steps,
    at_rate,
    fit_overhead,
    fit_request_seconds,
    fit_step_cost,
    outside_engine_seconds,
    step_factor_by_kind,
)
from conveyor.tune.profile import OVERHEAD_HISTORY, OVERHEAD_REVISION, Profile
from conveyor.tune.search import Candidate, Evaluation, Slo, Tuner
from conveyor.tune.simulator import SimRequest, simulate
from conveyor.tune.validate import (
    at_the_runs_speed,
    beats_measured,
    format_comparison,
    mean_over_rounds,
    ranking_report,
    run_overhead,
    validate,
    validated_score,
    validation_rates,
)
from conveyor.tune.workloads import w2_workload
from tests.test_tune_search import COST, MODEL
from tests.test_tune_simulator import _config, _ten_ms_plus_one_per_token

SMALL, DEFAULT = Candidate(8, 128), Candidate(64, 1024)


def _summary(ttft_p99: float, itl_p99: float, goodput: float, failed: int = 0) -> dict:
    return {"ttft_s": {"p50": ttft_p99 / 2, "p90": ttft_p99, "p99": ttft_p99},
            "tpot_s": {"p50": 0.1, "p90": 0.1, "p99": 0.1}, "itl_s": {"p50": 0.1, "p90": itl_p99, "p99": itl_p99},
            "goodput": goodput, "failed": failed}


SLO = Slo()  # p99 TTFT <= 2 s, p99 ITL <= 300 ms


def _row(candidate: Candidate, rate: float, measured: dict, predicted: dict) -> dict:
    return {"candidate": candidate.settings(), "rate": rate, "predicted": predicted, "measured": measured,
            "predicted_meets_slo": SLO.met_by_summary(predicted), "measured_meets_slo": SLO.met_by_summary(measured)}


def test_a_summary_meets_the_slo_exactly_when_the_simulated_run_does() -> None:
    workload = w2_workload(w1_requests(seed=1, num_requests=16, max_output=32), burstiness=1.0, seed=1)
    for slo in (Slo(ttft=1.0, itl=0.3), Slo(ttft=None, itl=0.1), Slo(ttft=0.6, itl=None, tpot=0.05, percentile=90)):
        tuner = Tuner(EngineConfig(), "model", MODEL, COST, workload, slo)
        verdicts = set()
        for rate in (0.5, 2.0, 8.0):
            run, summary = tuner.run(SMALL, rate)
            assert slo.met_by_summary(summary) == slo.met_by(run)
            verdicts.add(slo.met_by(run))
        assert verdicts == {True, False}  # the rates straddle the limit: both answers are exercised
    assert not Slo().met_by_summary(_summary(0.5, 0.1, 1.0, failed=1))  # a failed request misses
    with pytest.raises(ValueError, match="--slo-percentile 50, 90 or 99"):
        Slo(percentile=95).met_by_summary(_summary(0.5, 0.1, 1.0))


def test_the_tuned_candidate_wins_where_it_meets_the_slo_and_the_default_does_not() -> None:
    # At 0.4 req/s the default has more goodput per request (its ITL spikes do not count there) but misses
    # the ITL SLO: the search's criterion prefers the small step budget, and so must validation.
    rows = [_row(SMALL, 0.4, _summary(1.5, 0.28, 0.35), _summary(1.4, 0.27, 0.36)),
            _row(DEFAULT, 0.4, _summary(1.2, 0.9, 0.39), _summary(1.1, 0.8, 0.39))]
    small, default = validated_score(rows, SMALL.settings(), "measured"), validated_score(rows, DEFAULT.settings(),
                                                                                           "measured")
    assert small == (0.4, 0.35) and default == (0.0, 0.39)
    assert beats_measured(small, default) and not beats_measured(default, small)
    report = ranking_report(rows, [SMALL, DEFAULT])
    assert "matches" in report and report.index("seqs   8") < report.index("seqs  64")


def test_a_goodput_gain_within_the_noise_keeps_the_default() -> None:
    rows = [_row(SMALL, 0.4, _summary(1.5, 0.2, 0.40), _summary(1.4, 0.2, 0.40)),
            _row(DEFAULT, 0.4, _summary(1.2, 0.2, 0.39), _summary(1.1, 0.2, 0.40))]
    small, default = validated_score(rows, SMALL.settings(), "measured"), validated_score(rows, DEFAULT.settings(),
                                                                                           "measured")
    assert small[0] == default[0] == 0.4 and not beats_measured(small, default)  # 2.6% more: noise
    assert beats_measured((0.4, 0.45), default)  # 15% more: a gain
    assert not beats_measured((0.0, 0.9), (0.0, 0.1))  # meeting the SLOs nowhere is no win, whatever the goodput


def test_the_ranking_differs_when_the_measured_order_contradicts_the_prediction() -> None:
    rows = [_row(SMALL, 0.4, _summary(1.5, 0.5, 0.35), _summary(1.4, 0.27, 0.36)),
            _row(DEFAULT, 0.4, _summary(1.2, 0.2, 0.39), _summary(1.1, 0.8, 0.39))]
    assert "DIFFERS" in ranking_report(rows, [SMALL, DEFAULT])


def test_validation_runs_below_the_winners_predicted_limit_unless_told() -> None:
    args = argparse.Namespace(validate_rates=None, rate_hint=1.0)
    winner, default = Evaluation(SMALL, max_rate=0.48), Evaluation(DEFAULT, max_rate=0.17)
    assert validation_rates(args, [winner], default, None) == [pytest.approx(0.408)]
    assert validation_rates(args, [winner], default, 0.5) == [0.5]
    assert validation_rates(argparse.Namespace(validate_rates=[0.5, 1.0], rate_hint=1.0), [winner], default,
                            None) == [0.5, 1.0]


def test_the_admission_delay_adds_to_ttft_and_delays_the_scheduler() -> None:
    # Without delay: a (6 tokens) runs alone in step 1: 16 ms. b arrives at 10 ms: its 3 tokens in step 2.
    requests = [SimRequest("a", 0.0, list(range(10, 16)), 1), SimRequest("b", 0.010, [20, 21, 22], 1)]
    config = _config(max_num_batched_tokens=16, prefill_chunk_share=1)
    plain = {r.request.request_id: r.ttft for r in simulate(config, _ten_ms_plus_one_per_token, requests).results}
    assert plain == pytest.approx({"a": 0.016, "b": 0.006 + 0.013})
    # With 20 ms: both reach the scheduler after their delay (a at 20 ms, b at 30 ms), a's step ends at 36
    # ms, then b runs alone (13 ms): TTFTs count from the arrivals.
    delayed = simulate(config, _ten_ms_plus_one_per_token, requests, admission_delay=0.020)
    ttfts = {r.request.request_id: r.ttft for r in delayed.results}
    assert ttfts == pytest.approx({"a": 0.036, "b": 0.036 + 0.013 - 0.010})
    assert delayed.duration == pytest.approx(0.049)  # from the first request's arrival, not its admission


def test_the_tuner_applies_the_server_overhead() -> None:
    workload = w2_workload(w1_requests(seed=1, num_requests=8, max_output=16), burstiness=1.0, seed=1)
    plain = Tuner(EngineConfig(), "model", MODEL, COST, workload, Slo())
    served = Tuner(EngineConfig(), "model", MODEL, COST, workload, Slo(), ServerOverhead(0.05, 1.2))
    _, before = plain.run(SMALL, 0.1)  # a light load: no queueing, so each figure scales exactly
    _, after = served.run(SMALL, 0.1)
    assert after["itl_s"]["p50"] == pytest.approx(1.2 * before["itl_s"]["p50"])
    assert after["ttft_s"]["p50"] == pytest.approx(1.2 * before["ttft_s"]["p50"] + 0.05, rel=1e-6)


def test_the_prediction_at_the_runs_speed_uses_the_step_cost_of_the_runs_own_steps() -> None:
    # The served steps took 1.3x their price (the model's step factor says 1.1): the account of the error
    # re-simulates with 1.3 and the same time per request, which is what a tuner built that way predicts.
    workload = w2_workload(w1_requests(seed=1, num_requests=8, max_output=16), burstiness=1.0, seed=1)
    tuner = Tuner(EngineConfig(), "model", MODEL, COST, workload, Slo(), ServerOverhead(0.05, 1.1))
    steps = [([RowShape(0, 5, True), RowShape(30, 1, True)], 0.0), ([RowShape(64, 1, True)], 0.0)] * 20
    steps = [(rows, 1.3 * COST.step_seconds(rows)) for rows, _ in steps]
    account = at_the_runs_speed(tuner, SMALL, 0.5, steps)
    assert account["run_step_factor"] == pytest.approx(1.3)
    assert account["predicted_step_factor"] == pytest.approx(1.1)
    _, expected = Tuner(EngineConfig(), "model", MODEL, COST, workload, Slo(), ServerOverhead(0.05, 1.3)).run(SMALL, 0.5)
    assert account["predicted_at_run_speed"]["ttft_s"] == pytest.approx(expected["ttft_s"])
    assert account["predicted_at_run_speed"]["itl_s"]["p50"] > tuner.run(SMALL, 0.5)[1]["itl_s"]["p50"]
    assert account["run_step_factor_by_kind"]["mixed"]["factor"] == pytest.approx(1.3)
    assert at_the_runs_speed(tuner, SMALL, 0.5, []) == {}  # no step stream: no account, the row as before
    summary = {**_summary(1.0, 0.2, 0.5), "output_throughput": 10.0}
    row = {"predicted": summary, "measured": summary, "predicted_meets_slo": True, "measured_meets_slo": True,
           **account}
    text = format_comparison(row)
    assert "at run speed" in text and "x1.300 their price during the run, x1.100 in the prediction" in text
    assert "by kind: decode x1.300 (20 steps), mixed x1.300 (20 steps)" in text


def _served_timings(factor: float, delay: float) -> list[tuple[float, list[float]]]:
    """Per-request (TTFT, ITLs) of 12 requests at a load where they queue and share steps, from a "server"
    whose steps take `factor` times the cost model's time and whose requests reach the engine `delay` late."""
    config = _config(max_num_seqs=4, max_num_batched_tokens=32, num_kv_blocks=256, max_model_len=128)
    requests = at_rate([SimRequest(str(i), 0.0, list(range(100, 100 + 8 + 3 * i)), 4 + i % 5) for i in range(12)],
                       rate=20.0)
    run = simulate(config, lambda rows: factor * _ten_ms_plus_one_per_token(rows), requests, admission_delay=delay)
    by_id = {r.request.request_id: (r.ttft, r.itls) for r in run.results}
    return [by_id[r.request_id] for r in requests]


def test_the_overhead_fit_recovers_a_known_factor_and_delay_under_load() -> None:
    # A "server" whose steps take 1.25x the cost model's time and whose requests reach the engine 80 ms after
    # they are sent, at a load where requests queue and share steps: the fit finds both from the per-request
    # timings, though each one changes the queueing the other sees.
    measured = _served_timings(1.25, 0.08)
    overhead = fit_overhead(measured, _served_timings)
    assert overhead.step_factor == pytest.approx(1.25, rel=0.02)
    assert overhead.request_seconds == pytest.approx(0.08, abs=0.005)
    assert len(overhead.details["ttft_measured"]) == len(overhead.details["ttft_simulated"]) == 12


def test_a_slow_moment_of_the_machine_does_not_set_the_overhead() -> None:
    # The same server, but another process slowed the machine while a quarter of the requests streamed:
    # their tokens took twice as long. The factor is the median request's: still the server's 1.25.
    measured = [(ttft, [2 * itl for itl in itls]) if index % 4 == 0 else (ttft, itls)
                for index, (ttft, itls) in enumerate(_served_timings(1.25, 0.08))]
    assert fit_overhead(measured, _served_timings).step_factor == pytest.approx(1.25, rel=0.03)


def test_the_overhead_fit_never_subtracts_time_per_request() -> None:
    measured = [(0.05, [0.02, 0.02]), (0.06, [0.02])]  # faster than simulated: no negative admission delay
    overhead = fit_overhead(measured, lambda factor, delay: [(0.1 + delay, [0.02 * factor] * 2),
                                                            (0.1 + delay, [0.02 * factor])])
    assert overhead.request_seconds == 0.0 and overhead.step_factor == pytest.approx(1.0)


def _served_steps(factor: float, seed: int = 0) -> list[tuple[list[RowShape], float]]:
    """Steps of a W2-like served run: decode batches of 1..16 rows, prompt chunks alone and beside decodes;
    each takes `factor` x the model's price, with 2% noise."""
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(300):
        rows = [RowShape(int(rng.integers(32, 600)), 1, True) for _ in range(int(rng.integers(0, 17)))]
        if not rows or rng.random() < 0.3:
            rows.append(RowShape(0, int(rng.integers(16, 257)), bool(rng.random() < 0.7)))
        steps.append((rows, factor * _ten_ms_plus_one_per_token(rows) * float(rng.normal(1.0, 0.02))))
    return steps


def test_the_step_fit_recovers_a_known_factor_from_served_steps_and_ignores_stalls() -> None:
    factor, few_factors, details = fit_step_cost(_served_steps(1.1), _ten_ms_plus_one_per_token)
    assert factor == pytest.approx(1.1, rel=0.01)
    assert few_factors is not None and all(f == pytest.approx(1.1, rel=0.03) for f in few_factors)
    assert details["served_steps"] == 300 and 0.005 < details["step_miss"] < 0.03  # the 2% noise
    # another process took the core during a tenth of the steps: they ran three times as long
    steps = [(rows, 3 * seconds if index % 10 == 0 else seconds) for index, (rows, seconds) in enumerate(_served_steps(1.2))]
    factor, _, _ = fit_step_cost(steps, _ten_ms_plus_one_per_token)
    assert factor == pytest.approx(1.2, rel=0.03)
    rows = [RowShape(100, 1, True), RowShape(0, 64, False)]
    assert ServerOverhead(0.0, factor).scale(_ten_ms_plus_one_per_token)(rows) == \
        pytest.approx(factor * _ten_ms_plus_one_per_token(rows))


def test_few_row_decode_steps_get_a_factor_per_row_count_and_only_they_do() -> None:
    # Served decode steps of 1 row ran at 0.7x their price, of 2-4 rows at 0.9x, every other step at 1.0x
    # (as W2 at a low rate showed behind the server); one factor would blur them all.
    def served_factor(rows: list[RowShape]) -> float:
        return (0.7 if len(rows) == 1 else 0.9) if is_few_row_step(rows) else 1.0

    base = _served_steps(1.0) + [([RowShape(40 + i, 1, True)], 0.0) for i in range(30)]  # enough 1-row steps
    steps = [(rows, served_factor(rows) * _ten_ms_plus_one_per_token(rows)) for rows, _ in base]
    factor, few_factors, details = fit_step_cost(steps, _ten_ms_plus_one_per_token)
    assert factor == pytest.approx(1.0) and few_factors is not None
    assert few_factors[0] == pytest.approx(0.7) and few_factors[3] == pytest.approx(0.9)
    assert details["few_row_counts"][0] >= 30 and details["step_miss"] < 1e-9
    scaled = ServerOverhead(0.0, factor, few_row_factors=few_factors).scale(_ten_ms_plus_one_per_token)
    one, four, five = [RowShape(100, 1, True)], [RowShape(100, 1, True)] * 4, [RowShape(100, 1, True)] * 5
    chunk = [RowShape(0, 3, True)]  # a prompt chunk of 3 tokens is not a decode step
    assert scaled(one) == pytest.approx(0.7 * _ten_ms_plus_one_per_token(one))
    assert scaled(four) == pytest.approx(0.9 * _ten_ms_plus_one_per_token(four))
    assert scaled(five) == pytest.approx(_ten_ms_plus_one_per_token(five))
    assert scaled(chunk) == pytest.approx(_ten_ms_plus_one_per_token(chunk))
    # too few few-row steps to tell them apart: one factor for all
    few_only = [(rows, seconds) for rows, seconds in steps if is_few_row_step(rows)][:19] + \
        [(rows, seconds) for rows, seconds in steps if not is_few_row_step(rows)]
    assert fit_step_cost(few_only, _ten_ms_plus_one_per_token)[1] is None
    described = describe_overhead(ServerOverhead(0.0, 1.0, None, (0.7, 0.9, 0.9, 0.9)))
    assert "decode steps of 1-4 rows x0.70/0.90/0.90/0.90" in described
    # what a profile keeps (JSON: a list) comes back as the same factors
    assert ServerOverhead.from_dict({"step_factor": 1.0, "few_row_factors": [0.7, 0.9, 0.9, 0.9]}).few_row_factors \
        == (0.7, 0.9, 0.9, 0.9)


def test_a_profile_with_the_retired_per_row_term_still_loads() -> None:
    # Profiles cached before the per-row term was dropped carry `row_seconds`; it is ignored, not an error.
    overhead = ServerOverhead.from_dict({"request_seconds": 0.04, "step_factor": 1.1, "details": None,
                                         "row_seconds": 0.002})
    assert overhead == ServerOverhead(0.04, 1.1)
    older = ServerOverhead.from_dict({"request_seconds": 0.04, "step_factor": 1.1, "row_seconds": 0.002,
                                      "details": {"served_steps": 650, "step_factor_alone": 1.1,
                                                  "factor_by_requests": 1.2}})
    assert describe_overhead(older) == "steps x1.100, 40.0 ms per request"  # its details are of the older fit


def test_rounds_of_one_candidate_and_load_are_averaged_against_their_one_prediction() -> None:
    predicted = {**_summary(1.0, 0.2, 0.5), "output_throughput": 10.0}
    first = {**_summary(0.8, 0.2, 0.5), "output_throughput": 9.0, "completed": 48}
    second = {**_summary(1.2, 0.3, 0.6), "output_throughput": 11.0, "completed": 48}
    rows = [_row(SMALL, 0.5, first, predicted), _row(DEFAULT, 0.5, first, predicted),
            _row(SMALL, 0.5, second, predicted), _row(SMALL, 0.8, second, predicted)]
    [averaged] = mean_over_rounds(rows)  # a candidate and load run once has no mean
    assert (Candidate(**averaged["candidate"]), averaged["rate"], averaged["rounds"]) == (SMALL, 0.5, 2)
    assert averaged["measured"]["ttft_s"] == pytest.approx({"p50": 0.5, "p90": 1.0, "p99": 1.0})
    assert averaged["measured"]["output_throughput"] == 10.0 and averaged["measured"]["completed"] == 48
    ttft_p99 = next(line for line in format_comparison(averaged).splitlines() if line.strip().startswith("TTFT p99"))
    assert ttft_p99.split()[2:] == ["1000.0", "1000.0", "0.0%"]


def test_the_served_steps_factor_is_told_per_kind_of_step() -> None:
    # Decode-only steps served at their price, prompt chunks beside decodes at 1.4x it, no prompt-only step:
    # the overall factor would blur them; per kind each shows, and a kind with no step is left out.
    decode = [RowShape(100, 1, True), RowShape(300, 1, True)]
    mixed = [RowShape(100, 1, True), RowShape(400, 64, True)]
    steps = [(decode, _ten_ms_plus_one_per_token(decode))] * 7 + [(mixed, 1.4 * _ten_ms_plus_one_per_token(mixed))] * 3
    by_kind = step_factor_by_kind(steps, _ten_ms_plus_one_per_token)
    assert by_kind == {"decode": {"steps": 7, "factor": pytest.approx(1.0)},
                       "mixed": {"steps": 3, "factor": pytest.approx(1.4)}}
    assert step_factor_by_kind([], _ten_ms_plus_one_per_token) == {}


def test_the_per_request_seconds_are_the_median_ttft_residual_never_negative() -> None:
    assert fit_request_seconds([0.3, 0.32, 0.5], lambda delay: [0.2 + delay, 0.2 + delay, 0.2 + delay]) == \
        pytest.approx(0.12)
    assert fit_request_seconds([0.1, 0.1], lambda delay: [0.2 + delay, 0.2 + delay]) == 0.0


def _step_event(start: float, duration: float, rows: list[list], running: int, waiting: int = 0) -> str:
    payload = {"time": start + duration, "duration": duration, "rows": rows, "running": running,
               "waiting": waiting, "updates": []}
    return f"data: {json.dumps(payload)}\n\n"


def test_a_busy_step_is_served_until_the_next_one_starts_an_idle_one_for_its_duration() -> None:
    # Three steps: the first leaves requests running (the next starts 2 ms after it ends: the engine loop's
    # hand-over), the second leaves the engine idle (the third starts at a new request, 1 s later), the
    # third is the last (nothing to measure it against).
    body = (_step_event(10.000, 0.040, [[0, 64, 1]], running=1) + _step_event(10.042, 0.020, [[64, 1, 1]], running=0)
            + _step_event(11.062, 0.030, [[0, 32, 1]], running=1))
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=body))

    async def read() -> tuple[list, list[float]]:
        steps: list = []
        gaps: list[float] = []
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await _read_steps(client, steps, None, gaps)
        return steps, gaps

    steps, gaps = asyncio.run(read())
    assert [seconds for _, seconds in steps] == [pytest.approx(0.042), pytest.approx(0.020), pytest.approx(0.030)]
    assert steps[0][0] == [RowShape(0, 64, True)] and gaps == [pytest.approx(0.002)]


def test_the_time_outside_the_engine_pairs_each_response_with_its_engine_request() -> None:
    # The engine runs a completion's prompt p, sample i as "<completion id>-p-i"; the ids themselves hold "-".
    results = [RequestResult(10, 4, True, 4, ttft=0.30, response_id="cmpl-a1"),
               RequestResult(10, 4, True, 4, ttft=0.50, response_id="cmpl-b2"),
               RequestResult(10, 4, True, 4, ttft=0.90, response_id="cmpl-c3"),
               RequestResult(10, 4, False, 0, ttft=5.0, response_id="cmpl-d4"),  # failed: not counted
               RequestResult(10, 4, True, 4, ttft=7.0, response_id="cmpl-e5")]  # never seen by the engine
    engine = {"cmpl-a1-0-0": 0.29, "cmpl-b2-0-0": 0.47, "cmpl-c3-0-0": 0.80, "cmpl-d4-0-0": 0.1}
    assert outside_engine_seconds(results, engine) == pytest.approx(0.03)  # the median of 10, 30 and 100 ms
    assert outside_engine_seconds(results, {}) is None
    assert outside_engine_seconds(results[:1], {"cmpl-a1-0-0": 0.4}) == 0.0  # never below zero


def test_predictions_take_each_overhead_figure_s_median_over_the_measurements() -> None:
    measured = [ServerOverhead(0.010, 1.05, {"x": 1}, (0.8, 0.9, 1.0, 1.0)),
                ServerOverhead(0.030, 1.30, None, (0.7, 0.8, 0.9, 1.0)),  # a slow minute
                ServerOverhead(0.020, 1.00, None, (0.9, 1.0, 1.1, 1.2))]
    typical = ServerOverhead.median_of(measured)
    assert typical == ServerOverhead(pytest.approx(0.020), pytest.approx(1.05), None,
                                     (pytest.approx(0.8), pytest.approx(0.9), pytest.approx(1.0), pytest.approx(1.0)))
    # a measurement without per-row factors makes the median have none (every step takes the step factor)
    assert ServerOverhead.median_of(measured + [ServerOverhead(0.0, 1.0)]).few_row_factors is None


def test_the_profile_keeps_the_newest_overheads_and_predicts_with_their_median() -> None:
    profile = Profile({}, MODEL, COST, {}, 0, 0.0, ServerOverhead(0.05, 2.0))
    assert profile.typical_overhead() == ServerOverhead(0.05, 2.0)  # a profile from before the history
    # an overhead measured another way (an earlier OVERHEAD_REVISION) is neither used nor kept
    profile.overhead_history = [{"request_seconds": 0.5, "step_factor": 5.0, "few_row_factors": None,
                                 "measured_at": 1.0, "revision": OVERHEAD_REVISION - 1}]
    assert profile.typical_overhead() == ServerOverhead(0.05, 2.0)
    profile.remember([ServerOverhead(0.01 * n, 1.0 + 0.01 * n, {"big": "details"}) for n in range(18)])
    assert len(profile.overhead_history) == OVERHEAD_HISTORY == 15  # the newest fifteen: n = 3..17
    assert [entry["step_factor"] for entry in profile.overhead_history][0] == pytest.approx(1.03)
    assert all(entry["details"] is None and entry["measured_at"] > 0 for entry in profile.overhead_history)
    assert profile.typical_overhead().step_factor == pytest.approx(1.10)
    again = Profile.from_dict(json.loads(json.dumps(profile.to_dict())))
    assert again.overhead_history == profile.overhead_history and again.typical_overhead() == profile.typical_overhead()


def test_a_validated_run_measures_the_server_overhead_once_more() -> None:
    row = {"measured": {"ttft_s": {"p50": 0.310}, "engine_ttft_s": {"p50": 0.300}}, "run_step_factor": 1.1,
           "run_few_row_factors": [0.8, 0.9, 1.0, 1.0]}
    assert run_overhead(row) == ServerOverhead(pytest.approx(0.010), 1.1, None, (0.8, 0.9, 1.0, 1.0))
    row = {"measured": {"ttft_s": {"p50": 0.3}}, "run_step_factor": 0.9, "run_few_row_factors": None}
    assert run_overhead(row) == ServerOverhead(0.0, 0.9)  # the engine's TTFT not read: nothing outside it


def test_validation_refuses_a_percentile_the_bench_does_not_measure_before_any_run() -> None:
    workload = w2_workload(w1_requests(seed=1, num_requests=4, max_output=16), burstiness=1.0, seed=1)
    tuner = Tuner(EngineConfig(), "model", MODEL, COST, workload, Slo(percentile=95))
    with pytest.raises(SystemExit, match="use --slo-percentile 50, 90 or 99"):
        validate(argparse.Namespace(workload="w2"), EngineConfig(), workload, tuner, [], Evaluation(DEFAULT, 0.0),
                 None)


def test_a_chat_comparison_shows_the_first_turns_tail_apart_from_the_later_turns() -> None:
    def chat(first_p99: float, later_p99: float) -> dict:
        return {**_summary(max(first_p99, later_p99), 0.2, 0.5), "output_throughput": 10.0,
                "ttft_by_turn_s": {"1": {"p99": first_p99}, "2": {"p99": later_p99}},
                "later_turns_ttft_s": {"p99": later_p99}}

    row = {"predicted": chat(0.6, 0.5), "measured": chat(0.8, 0.5), "predicted_meets_slo": True,
           "measured_meets_slo": True}
    lines = format_comparison(row).splitlines()
    assert any(line.split()[:5] == ["turn", "1", "600.0", "800.0", "-25.0%"] for line in lines)
    assert any(line.split()[:4] == ["turns>=2", "500.0", "500.0", "0.0%"] for line in lines)
    plain = {"predicted": chat(0.6, 0.5), "measured": {**_summary(0.8, 0.2, 0.5), "output_throughput": 10.0},
             "predicted_meets_slo": True, "measured_meets_slo": True}
    assert "turn 1" not in format_comparison(plain)  # W2: nothing per turn measured
