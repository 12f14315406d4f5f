"""Profile the real step cost on this machine and model, fit the cost model, and keep it as a small JSON file.

Calibration runs the real `LLMEngine` on random-id prompts (greedy, EOS ignored) in five families of
steps: decode batches of 1 .. max_num_seqs rows at several context lengths, single prompt chunks of
several sizes, chunks that start after a cached prefix, mixed steps (a prompt chunk joining running
decodes), and a chat's next turn (a short chunk after a long cached prefix, beside decodes at that
context). Decode rows at long contexts are cheap to reach: the rows of a batch share all but their last
block of prompt, so the prefix cache computes it once (decode attention still gathers every row's keys).
Every step's shape comes from the engine's own counters, its time from its `StepStats.duration`; every
fifth step is held out of the fit to report the model's error on steps it never saw.

The profile is keyed by the model file, dtype, quantization, thread count and machine, and reused until
one of them changes; a change of the cost model's features refits the kept calibration steps instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from conveyor.cache import atomic_write_path, cache_dir, file_fingerprint
from conveyor.config import KERNELS_REVISION, EngineConfig, ModelConfig, available_cpu_count
from conveyor.engine.engine import LLMEngine
from conveyor.engine.request import Request
from conveyor.model.loader import resolve_model_path
from conveyor.sampling_params import SamplingParams
from conveyor.tune.cost_model import (
    FEATURES,
    AttentionShape,
    CostModel,
    RowShape,
    ServerOverhead,
    fit_cost_model,
    relative_errors,
)

logger = logging.getLogger(__name__)

HELD_OUT_EVERY = 5  # every fifth calibration step is kept out of the fit to measure its error
DECODE_STEPS = 4  # decode steps measured per (batch, context) point
FIRST_OVERHEAD_RUNS = 3  # server overhead runs of a new profile (one server, ~40 s each): the median run is kept
# Server overheads kept: a new profile's, one per `tune --validate` and one per validated run (~30-40 minutes
# of this machine's drift); predictions take their median.
OVERHEAD_HISTORY = 15
# How a server overhead is measured; a profile's overheads of another revision are measured again.
# 2 (2026-11-27): a busy served step counts until the next step starts (`overhead._read_steps`).
OVERHEAD_REVISION = 2


@dataclass(frozen=True)
class CalibrationPlan:
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    context_lens: tuple[int, ...] = (64, 512, 2048)
    chunk_sizes: tuple[int, ...] = (16, 64, 256, 512, 1024, 2048)
    mixed_decodes: tuple[int, ...] = (4, 32, 64)  # decode rows beside a joining prompt chunk
    # A chat's next turn: a chunk of `turn_chunks` tokens after a cached prefix of `turn_prefixes`, beside
    # `turn_decodes` rows decoding at that context (W3's steps; none of the families above has them). A busy
    # chat server runs its turns beside dozens of decodes: served W3 steps of that kind cost 1.1-1.3x what a
    # profile with at most 12 such rows priced them at (docs/tuning.md).
    turn_prefixes: tuple[int, ...] = (512, 1024, 2048)
    turn_chunks: tuple[int, ...] = (32, 128)
    turn_decodes: tuple[int, ...] = (2, 12, 48)
    repeats: int = 2

    def quick(self) -> CalibrationPlan:
        """A shorter plan for a loaded machine or a test: fewer points, one pass."""
        return replace(self, batch_sizes=(1, 4, 16, 64), context_lens=(64, 1024), chunk_sizes=(16, 128, 512, 1024),
                       mixed_decodes=(8,), turn_prefixes=(1024,), turn_chunks=(64,), turn_decodes=(4,), repeats=1)


@dataclass
class Profile:
    key: dict
    model_config: ModelConfig  # what EngineConfig.resolved needs to size the KV pool of a candidate
    cost_model: CostModel
    held_out_error: dict[str, float]  # relative error of step time on held-out steps: mean, p50, p90, max
    num_steps: int
    seconds: float  # how long profiling took
    server_overhead: ServerOverhead | None = None  # measured against `conveyor serve`; None: not yet
    # every calibration step as ([[start, num_new, samples], ...], seconds): to study or refit the model
    steps: list | None = None
    # every server overhead measured since (the newest OVERHEAD_HISTORY), each with "measured_at" (unix seconds)
    overhead_history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        overhead = asdict(self.server_overhead) if self.server_overhead else None
        return {"key": self.key, "model_config": asdict(self.model_config), "cost_model": self.cost_model.to_dict(),
                "held_out_error": self.held_out_error, "num_steps": self.num_steps, "seconds": self.seconds,
                "server_overhead": overhead, "overhead_history": self.overhead_history, "steps": self.steps}

    @classmethod
    def from_dict(cls, data: dict) -> Profile:
        overhead = data.get("server_overhead")
        return cls(data["key"], ModelConfig(**data["model_config"]), CostModel.from_dict(data["cost_model"]),
                   data["held_out_error"], data["num_steps"], data["seconds"],
                   ServerOverhead.from_dict(overhead) if overhead else None, data.get("steps"),
                   data.get("overhead_history") or [])

    def remember(self, overheads: list[ServerOverhead]) -> None:
        """Add newly measured server overheads to the history (their figures, not their details)."""
        now = time.time()
        entries = [json.loads(json.dumps(dict(asdict(replace(o, details=None)), measured_at=now,
                                              revision=OVERHEAD_REVISION))) for o in overheads]
        self.overhead_history = (self.current_overheads() + entries)[-OVERHEAD_HISTORY:]  # as saved: lists

    def current_overheads(self) -> list[dict]:
        """The history's entries measured the current way (`OVERHEAD_REVISION`)."""
        return [entry for entry in self.overhead_history if entry.get("revision") == OVERHEAD_REVISION]

    def typical_overhead(self) -> ServerOverhead | None:
        """What predictions use: each figure's median over the history of this measuring revision
        (`ServerOverhead.median_of`); else the profile's one measurement."""
        current = self.current_overheads()
        if not current:
            return self.server_overhead
        return ServerOverhead.median_of([ServerOverhead.from_dict(entry) for entry in current])


