"""The tuner's pictures: the predicted figure of merit over the knob grid (validated points marked), and the
Pareto front of throughput against p99 TTFT and p99 ITL over every simulated run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: write files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from conveyor.bench.plots import save_figure  # noqa: E402
from conveyor.tune.search import Evaluation  # noqa: E402


def plot_grid(grid: list[Evaluation], validated: set[tuple], path: Path, unit: str, fixed_rate: bool) -> Path:
    """A heat map over max_num_seqs x max_num_batched_tokens (the other knobs at the base's values)."""
    seqs = sorted({e.candidate.max_num_seqs for e in grid})
    tokens = sorted({e.candidate.max_num_batched_tokens for e in grid})
    values = np.full((len(seqs), len(tokens)), np.nan)
    for evaluation in grid:
        shown = evaluation.shown
        value = (shown.summary["goodput"] if fixed_rate and shown else evaluation.max_rate)
        values[seqs.index(evaluation.candidate.max_num_seqs), tokens.index(evaluation.candidate.max_num_batched_tokens)] = value
    fig, ax = plt.subplots(figsize=(7, 5))
    image = ax.imshow(values, origin="lower", cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label=("goodput (req/s)" if fixed_rate else f"highest rate under the SLO ({unit})"))
    for (row, column), value in np.ndenumerate(values):
        if not np.isnan(value):
            ax.text(column, row, f"{value:.2f}", ha="center", va="center", color="white", fontsize=8)
    for evaluation in grid:
        if tuple(sorted(evaluation.candidate.settings().items())) in validated:
            ax.scatter(tokens.index(evaluation.candidate.max_num_batched_tokens),
                       seqs.index(evaluation.candidate.max_num_seqs), s=400, facecolors="none", edgecolors="red",
                       linewidths=2, label="validated")
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles[:1], labels[:1], loc="upper right")
    ax.set_xticks(range(len(tokens)), [str(t) for t in tokens])
    ax.set_yticks(range(len(seqs)), [str(s) for s in seqs])
    ax.set_xlabel("max_num_batched_tokens")
    ax.set_ylabel("max_num_seqs")
    ax.set_title("predicted, by simulation")
    return save_figure(fig, path)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (latency, throughput) points no other point beats on both (lower latency, higher throughput)."""
    front: list[tuple[float, float]] = []
    for latency, throughput in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or throughput > front[-1][1]:
            front.append((latency, throughput))
    return front


def plot_pareto(evaluations: list[Evaluation], path: Path) -> Path:
    runs = [p.summary for e in evaluations for p in e.points]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, name in ((axes[0], "ttft_s", "p99 TTFT (s)"), (axes[1], "itl_s", "p99 ITL (s)")):
        points = [(run[key]["p99"], run["output_throughput"]) for run in runs]
        if points:
            ax.scatter(*zip(*points), s=10, color="#bbbbbb", label="simulated runs")
            front = pareto_front(points)
            ax.plot(*zip(*front), "o-", color="#e15759", label="Pareto front")
            ax.legend()
        ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("output tokens/s")
    return save_figure(fig, path)

