"""Search engine configurations for the most goodput under latency SLOs, by simulation.

A candidate's goodput is the highest load (request or conversation rate) at which it still meets every
SLO at the chosen percentile, found by doubling then bisecting the rate on the simulator; its figures are
those of the simulated run at that rate. The search first covers the grid of the two budget knobs
(max_num_seqs x max_num_batched_tokens), then varies the prompt-chunk cap, prefix caching and the KV pool
around the best few.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from conveyor.bench.serve import RequestResult, ServeSettings, percentiles, summarize
from conveyor.config import EngineConfig, ModelConfig
from conveyor.tune.cost_model import CostModel, ServerOverhead
from conveyor.tune.simulator import SimRun, simulate
from conveyor.tune.workloads import SimWorkload

MAX_DOUBLINGS = 10  # of the rate, looking for one that misses the SLOs
MAX_HALVINGS = 4  # looking for one that meets them: a candidate that misses at 1/16 of the hint is out
BISECTION_STEPS = 5  # then the bracket narrows to 2 ** (1 / 32): about 2%


@dataclass(frozen=True)
class Slo:
    """Latency objectives on a percentile of the run's TTFTs, TPOTs and ITLs (seconds; None: no objective)."""

    ttft: float | None = 2.0
    tpot: float | None = None
    itl: float | None = 0.3
    percentile: float = 99.0

    def met_by(self, run: SimRun) -> bool:
        def within(values: list[float], limit: float | None) -> bool:
            return limit is None or not values or float(np.percentile(values, self.percentile)) <= limit

        results = run.results
        return (within([r.ttft for r in results], self.ttft)
                and within([_tpot(r.e2e, r.ttft, len(r.token_times)) for r in results if len(r.token_times) > 1],
                           self.tpot)
                and within([itl for r in results for itl in r.itls], self.itl))

    def met_by_summary(self, summary: dict) -> bool:
        """The same test on a run's summary (`conveyor bench serve`'s, measured or simulated), which holds
        the p50, p90 and p99 of each latency; a run with failed requests misses."""
        name = f"p{self.percentile:g}"
        if name not in summary["ttft_s"]:
            raise ValueError(f"a run's summary has no {name}: validate with --slo-percentile 50, 90 or 99")
        return summary.get("failed", 0) == 0 and all(
            limit is None or summary[key][name] <= limit
            for key, limit in (("ttft_s", self.ttft), ("tpot_s", self.tpot), ("itl_s", self.itl)))

    def with_margin(self, margin: float) -> Slo:
        """The same objectives `margin` (a fraction) tighter: what the search plans with, since the simulator's
        p99s have come out up to ~20% optimistic on real runs (docs/tuning.md)."""
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"the SLO margin must be in [0, 1), got {margin}")

        def tighter(limit: float | None) -> float | None:
            return None if limit is None else limit * (1.0 - margin)

        return replace(self, ttft=tighter(self.ttft), tpot=tighter(self.tpot), itl=tighter(self.itl))

    def describe(self) -> str:
        parts = [f"{name} <= {limit * 1000:.0f} ms" for name, limit in
                 (("TTFT", self.ttft), ("TPOT", self.tpot), ("ITL", self.itl)) if limit is not None]
        return f"p{self.percentile:g} " + (", ".join(parts) or "(no objective)")


def _tpot(e2e: float, ttft: float, generated: int) -> float:
    return (e2e - ttft) / (generated - 1)


@dataclass(frozen=True)
class Candidate:
    """The knobs the tuner sets; everything else stays as the base configuration says."""

    max_num_seqs: int
    max_num_batched_tokens: int
    prefill_chunk_share: int = 4
    enable_prefix_caching: bool = True
    kv_cache_memory: str = "2GiB"

    @classmethod
    def of(cls, config: EngineConfig) -> Candidate:
        return cls(config.max_num_seqs, config.max_num_batched_tokens, config.prefill_chunk_share,
                   config.enable_prefix_caching, str(config.kv_cache_memory))

    def apply(self, config: EngineConfig) -> EngineConfig:
        return replace(config, num_kv_blocks=None, **self.settings())

    def settings(self) -> dict:
        return {"max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
                "prefill_chunk_share": self.prefill_chunk_share, "enable_prefix_caching": self.enable_prefix_caching,
                "kv_cache_memory": self.kv_cache_memory}

    def flags(self) -> str:
        prefix = "--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching"
        return (f"--max-num-seqs {self.max_num_seqs} --max-num-batched-tokens {self.max_num_batched_tokens} "
                f"--prefill-chunk-share {self.prefill_chunk_share} {prefix} --kv-cache-memory {self.kv_cache_memory}")

    def label(self) -> str:
        return (f"seqs {self.max_num_seqs:>3} tokens {self.max_num_batched_tokens:>4} share {self.prefill_chunk_share} "
                f"prefix {'on ' if self.enable_prefix_caching else 'off'} kv {self.kv_cache_memory}")


