"""What `conveyor tune` prints and writes: the table of candidates, the recommendation as a `--config` file
and flags, everything as JSON, and the pictures."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from conveyor.config import EngineConfig
from conveyor.tune.search import Candidate, Evaluation, Slo

_BASE_KEYS = ("model", "tokenizer", "dtype", "quantization", "num_threads", "max_model_len", "block_size")


def _ms(value: float) -> str:
    return f"{value * 1000:7.0f}"


def format_row(label: str, evaluation: Evaluation, unit: str) -> str:
    shown = evaluation.shown
    if shown is None:
        return f"{label} {evaluation.candidate.label()}: cannot run this workload ({evaluation.error})"
    summary = shown.summary
    rate = f"{'>=' if evaluation.unbounded else '  '}{evaluation.max_rate:6.2f}"
    return (f"{label} {evaluation.candidate.label():<52} {rate} {unit:<6} {summary['goodput']:6.2f} "
            f"{summary['output_throughput']:7.1f} {_ms(summary['ttft_s']['p50'])} {_ms(summary['ttft_s']['p99'])} "
            f"{_ms(summary['tpot_s']['p50'])} {_ms(summary['itl_s']['p99'])}")


def format_table(evaluations: list[Evaluation], default: Evaluation, unit: str, fixed_rate: bool) -> str:
    title = "meets SLO at" if fixed_rate else "highest rate"
    header = (f"  {'candidate':<52} {title:>15} {'goodput':>7} {'tok/s':>7} {'TTFT50':>7} {'TTFT99':>7} "
              f"{'TPOT50':>7} {'ITL99':>7}   (ms; simulated, at that rate)")
    lines = [header] + [format_row(f"{i + 1}", e, unit) for i, e in enumerate(evaluations)]
    lines.append(format_row("d", default, unit) + "   <- the default")
    return "\n".join(lines)


def beats(challenger: Evaluation, incumbent: Evaluation) -> bool:
    """Strictly better: a higher sustainable rate, or the same with more goodput."""
    if challenger.shown is None:
        return False
    if incumbent.shown is None or challenger.max_rate != incumbent.max_rate:
        return challenger.max_rate > incumbent.max_rate
    return challenger.shown.summary["goodput"] > incumbent.shown.summary["goodput"]


def config_file_values(base: EngineConfig, candidate: Candidate) -> dict:
    """The `--config` file: the tuned knobs, plus the base settings that differ from the defaults (the
    profile holds for that model, dtype and thread count only)."""
    defaults = EngineConfig()
    values = {key: getattr(base, key) for key in _BASE_KEYS if getattr(base, key) != getattr(defaults, key)}
    return {**values, **candidate.settings()}


def write_outputs(out_dir: Path, base: EngineConfig, evaluations: list[Evaluation], grid: list[Evaluation],
                  default: Evaluation, validation: dict | None, profile: dict, slo: Slo, unit: str,
                  fixed_rate: bool) -> Candidate:
    """Write tuned.json, tune.json and the pictures; print the recommendation. Returns it."""
    from conveyor.bench.plots import write_html
    from conveyor.tune.plots import plot_grid, plot_pareto

    out_dir.mkdir(parents=True, exist_ok=True)
    winner = evaluations[0]
    if validation is not None:
        recommended = Candidate(**validation["recommended"])
        reason = validation["reason"]
    elif beats(winner, default):
        recommended, reason = winner.candidate, "the best simulated candidate"
    else:
        recommended, reason = default.candidate, "no candidate beats the default in simulation"
    values = config_file_values(base, recommended)
    config_path = out_dir / "tuned.json"
    EngineConfig(**values)  # NOTE: what is written must load: fail here rather than at `serve --config`
    config_path.write_text(json.dumps(values, indent=2) + "\n")
    print(f"recommended ({reason}): {recommended.label()}")
    print(f"  conveyor serve --config {config_path}")
    print(f"  or: conveyor serve {recommended.flags()}")
    print(f"  or: LLM(**json.load(open('{config_path}')))")
    if beats(winner, default) and winner.shown and default.shown:
        if fixed_rate:
            print(f"  predicted goodput of the best candidate: {winner.shown.summary['goodput']:.2f} against the "
                  f"default's {default.shown.summary['goodput']:.2f} requests/s")
        elif default.max_rate:
            print(f"  predicted gain of the best candidate: {winner.max_rate / default.max_rate:.2f}x the "
                  "default's highest rate under the SLO")
    validated = {tuple(sorted(row["candidate"].items())) for row in (validation or {}).get("rows", [])}
    pictures = [("predicted " + ("goodput" if fixed_rate else "highest sustainable rate") + " over the knob grid",
                 plot_grid(grid, validated, out_dir / "grid.png", unit, fixed_rate)),
                ("Pareto front: throughput against p99 TTFT and ITL (every simulated run)",
                 plot_pareto(evaluations, out_dir / "pareto.png"))]
    write_html(pictures, out_dir / "tune.html", f"conveyor tune: {slo.describe()}")
    payload = {"slo": asdict(slo), "rate_unit": unit, "fixed_rate": fixed_rate, "profile": profile,
               "recommended": recommended.settings(), "reason": reason,
               "candidates": [_evaluation_dict(e) for e in evaluations], "default": _evaluation_dict(default),
               "validation": validation}
    (out_dir / "tune.json").write_text(json.dumps(payload, indent=2))
    print(f"saved {config_path}, {out_dir / 'tune.json'} and {out_dir / 'tune.html'}")
    return recommended


def _evaluation_dict(evaluation: Evaluation) -> dict:
    return {"candidate": evaluation.candidate.settings(), "max_rate": evaluation.max_rate,
            "unbounded": evaluation.unbounded, "error": evaluation.error,
            "points": [{"rate": p.rate, "meets_slo": p.meets_slo, "summary": p.summary} for p in evaluation.points]}
