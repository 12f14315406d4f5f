"""`conveyor tune --validate`: run the top candidates and the default for real and set predicted beside measured.

Each run starts a fresh `conveyor serve --config` on 127.0.0.1 (a cold prefix cache, as in the simulator),
warms it up with a few requests at once, sends the workload with the `conveyor bench` clients at the given
load, and stops the server. Candidates take turns within each round (interleaved), so a machine whose
speed drifts during validation penalizes none of them in particular. Each run is judged as the search
judges a simulated one: did it meet every SLO at the percentile (measured by the client), and with how
much goodput. The recommendation is the validated candidate that met the SLOs at the highest load (then:
the most goodput), and the default unless a candidate beats it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from conveyor.bench.chat import run_chat_benchmark
from conveyor.bench.cli import conversations_from_args, workload_from_args
from conveyor.bench.serve import ServeSettings, percentiles, run_serve_benchmark
from conveyor.config import EngineConfig
from conveyor.tune.cost_model import FEW_ROWS, ServerOverhead, describe_few_row_factors
from conveyor.tune.overhead import Step, fit_step_cost, served_steps, step_factor_by_kind
from conveyor.tune.report import config_file_values
from conveyor.tune.search import Candidate, Evaluation, Tuner
from conveyor.tune.workloads import SimWorkload

SERVER_START_TIMEOUT = 600.0  # seconds; loading the default model on a busy 2-core machine can take minutes
METRICS = (("TTFT p50", "ttft_s", "p50"), ("TTFT p99", "ttft_s", "p99"), ("TPOT p50", "tpot_s", "p50"),
           ("TPOT p99", "tpot_s", "p99"), ("ITL p99", "itl_s", "p99"), ("out tok/s", "output_throughput", None),
           ("goodput", "goodput", None))
VALIDATE_BELOW_LIMIT = 0.85  # of the winner's predicted highest rate: at the limit itself p99 is a coin toss
WARM_UP_REQUESTS, WARM_UP_PROMPT_TOKENS = 8, 300
GOODPUT_MARGIN = 0.05  # two real runs of one configuration differ by a few percent in goodput


def _value(summary: dict, key: str, percentile: str | None) -> float:
    return float(summary[key][percentile] if percentile else summary[key])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serving(config_values: dict, work_dir: Path) -> Iterator[str]:
    """A fresh `conveyor serve --config` on 127.0.0.1 and a free port, warmed up; yields its base URL."""
    config_path = work_dir / "candidate.json"
    config_path.write_text(json.dumps(config_values))
    port = _free_port()
    log_path = work_dir / "server.log"
    command = [sys.executable, "-m", "conveyor.cli", "--log-level", "WARNING", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--config", str(config_path)]
    with log_path.open("w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(server, base_url, log_path)
        _warm_up(base_url)
        yield base_url
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _warm_up(base_url: str) -> None:
    """First calls pay one-off costs (lazy imports, first kernel calls, the allocator growing its pools) that
    the profile, taken on a warm engine, does not price: pay them before the measured run. A few requests at
    once, with prompts long enough for full prompt chunks, cover prefill, mixed and batched decode steps.
    Their first block (BOS, then ids 5..94) starts no workload's prompt (W1's ids are 1000 and up, a chat's
    second token is its template's), so the prefix cache gives the run nothing of theirs."""
    max_model_len = httpx.get(f"{base_url}/v1/models", timeout=30.0).json()["data"][0]["max_model_len"]
    length = min(WARM_UP_PROMPT_TOKENS, max_model_len // 2)

    def one(index: int) -> None:
        prompt = [2] + [5 + (index + position) % 90 for position in range(length)]
        response = httpx.post(f"{base_url}/v1/completions", timeout=300.0,
                              json={"prompt": prompt, "max_tokens": 8, "ignore_eos": True})
        response.raise_for_status()

    with ThreadPoolExecutor(WARM_UP_REQUESTS) as pool:
        list(pool.map(one, range(WARM_UP_REQUESTS)))


def measure(args: argparse.Namespace, base: EngineConfig, candidate: Candidate, rate: float,
            settings: ServeSettings, work_dir: Path) -> tuple[dict, list[Step]]:
    """One real run of the workload at `rate` against a fresh server configured as `candidate`: the
    benchmark's summary, and the steps the server ran meanwhile."""
    with serving(config_file_values(base, candidate), work_dir) as base_url:
        run_settings = ServeSettings(base_url=base_url, request_rate=rate, burstiness=getattr(args, "burstiness", 1.0),
                                     seed=args.seed, slo_ttft=settings.slo_ttft, slo_tpot=settings.slo_tpot)
        if args.workload == "w2":
            benchmark = run_serve_benchmark(workload_from_args(args), run_settings)
        else:
            benchmark = run_chat_benchmark(conversations_from_args(args, rate), run_settings)
        return asyncio.run(_watched(base_url, benchmark))


async def _watched(base_url: str, benchmark: Coroutine[Any, Any, dict]) -> tuple[dict, list[Step]]:
    engine_ttfts: dict[str, float] = {}
    gaps: list[float] = []
    async with served_steps(base_url, engine_ttfts, gaps) as steps:
        summary = await benchmark
    if engine_ttfts:  # where the client's TTFT went: inside the engine, or around it (HTTP, hand-off, delivery)
        summary["engine_ttft_s"] = percentiles(list(engine_ttfts.values()))
    if gaps:  # the engine loop between busy steps (outputs handed over, step stream fed, requests taken)
        summary["step_gap_s"] = percentiles(gaps)
    return summary, steps


def _wait_until_healthy(server: subprocess.Popen, base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"conveyor serve exited with {server.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"conveyor serve did not start in {SERVER_START_TIMEOUT:.0f} s")


def validation_rates(args: argparse.Namespace, top: list[Evaluation], default: Evaluation,
                     fixed_rate: float | None) -> list[float]:
    """`--validate-rates`; else `--rate`; else the rate that decides the search's claim: a little below the
    winner's predicted highest sustainable rate, where it should meet the SLOs and a candidate predicted to
    sustain less (the default, when the winner beats it) should not."""
    if args.validate_rates:
        return list(args.validate_rates)
    if fixed_rate is not None:
        return [fixed_rate]
    winner = top[0] if top and top[0].max_rate else default
    return [round(VALIDATE_BELOW_LIMIT * (winner.max_rate or args.rate_hint), 3)]


def validate(args: argparse.Namespace, base: EngineConfig, workload: SimWorkload, tuner: Tuner,
             top: list[Evaluation], default: Evaluation, fixed_rate: float | None,
             remember: Callable[[ServerOverhead], None] | None = None) -> dict:
    """Run the top candidates and the default for real, judge them as the search does (the highest load at
    which each meets every SLO, then goodput), and recommend the best, or the default unless one beats it.
    Each run's served steps also measure the server overhead once more (`run_overhead`), given to
    `remember` for later commands' predictions (this command's are made before its runs and stay)."""
    if args.workload == "trace":
        raise SystemExit("conveyor tune trace --validate: replaying a trace against a server is not supported yet; "
                         "validate with the w2 or w3 workload closest to it")
    if tuner.slo.percentile not in (50, 90, 99):  # what `conveyor bench serve` measures
        raise SystemExit(f"conveyor tune --validate: the bench reports p50, p90 and p99, not "
                         f"p{tuner.slo.percentile:g}; use --slo-percentile 50, 90 or 99")
    candidates = list(dict.fromkeys([e.candidate for e in top] + [default.candidate]))
    rates = validation_rates(args, top, default, fixed_rate)
    rows = []
    with tempfile.TemporaryDirectory(prefix="conveyor-tune-") as work_dir:
        for round_index in range(args.validate_repeats):
            for load in rates:
                for candidate in candidates:
                    print(f"validating {candidate.label()} at {load:.3g} {workload.rate_unit} "
                          f"(round {round_index + 1})", flush=True)
                    _, predicted = tuner.run(candidate, load)
                    measured, steps = measure(args, base, candidate, load, tuner.settings, Path(work_dir))
                    rows.append({"candidate": candidate.settings(), "rate": load, "round": round_index,
                                 "predicted": predicted, "measured": measured,
                                 "predicted_meets_slo": tuner.search_slo.met_by_summary(predicted),
                                 "measured_meets_slo": tuner.slo.met_by_summary(measured),
                                 **at_the_runs_speed(tuner, candidate, load, steps)})
                    print(format_comparison(rows[-1]), flush=True)
                    if remember is not None and "run_step_factor" in rows[-1]:
                        remember(run_overhead(rows[-1]))
    scores = {c: validated_score(rows, c.settings(), "measured") for c in candidates}
    default_score = scores[default.candidate]
    best = max(candidates, key=lambda c: scores[c])
    if best != default.candidate and beats_measured(scores[best], default_score):
        recommended, reason = best, f"validated: {describe_score(scores[best])}, the default {describe_score(default_score)}"
    else:
        recommended, reason = default.candidate, (f"no validated candidate measured better than the default "
                                                  f"({describe_score(default_score)}); keeping the default")
    print(ranking_report(rows, candidates))
    over_rounds = mean_over_rounds(rows)
    for row in over_rounds:
        print(f"{Candidate(**row['candidate']).label()} at {row['rate']:.3g} {workload.rate_unit}, predicted against "
              f"the mean of {row['rounds']} rounds:\n{format_comparison(row)}")
    return {"rows": rows, "rates": rates, "over_rounds": over_rounds, "slo": tuner.slo.describe(),
            "recommended": recommended.settings(), "reason": reason, "scores": [{"candidate": c.settings(), "measured": scores[c],
                                          "predicted": validated_score(rows, c.settings(), "predicted")}
                                         for c in candidates]}


def at_the_runs_speed(tuner: Tuner, candidate: Candidate, load: float, steps: list[Step]) -> dict:
    """The prediction again with the step cost fit on the run's own served steps. The machine's speed drifts
    by 5-10% within minutes here, more than the time between measuring the server overhead and a run: this
    tells that drift (the step factor) from the simulator's own misses (queueing, batching, admission).
    Not a prediction (it uses the measured steps' durations); an account of the error."""
    if not steps:
        return {}
    factor, few_factor, _ = fit_step_cost(steps, tuner.cost_model.step_seconds)
    _, summary = tuner.at_step_cost(factor, few_factor).run(candidate, load)
    return {"run_step_factor": factor, "run_few_row_factors": few_factor, "predicted_at_run_speed": summary,
            "predicted_step_factor": tuner.overhead.step_factor,
            "predicted_few_row_factors": tuner.overhead.few_row_factors,
            "run_step_factor_by_kind": step_factor_by_kind(steps, tuner.cost_model.step_seconds)}


def run_overhead(row: dict) -> ServerOverhead:
    """A validated run's server overhead: the step factors fit on its served steps, and the time outside
    the engine (the client's TTFT p50 minus the engine's; 0 when the engine's was not read)."""
    measured = row["measured"]
    outside = measured["ttft_s"]["p50"] - measured["engine_ttft_s"]["p50"] if "engine_ttft_s" in measured else 0.0
    few = row.get("run_few_row_factors")
    return ServerOverhead(max(0.0, outside), row["run_step_factor"], None, tuple(few) if few else None)


def mean_over_rounds(rows: list[dict]) -> list[dict]:
    """Per candidate and load run in more than one round: the prediction (the same each round) against the
    mean of the rounds' measured figures. This machine's speed drifts by 10-30% between minutes; one run
    carries that drift in full, the mean of interleaved rounds less of it."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(json.dumps([row["candidate"], row["rate"]], sort_keys=True), []).append(row)
    return [{"candidate": group[0]["candidate"], "rate": group[0]["rate"], "rounds": len(group),
             "predicted": group[0]["predicted"], "measured": _mean_summary([r["measured"] for r in group])}
            for group in groups.values() if len(group) > 1]


def _mean_summary(summaries: list[dict]) -> dict:
    """The mean of each number the summaries all have, nested dicts (percentiles) alike."""
    mean: dict = {}
    for key, value in summaries[0].items():
        if isinstance(value, dict) and all(isinstance(s.get(key), dict) for s in summaries):
            mean[key] = _mean_summary([s[key] for s in summaries])
        elif isinstance(value, (int, float)) and not isinstance(value, bool) \
                and all(isinstance(s.get(key), (int, float)) for s in summaries):
            mean[key] = float(np.mean([s[key] for s in summaries]))
    return mean


def validated_score(rows: list[dict], settings: dict, side: str) -> tuple[float, float]:
    """As the search scores a candidate, over the validated loads: (the highest load at which the run met
    every SLO in every round, 0 if none; the mean goodput per request at that load, else at the lowest)."""
    mine = [r for r in rows if r["candidate"] == settings]
    loads = sorted({r["rate"] for r in mine})
    met = [load for load in loads if all(r[f"{side}_meets_slo"] for r in mine if r["rate"] == load)]
    at = met[-1] if met else loads[0]
    return (met[-1] if met else 0.0, float(np.mean([r[side]["goodput"] for r in mine if r["rate"] == at])))


def beats_measured(challenger: tuple[float, float], default: tuple[float, float]) -> bool:
    """A higher load meeting the SLOs; or the same load (met) with goodput higher by more than the noise
    of two real runs (`GOODPUT_MARGIN`)."""
    if challenger[0] != default[0]:
        return challenger[0] > default[0]
    return challenger[0] > 0 and challenger[1] > (1 + GOODPUT_MARGIN) * default[1]


def describe_score(score: tuple[float, float]) -> str:
    if not score[0]:
        return f"met the SLOs at no validated load (goodput {score[1]:.2f}/s)"
    return f"met the SLOs up to {score[0]:.3g}/s with goodput {score[1]:.2f}/s"


def format_comparison(row: dict) -> str:
    at_speed = row.get("predicted_at_run_speed")
    lines = [f"  {'':<10} {'predicted':>10} {'measured':>10} {'error':>7}"
             + (f"   {'at run speed':>12} {'error':>7}" if at_speed else "")]
    for name, value, scale in _compared(row):
        predicted, measured = value(row["predicted"]), value(row["measured"])
        line = f"  {name:<10} {predicted * scale:10.1f} {measured * scale:10.1f} {_error(predicted, measured):>7}"
        if at_speed:
            again = value(at_speed)
            line += f"   {again * scale:12.1f} {_error(again, measured):>7}"
        lines.append(line)
    if "measured_meets_slo" in row:
        lines.append(f"  {'SLO met':<10} {'yes' if row['predicted_meets_slo'] else 'no':>10} "
                     f"{'yes' if row['measured_meets_slo'] else 'no':>10}")
    if at_speed:
        lines.append(f"  served steps: x{row['run_step_factor']:.3f} their price during the run, "
                     f"x{row['predicted_step_factor']:.3f} in the prediction"
                     + _few_rows(row.get("run_few_row_factors"), row.get("predicted_few_row_factors")))
        by_kind = row.get("run_step_factor_by_kind") or {}
        lines.append("  by kind: " + ", ".join(f"{kind} x{value['factor']:.3f} ({value['steps']} steps)"
                                             for kind, value in by_kind.items()))
    if "engine_ttft_s" in row["measured"]:
        engine, client = row["measured"]["engine_ttft_s"], row["measured"]["ttft_s"]
        lines.append(f"  measured TTFT inside the engine: p50 {1000 * engine['p50']:.1f}, p99 {1000 * engine['p99']:.1f} ms "
                     f"(the client's p50 is {1000 * (client['p50'] - engine['p50']):.1f} ms more)")
    if "step_gap_s" in row["measured"]:
        gap = row["measured"]["step_gap_s"]
        lines.append(f"  between busy steps (counted in each step's served time): p50 {1000 * gap['p50']:.2f}, "
                     f"p99 {1000 * gap['p99']:.2f} ms")
    if "cached_ratio" in row["measured"]:  # chats: how much of the prompts the prefix cache supplied
        lines.append(f"  {'cached %':<10} {100 * row['predicted']['cached_ratio']:10.1f} "
                     f"{100 * row['measured']['cached_ratio']:10.1f}")
    return "\n".join(lines)


def _few_rows(run: list[float] | tuple[float, ...] | None, predicted: list[float] | tuple[float, ...] | None) -> str:
    if run is None and predicted is None:
        return ""
    return (f"; decode steps of 1-{FEW_ROWS} rows: {describe_few_row_factors(run)} in the run, "
            f"{describe_few_row_factors(predicted)} in the prediction")


def _compared(row: dict) -> list[tuple[str, Callable[[dict], float], int]]:
    """(name, how to read it from a summary, display scale) for each figure set side by side; for chats also
    the first turns' TTFT tail (they arrive while the run fills up) apart from the later turns'."""
    compared = [(name, lambda summary, key=key, percentile=percentile: _value(summary, key, percentile),
                 1000 if key.endswith("_s") else 1) for name, key, percentile in METRICS]
    if all("later_turns_ttft_s" in row[side] for side in ("predicted", "measured")):
        compared[2:2] = [("  turn 1", lambda summary: summary["ttft_by_turn_s"]["1"]["p99"], 1000),
                         ("  turns>=2", lambda summary: summary["later_turns_ttft_s"]["p99"], 1000)]
    return compared


def _error(predicted: float, measured: float) -> str:
    return f"{100 * (predicted - measured) / measured:.1f}%" if measured else "n/a"


def ranking_report(rows: list[dict], candidates: list[Candidate]) -> str:
    """Per load: the candidates ranked as the search ranks them (meeting every SLO first, then goodput),
    predicted and measured, and whether the orders agree."""
    lines = []
    for load in sorted({row["rate"] for row in rows}):
        def key(candidate: Candidate, side: str, load: float = load) -> tuple[bool, float]:
            mine = [r for r in rows if r["rate"] == load and r["candidate"] == candidate.settings()]
            return (all(r[f"{side}_meets_slo"] for r in mine), float(np.mean([r[side]["goodput"] for r in mine])))

        predicted = sorted(candidates, key=lambda c: key(c, "predicted"), reverse=True)
        measured = sorted(candidates, key=lambda c: key(c, "measured"), reverse=True)

        def not_worse(better: Candidate, worse: Candidate) -> bool:
            # NOTE: candidates whose predictions are within 1% are a predicted tie, which any order matches.
            (meets_b, goodput_b), (meets_w, goodput_w) = key(better, "predicted"), key(worse, "predicted")
            return meets_b > meets_w or (meets_b == meets_w and goodput_b >= 0.99 * goodput_w)

        agrees = all(not_worse(better, worse) for better, worse in zip(measured, measured[1:]))
        lines.append(f"at {load:.3g}: ranking (SLO met, then goodput) {'matches' if agrees else 'DIFFERS'} "
                     "(predicted ties match any order)")
        for place, candidate in enumerate(measured, 1):
            (meets_m, goodput_m), (meets_p, goodput_p) = key(candidate, "measured"), key(candidate, "predicted")
            lines.append(f"  {place}. {candidate.label()}  measured: SLO {'met' if meets_m else 'missed'}, goodput "
                         f"{goodput_m:.2f}; predicted: SLO {'met' if meets_p else 'missed'}, goodput {goodput_p:.2f} "
                         f"(predicted place {predicted.index(candidate) + 1})")
    return "\n".join(lines)