@dataclass
class RatePoint:
    rate: float
    meets_slo: bool
    summary: dict  # as `conveyor bench serve` reports a run


@dataclass
class Evaluation:
    candidate: Candidate
    max_rate: float  # the highest rate meeting the SLOs (0: none tried did)
    points: list[RatePoint] = field(default_factory=list)
    error: str = ""  # why the candidate cannot run this workload at all

    unbounded: bool = False  # met the SLOs at every rate tried: the workload's size, not the engine, limits it

    @property
    def best(self) -> RatePoint | None:
        """The simulated run at the highest rate meeting the SLOs."""
        return next((p for p in self.points if p.rate == self.max_rate and p.meets_slo), None)

    @property
    def shown(self) -> RatePoint | None:
        """The run to report: the best one, else the lowest rate tried."""
        return self.best or (self.points[0] if self.points else None)


class Tuner:
    """Simulates candidates on one workload with one cost model; remembers every run."""

    def __init__(self, base: EngineConfig, model_path: str, model_config: ModelConfig, cost_model: CostModel,
                 workload: SimWorkload, slo: Slo, overhead: ServerOverhead | None = None, margin: float = 0.0) -> None:
        self.base, self.model_path, self.model_config = base, model_path, model_config
        self.cost_model, self.workload, self.slo = cost_model, workload, slo
        self.margin = margin
        self.search_slo = slo.with_margin(margin)  # what a simulated run must meet; measured runs meet `slo`
        self.overhead = overhead or ServerOverhead()  # NOTE: the default adds nothing (an in-process engine)
        self._step_seconds = self.overhead.scale(cost_model.step_seconds)
        self.settings = ServeSettings(base_url="simulated", slo_ttft=slo.ttft or math.inf,
                                      slo_tpot=slo.tpot or math.inf)
        self.num_simulations = 0

    def at_step_cost(self, step_factor: float, few_row_factors: tuple[float, ...] | None = None) -> Tuner:
        """The same tuner with served steps costing `step_factor` x their price (few-row decode steps
        `few_row_factors`) and the same time per request: the prediction at another moment's speed."""
        overhead = replace(self.overhead, step_factor=step_factor, few_row_factors=few_row_factors)
        return Tuner(self.base, self.model_path, self.model_config, self.cost_model, self.workload, self.slo, overhead,
                     self.margin)

    def resolved(self, candidate: Candidate) -> EngineConfig:
        return candidate.apply(self.base).resolved(self.model_path, self.model_config)

    def run(self, candidate: Candidate, rate: float) -> tuple[SimRun, dict]:
        """One simulated run and its benchmark summary. Raises ValueError for requests that cannot fit."""
        requests, follow_up = self.workload.build(rate)
        run = simulate(self.resolved(candidate), self._step_seconds, requests, follow_up,
                       admission_delay=self.overhead.request_seconds)
        self.num_simulations += 1
        return run, summarize_run(run, self.settings, self.workload.name)

    def evaluate(self, candidate: Candidate, rate_hint: float) -> Evaluation:
        evaluation = Evaluation(candidate, 0.0)
        tried: dict[float, bool] = {}

        def meets(rate: float) -> bool:
            if rate not in tried:
                run, summary = self.run(candidate, rate)
                tried[rate] = self.search_slo.met_by(run)
                evaluation.points.append(RatePoint(rate, tried[rate], summary))
            return tried[rate]

        try:
            passing, failing = _bracket(meets, rate_hint)
            if passing is not None and failing is not None:
                for _ in range(BISECTION_STEPS):
                    middle = math.sqrt(passing * failing)
                    passing, failing = (middle, failing) if meets(middle) else (passing, middle)
        except ValueError as error:
            evaluation.error = str(error)
            return evaluation
        evaluation.max_rate = passing or 0.0
        evaluation.unbounded = failing is None
        evaluation.points.sort(key=lambda p: p.rate)
        return evaluation

    def evaluate_at(self, candidate: Candidate, rate: float) -> Evaluation:
        """The candidate at one load: `max_rate` is that load if it meets the SLOs there, else 0."""
        try:
            run, summary = self.run(candidate, rate)
        except ValueError as error:
            return Evaluation(candidate, 0.0, error=str(error))
        meets = self.search_slo.met_by(run)
        return Evaluation(candidate, rate if meets else 0.0, [RatePoint(rate, meets, summary)])

    def search(self, grid: Iterable[Candidate], rate_hint: float) -> list[Evaluation]:
        """Every candidate evaluated, the best (highest sustainable rate) first."""
        evaluations = []
        for candidate in grid:
            evaluations.append(self.evaluate(candidate, rate_hint))
            rate_hint = max(rate_hint, evaluations[-1].max_rate) if evaluations[-1].max_rate else rate_hint
        return rank(evaluations)


