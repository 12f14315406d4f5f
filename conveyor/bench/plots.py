"""Pictures of what the engine did: batch-composition timelines, cache and queue over time, sweeps."""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: write files only
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from conveyor.engine.stats import StepStats  # noqa: E402
from conveyor.engine.timeline import CELL_KINDS, EMPTY, timeline_matrix  # noqa: E402

# One colour per cell kind, indexed by its code (conveyor.engine.timeline is the one definition).
_COLORS = ListedColormap([kind.color for kind in CELL_KINDS])


def plot_timeline(steps: list[StepStats], path: Path, title: str,
                  useful_decodes: dict[str, int] | None = None) -> Path:
    matrix, order = timeline_matrix(steps, useful_decodes)
    fig, ax = plt.subplots(figsize=(12, max(3.0, 0.08 * len(order) + 1.5)))
    ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap=_COLORS, vmin=0, vmax=len(CELL_KINDS) - 1)
    ax.set_xlabel("engine step")
    ax.set_ylabel(f"request (arrival order, {len(order)})")
    ax.set_title(title)
    shown = [kind for kind in CELL_KINDS if kind is not EMPTY and (matrix == kind.code).any()]
    handles = [plt.Rectangle((0, 0), 1, 1, color=kind.color) for kind in shown]
    ax.legend(handles, [kind.label for kind in shown], loc="upper right", fontsize=8)
    return save_figure(fig, path)


def plot_cache_and_queues(steps: list[StepStats], path: Path, title: str) -> Path:
    start = steps[0].start_time if steps else 0.0
    times = [s.start_time - start for s in steps]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(12, 6), sharex=True)
    used = [100 * s.kv_blocks_used / max(1, s.kv_blocks_total) for s in steps]
    cached = [100 * s.kv_blocks_cached / max(1, s.kv_blocks_total) for s in steps]
    top.stackplot(times, used, cached, colors=["#59a14f", "#bab0ac"], labels=["used", "cached (evictable)"])
    top.set_ylabel("KV cache blocks (%)")
    top.legend(loc="upper right", fontsize=8)
    top.set_title(title)
    bottom.plot(times, [s.num_running for s in steps], label="running")
    bottom.plot(times, [s.num_waiting for s in steps], label="waiting")
    bottom.set_xlabel("seconds")
    bottom.set_ylabel("requests")
    bottom.legend()
    return save_figure(fig, path)


def plot_sweep(points: list[dict], path: Path, title: str) -> Path:
    """Throughput and p99 TTFT against request rate (or concurrency), one point per serve run."""
    x = [p["x"] for p in points]
    fig, left = plt.subplots(figsize=(9, 5))
    left.plot(x, [p["output_throughput"] for p in points], "o-", color="#4e79a7", label="output tok/s")
    left.set_xlabel(points[0]["x_label"] if points else "request rate (req/s)")
    left.set_ylabel("output tokens/s", color="#4e79a7")
    right = left.twinx()
    right.plot(x, [p["ttft_s"]["p99"] for p in points], "s--", color="#e15759", label="p99 TTFT")
    right.set_ylabel("p99 TTFT (s)", color="#e15759")
    left.set_title(title)
    return save_figure(fig, path)


def write_html(pictures: list[tuple[str, Path]], path: Path, title: str) -> Path:
    body = "\n".join(f"<h2>{html.escape(caption)}</h2>\n<img src=\"{picture.name}\" style=\"max-width:100%\">"
                     for caption, picture in pictures)
    path.write_text(f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
                    f"</head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")
    return path


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Write a figure as a PNG (its folder made if needed) and free it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