def profile_key(config: EngineConfig) -> dict:
    """What a profile is valid for: the model's content, the precision `--dtype auto` resolves to, the
    kernels asked for (they change every step's cost), threads and this machine."""
    model_path = resolve_model_path(config.model)
    dtype, quantization, _ = config.precision()
    model_file = Path(model_path)
    if model_file.is_dir():
        model_file = next(iter(sorted(model_file.glob("*.safetensors"))), model_file / "config.json")
    return {"model": Path(model_path).name, "model_fingerprint": file_fingerprint(model_file),
            "dtype": dtype, "quantization": quantization,
            "linear_kernel": config.linear_kernel, "attention_kernel": config.attention_kernel,
            "elementwise_kernel": config.elementwise_kernel, "kernels_revision": KERNELS_REVISION,
            "num_threads": config.num_threads or available_cpu_count(), "machine": _machine(),
            "cost_features": len(FEATURES)}  # a profile fit on other features is measured again


def _machine() -> str:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{platform.node()} {platform.machine()} {cpu}"


def profile_path(key: dict, directory: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return (directory or cache_dir() / "tune") / f"profile-{key['model']}-{digest}.json"


def load_or_profile(config: EngineConfig, plan: CalibrationPlan, directory: Path | None = None,
                    refresh: bool = False, server_overhead: bool = True) -> tuple[Profile, Path, bool]:
    """The cached profile for this model and machine, or a new one. Returns it, its path, and whether it was
    measured now. With `server_overhead`, a profile without its server overhead gets it measured (a real
    `conveyor serve` of `config`) and is saved again."""
    from conveyor.tune.overhead import measure_server_overhead

    key = profile_key(config)
    path = profile_path(key, directory)
    measured = refresh or not path.exists()
    if not measured:
        profile = Profile.from_dict(json.loads(path.read_text()))
    else:
        earlier = None if refresh else _fit_on_other_features(key, path.parent)
        profile = refit(earlier, key) if earlier else run_profile(config, plan, key)
    if server_overhead and _stale_overhead(profile):
        started = time.perf_counter()
        overheads = measure_server_overhead(config, resolve_model_path(config.model), profile.model_config,
                                            profile.cost_model, runs=FIRST_OVERHEAD_RUNS)
        profile.server_overhead = _median_run(overheads)
        profile.remember([profile.server_overhead])  # one entry: runs a minute apart share that minute's speed
        profile.seconds += time.perf_counter() - started
    elif not measured:
        return profile, path, False
    save_profile(profile, path)
    return profile, path, measured


def _median_run(overheads: list[ServerOverhead]) -> ServerOverhead:
    """The measurement whose step factor is the median, its details naming every run's factor."""
    median = sorted(overheads, key=lambda o: o.step_factor)[len(overheads) // 2]
    return replace(median, details=dict(median.details or {}, runs=len(overheads),
                                        run_step_factors=[o.step_factor for o in overheads]))


def _stale_overhead(profile: Profile) -> bool:
    """No server overhead yet, or none measured the current way (`OVERHEAD_REVISION`): measured again
    (~3 min) rather than pricing served steps by another measure."""
    return profile.server_overhead is None or not profile.current_overheads()


def _fit_on_other_features(key: dict, directory: Path) -> Profile | None:
    """A profile of the same model, settings and machine whose cost model has other features, with its
    calibration steps kept: refitting those beats measuring them again."""
    same = {name: value for name, value in key.items() if name != "cost_features"}
    newest_first = sorted(directory.glob(f"profile-{key['model']}-*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for candidate in newest_first:
        try:
            data = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if data.get("steps") and {n: v for n, v in data["key"].items() if n != "cost_features"} == same:
            return Profile.from_dict(data)
    return None


def refit(earlier: Profile, key: dict) -> Profile:
    """`earlier`'s calibration steps fit on today's features (no step measured again). The server overhead
    is left to be measured again: it was fit against the old model's simulation."""
    assert earlier.steps is not None
    steps = [([RowShape(start, num_new, bool(samples)) for start, num_new, samples in rows], seconds)
             for rows, seconds in earlier.steps]
    model, summary = _fit(steps, earlier.cost_model.shape, earlier.held_out_error.get("repeat_noise", 0.0))
    logger.info("refit the profile's %d calibration steps on the cost model's current features", len(steps))
    return Profile(key, earlier.model_config, model, summary, len(steps), earlier.seconds, steps=earlier.steps)


def _fit(steps: list[tuple[list[RowShape], float]], shape: AttentionShape,
         repeat_noise: float) -> tuple[CostModel, dict[str, float]]:
    """The cost model fit on all but every fifth step, and its error on those."""
    held_out = steps[HELD_OUT_EVERY - 1::HELD_OUT_EVERY]
    training = [step for i, step in enumerate(steps) if (i + 1) % HELD_OUT_EVERY]
    model = fit_cost_model([rows for rows, _ in training], [s for _, s in training], shape)
    errors = relative_errors(model, [rows for rows, _ in held_out], [s for _, s in held_out])
    summary = {"mean": float(errors.mean()), "p50": float(np.percentile(errors, 50)),
               "p90": float(np.percentile(errors, 90)), "max": float(errors.max()), "steps": len(held_out),
               "repeat_noise": repeat_noise}
    return model, summary


def save_profile(profile: Profile, path: Path) -> None:
    temporary = atomic_write_path(path)
    temporary.write_text(json.dumps(profile.to_dict(), indent=2))
    temporary.replace(path)


def _calibration_engine(config: EngineConfig, plan: CalibrationPlan) -> LLMEngine:
    return LLMEngine(replace(config, max_num_seqs=max(plan.batch_sizes), max_num_batched_tokens=max(plan.chunk_sizes),
                             prefill_chunk_share=1, enable_prefix_caching=True, enable_step_trace=False))


def run_profile(config: EngineConfig, plan: CalibrationPlan, key: dict) -> Profile:
    started = time.perf_counter()
    engine = _calibration_engine(config, plan)
    shape = AttentionShape.of(engine.model_config, engine.config.block_size)
    calibration = _Calibration(engine, seed=0)
    calibration.run_decodes((1,), (min(plan.context_lens),))  # warm-up: first calls pay one-off costs
    calibration.steps.clear()
    for round_index in range(plan.repeats):
        logger.info("profiling round %d of %d: decode batches", round_index + 1, plan.repeats)
        calibration.run_decodes(plan.batch_sizes, plan.context_lens)
        logger.info("profiling: prompt chunks (%d steps so far)", len(calibration.steps))
        calibration.run_chunks(plan.chunk_sizes)
        logger.info("profiling: mixed steps (%d steps so far)", len(calibration.steps))
        calibration.run_mixed(plan.mixed_decodes, plan.chunk_sizes, max(plan.context_lens))
        logger.info("profiling: next chat turns (%d steps so far)", len(calibration.steps))
        calibration.run_turns(plan.turn_decodes, plan.turn_prefixes, plan.turn_chunks)
    steps = calibration.steps
    model, summary = _fit(steps, shape, calibration.repeat_noise())
    recorded = [([[row.start, row.num_new, row.samples] for row in rows], seconds) for rows, seconds in steps]
    return Profile(key, engine.model_config, model, summary, len(steps), time.perf_counter() - started,
                   steps=recorded)


class _Calibration:
    """Drives the engine through calibration requests, recording each step's shape and duration."""

    def __init__(self, engine: LLMEngine, seed: int) -> None:
        self.engine = engine
        self.rng = np.random.default_rng(seed)
        self.vocab = engine.model_config.vocab_size
        self.limit = engine.max_model_len - DECODE_STEPS - 2  # longest prompt that still decodes
        self.active: dict[str, Request] = {}
        self.steps: list[tuple[list[RowShape], float]] = []
        self.repeats: list[list[float]] = []  # durations of the decode steps of one point: the same work
        self._ids = 0

    def _tokens(self, count: int) -> list[int]:
        # NOTE: ids from the upper part of the vocabulary: ordinary tokens, no specials (BOS, EOS, pad).
        return [int(t) for t in self.rng.integers(self.vocab // 2, self.vocab, size=count)]

    def add(self, prompt: list[int], max_tokens: int) -> None:
        self._ids += 1
        request_id = f"calibration-{self._ids}"
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0)
        self.active[request_id] = self.engine.add_request(prompt[:self.limit], params, request_id=request_id)

    def step(self) -> None:
        _, stats = self.engine.step()
        if stats is None:
            return
        rows = []
        for entry in stats.scheduled:
            request = self.active[entry.request_id]
            # After the step the request's counters say where this entry started and whether it sampled.
            start = request.num_computed_tokens - entry.num_tokens
            rows.append(RowShape(start, entry.num_tokens, request.num_computed_tokens == request.num_tokens - 1))
        self.steps.append((rows, stats.duration))
        for request_id in stats.finished:
            self.active.pop(request_id, None)

    def drain(self) -> None:
        while self.engine.has_unfinished_requests():
            self.step()
        self.engine.reset_prefix_cache()  # the next point starts cold

    def run_decodes(self, batch_sizes: tuple[int, ...], context_lens: tuple[int, ...]) -> None:
        block = self.engine.config.block_size
        for context in context_lens:
            shared = self._tokens(min(context, self.limit))
            for batch in batch_sizes:
                for _ in range(batch):  # all but the last block shared: one prefill, then `batch` decodes
                    self.add(shared[:-block] + self._tokens(block), DECODE_STEPS + 1)
                first = len(self.steps)
                self.drain()
                self.repeats.append([seconds for rows, seconds in self.steps[first:]
                                     if len(rows) == batch and all(row.num_new == 1 for row in rows)])

    def repeat_noise(self) -> float:
        """How much steps doing the same work differ in time: the mean relative distance of a decode step
        from its point's median. No model of step time can be more accurate than this on this machine."""
        deviations = [abs(seconds - np.median(point)) / np.median(point)
                      for point in self.repeats if len(point) > 1 for seconds in point]
        return float(np.mean(deviations)) if deviations else 0.0

    def run_chunks(self, chunk_sizes: tuple[int, ...]) -> None:
        for size in chunk_sizes:
            prefix = self._tokens(size)
            self.add(prefix, 1)  # a chunk from the start
            self.drain()
            self.add(prefix, 1)  # the same prefix cached: a short chunk far into the context
            self.add(prefix + self._tokens(size), 1)
            self.drain()

    def run_mixed(self, decode_counts: tuple[int, ...], chunk_sizes: tuple[int, ...], context: int) -> None:
        shared = self._tokens(min(context // 2, self.limit))
        for decodes in decode_counts:
            for size in chunk_sizes:
                self._join_decodes(decodes, shared, [], size)

    def run_turns(self, decode_counts: tuple[int, ...], prefixes: tuple[int, ...], chunk_sizes: tuple[int, ...]) -> None:
        """A chat's next turn joining running chats: `decodes` rows decode at about `prefix` tokens of
        context (all but their last block shared, as in `run_decodes`), then a request whose prompt is the
        shared prefix (cached) plus `size` new tokens joins them."""
        for prefix in prefixes:
            shared = self._tokens(min(prefix, self.limit - max(chunk_sizes)))
            for decodes in decode_counts:
                for size in chunk_sizes:
                    self._join_decodes(decodes, shared, shared, size)

    def _join_decodes(self, decodes: int, shared: list[int], head: list[int], size: int) -> None:
        """`decodes` rows decoding on `shared` (all but their last block), then a request of `head` plus
        `size` new tokens joining them, run to the end."""
        block = self.engine.config.block_size
        for _ in range(decodes):
            self.add(shared[:-block] + self._tokens(block), DECODE_STEPS + 2)
        for _ in range(3):  # prefill and reach decoding
            self.step()
        self.add(head + self._tokens(size), 2)
        self.drain()