def rank(evaluations: list[Evaluation]) -> list[Evaluation]:
    """Highest sustainable rate first; then, at that rate, the higher goodput, then the lower p99 TTFT, p99
    ITL and median TTFT."""
    def key(evaluation: Evaluation) -> tuple[float, ...]:
        shown = evaluation.shown
        if shown is None:
            return (math.inf,)
        summary = shown.summary
        return (-evaluation.max_rate, -summary["goodput"], summary["ttft_s"]["p99"], summary["itl_s"]["p99"],
                summary["ttft_s"]["p50"])

    return sorted(evaluations, key=key)


def _bracket(meets: Callable[[float], bool], rate: float) -> tuple[float | None, float | None]:
    """(a rate meeting the SLOs, twice it missing them), or None for a side never found."""
    passing = failing = None
    doublings = halvings = 0
    while True:
        if meets(rate):
            passing = rate
            if failing is not None or doublings == MAX_DOUBLINGS:
                break
            rate, doublings = rate * 2, doublings + 1
        else:
            failing = rate
            if passing is not None or halvings == MAX_HALVINGS:
                break
            rate, halvings = rate / 2, halvings + 1
    return passing, failing


def summarize_run(run: SimRun, settings: ServeSettings, workload: str) -> dict:
    """A simulated run in `conveyor bench serve`'s summary shape (and a few simulator counts)."""
    results = [RequestResult(len(r.request.prompt_token_ids), r.request.output_len, success=True,
                             generated=len(r.token_times), ttft=r.ttft, e2e=r.e2e, itls=r.itls)
               for r in run.results]
    summary = summarize(results, run.duration, settings, "simulated")
    summary.update(workload=workload, num_steps=run.num_steps, num_preemptions=run.num_preemptions,
                   cached_ratio=run.cached_ratio)
    turns = sorted({r.request.turn for r in run.results if r.request.turn is not None})
    if turns:  # a chat: TTFT per turn, as `conveyor bench chat` reports it
        summary["ttft_by_turn_s"] = {str(turn): percentiles([r.ttft for r in run.results if r.request.turn == turn])
                                     for turn in turns}
        summary["later_turns_ttft_s"] = percentiles([r.ttft for r in run.results if (r.request.turn or 0) >= 2])
    return summary


def grid(max_num_seqs: Iterable[int], max_num_batched_tokens: Iterable[int], base: Candidate) -> list[Candidate]:
    return [replace(base, max_num_seqs=seqs, max_num_batched_tokens=tokens)
            for seqs, tokens in itertools.product(max_num_seqs, max_num_batched_tokens)]


def refinements(best: Iterable[Candidate], chunk_shares: Iterable[int], kv_sizes: Iterable[str],
                prefix_caching: Iterable[bool]) -> list[Candidate]:
    """Variations of the best grid points in one other knob at a time (the product would multiply the
    search's time for little: these knobs interact less than the two budget knobs), without repeats."""
    chunk_shares, kv_sizes, prefix_caching = list(chunk_shares), list(kv_sizes), list(prefix_caching)
    seen: set[Candidate] = set()
    variations = []
    for candidate in best:
        for variation in itertools.chain(
                (replace(candidate, prefill_chunk_share=share) for share in chunk_shares),
                (replace(candidate, kv_cache_memory=kv) for kv in kv_sizes),
                (replace(candidate, enable_prefix_caching=prefix) for prefix in prefix_caching)):
            if variation not in seen:
                seen.add(variation)
                variations.append(variation)
    return variations
