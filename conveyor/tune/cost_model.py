"""A step's cost from what the scheduler knows: features of a step's shape, and a linear model over them.

A step's shape is, per scheduled request, where its new tokens start, how many there are and whether it
samples; the scheduler's `SchedulerOutput` says exactly that, so the simulator prices its steps with no
model run, and the profiler gets the same shapes from the real engine's steps. The features follow where
the time goes in `conveyor.model`: the flat projections and MLP scale with tokens, the lm_head with
sampled rows, decode attention with the keys each decode group gathers (padded to its longest row, one
batched call per group), prefill attention with each chunk's queries times the keys it sees, on each
kind of layer (full context or sliding window), and with the keys each chunk gathers (its cached prefix
and itself: `index_select` and the GQA expansion cost per key, whatever the chunk's length, so a short
chunk after a long cached prefix, a chat's next turn, costs more than its queries x keys say). Three
terms fit what those miss on real steps: the squared gathered keys (a big batch's keys cost more each than
a small one's: they no longer fit the caches), a decode-only step of one or two rows (the linears'
small-row kernels run below the per-token rate), and a mixed step (prompt chunks beside decodes: such
steps measured ~7% above the other terms' price, in process and behind the server alike).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from conveyor.config import ModelConfig
from conveyor.engine.scheduler_output import SchedulerOutput
from conveyor.model.int8_gemv import MAX_ROWS as FEW_ROWS  # the few-row C++ kernels' limit (linears, lm_head)

FEATURES = ("step", "tokens", "sampled", "decode_rows", "decode_groups", "decode_keys", "prefill_chunks",
            "prefill_keys", "decode_keys_sq", "small_decode", "prefill_context", "mixed")
DECODE_GROUP_SLACK = 1.3  # as conveyor.model.attention groups decode rows: within 1.3x of the group's longest
SMALL_DECODE_ROWS = 2  # a decode-only step of this many rows or fewer: the linears' small-M kernels
KEYS_SQ_UNIT = 1e6  # decode_keys_sq is in (keys / 1000)^2, so its coefficient prints readably


@dataclass(frozen=True)
class RowShape:
    """One request in a step: `num_new` tokens at positions start..start+num_new-1."""

    start: int
    num_new: int
    samples: bool


@dataclass(frozen=True)
class AttentionShape:
    """What decides attention work: the block size and the layers of each kind."""

    block_size: int
    num_full_layers: int
    num_sliding_layers: int = 0
    sliding_window: int | None = None

    @classmethod
    def of(cls, model: ModelConfig, block_size: int) -> AttentionShape:
        sliding = sum(1 for layer in range(model.num_layers) if model.is_sliding(layer))
        return cls(block_size, model.num_layers - sliding, sliding, model.sliding_window if sliding else None)


def rows_of(output: SchedulerOutput) -> list[RowShape]:
    return [RowShape(s.start, s.num_new_tokens, s.samples) for s in output.scheduled]


def _visible_blocks(length: int, block_size: int, window: int | None) -> int:
    first_key = 0 if window is None else max(0, length - window)
    return -(-length // block_size) - first_key // block_size


def _decode_work(lengths: list[int], block_size: int, window: int | None) -> tuple[int, int]:
    """(groups, gathered keys) for decode rows whose contexts are `lengths` tokens long."""
    groups: list[list[int]] = []  # visible blocks per row, longest first
    for blocks in sorted((_visible_blocks(n, block_size, window) for n in lengths), reverse=True):
        if not groups or groups[-1][0] > DECODE_GROUP_SLACK * blocks + 1:
            groups.append([])
        groups[-1].append(blocks)
    return len(groups), sum(len(group) * group[0] * block_size for group in groups)


def _prefill_keys(rows: Iterable[RowShape], window: int | None) -> tuple[int, int]:
    """(queries times visible keys, visible keys) over the prefill chunks: each chunk's mask, and the keys
    it gathers (from its first query's first visible key to its end, as `model/attention.py` gathers them)."""
    products = keys = 0
    for row in rows:
        first_key = 0 if window is None else max(0, row.start - window + 1)
        products += row.num_new * (row.start + row.num_new - first_key)
        keys += row.start + row.num_new - first_key
    return products, keys


def step_features(rows: Sequence[RowShape], shape: AttentionShape) -> np.ndarray:
    """The feature vector (in FEATURES order) of a step; attention terms are averaged over the layers."""
    decodes = [row.start + 1 for row in rows if row.num_new == 1]
    prefills = [row for row in rows if row.num_new > 1]
    kinds = [(shape.num_full_layers, None)]
    if shape.num_sliding_layers:
        kinds.append((shape.num_sliding_layers, shape.sliding_window))
    num_layers = shape.num_full_layers + shape.num_sliding_layers
    groups = keys = prefill_keys = prefill_context = 0.0
    for count, window in kinds:
        kind_groups, kind_keys = _decode_work(decodes, shape.block_size, window) if decodes else (0, 0)
        kind_products, kind_context = _prefill_keys(prefills, window)
        groups += count * kind_groups / num_layers
        keys += count * kind_keys / num_layers
        prefill_keys += count * kind_products / num_layers
        prefill_context += count * kind_context / num_layers
    small = float(not prefills and 0 < len(decodes) <= SMALL_DECODE_ROWS)
    mixed = float(bool(prefills) and bool(decodes))
    return np.array([1.0, sum(row.num_new for row in rows), sum(1 for row in rows if row.samples),
                     len(decodes), groups, keys, len(prefills), prefill_keys, keys * keys / KEYS_SQ_UNIT, small,
                     prefill_context, mixed])


@dataclass(frozen=True)
class CostModel:
    """Step seconds = the coefficients (one per feature, never negative) times the step's features."""

    shape: AttentionShape
    coefficients: tuple[float, ...]  # in FEATURES order; a shorter tuple prices the features after it at 0

    def __post_init__(self) -> None:
        if len(self.coefficients) > len(FEATURES):
            raise ValueError(f"{len(self.coefficients)} coefficients for {len(FEATURES)} features")
        padding = (0.0,) * (len(FEATURES) - len(self.coefficients))
        object.__setattr__(self, "coefficients", tuple(self.coefficients) + padding)

    def step_seconds(self, rows: Sequence[RowShape]) -> float:
        return float(np.dot(self.coefficients, step_features(rows, self.shape)))

    def to_dict(self) -> dict:
        return {"shape": asdict(self.shape), "coefficients": dict(zip(FEATURES, self.coefficients))}

    @classmethod
    def from_dict(cls, data: dict) -> CostModel:
        # NOTE: a feature missing from an older file prices at 0, which is what that model meant.
        return cls(AttentionShape(**data["shape"]), tuple(float(data["coefficients"].get(f, 0.0)) for f in FEATURES))

    def scaled(self, factor: float) -> CostModel:
        """Every step `factor` times as long: the same model on a machine running that much slower."""
        return CostModel(self.shape, tuple(factor * c for c in self.coefficients))


def fit_cost_model(steps: Sequence[Sequence[RowShape]], seconds: Sequence[float], shape: AttentionShape,
                   outlier_factor: float = 4.0) -> CostModel:
    """Least squares on relative error (a 20 ms decode step matters as much as a 1 s prefill), keeping
    every coefficient non-negative. Then once more without the steps the first fit misses by more than
    `outlier_factor` times its median miss: on a shared machine a few steps stall for reasons no feature
    explains (another process took the core), and they would drag every coefficient."""
    features = np.stack([step_features(rows, shape) for rows in steps])
    targets = np.asarray(seconds, dtype=float)
    coefficients = _fit_non_negative(features, targets)
    misses = np.abs(features @ coefficients - targets) / np.maximum(targets, 1e-9)
    kept = misses <= outlier_factor * max(float(np.median(misses)), 1e-3)
    if not kept.all() and kept.sum() >= len(FEATURES):
        coefficients = _fit_non_negative(features[kept], targets[kept])
    return CostModel(shape, tuple(float(c) for c in coefficients))


def _fit_non_negative(features: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """A feature whose coefficient comes out negative is dropped and the rest refit."""
    weights = 1.0 / np.maximum(targets, 1e-6)
    scale = np.maximum(features.max(axis=0), 1e-12)  # columns of ~1 keep lstsq well conditioned
    active = [i for i in range(features.shape[1]) if features[:, i].any()]
    while True:
        solution, *_ = np.linalg.lstsq(features[:, active] / scale[active] * weights[:, None], targets * weights,
                                       rcond=None)
        negative = [index for index, value in zip(active, solution) if value < 0]
        if not negative:
            break
        active.remove(min(negative, key=lambda i: solution[active.index(i)]))
    coefficients = np.zeros(features.shape[1])
    coefficients[active] = solution / scale[active]
    return coefficients


def relative_errors(model: CostModel, steps: Sequence[Sequence[RowShape]], seconds: Sequence[float]) -> np.ndarray:
    predicted = np.array([model.step_seconds(rows) for rows in steps])
    actual = np.asarray(seconds, dtype=float)
    return np.abs(predicted - actual) / np.maximum(actual, 1e-9)


@dataclass(frozen=True)
class ServerOverhead:
    """What `conveyor serve` adds to the engine's steps, measured once against a real server
    (`tune/overhead.py`): the event loop (HTTP, detokenizing, streaming) shares the cores with the engine,
    so each step takes `step_factor` times its in-process time, and each request spends `request_seconds`
    outside the engine before its first token reaches the client (parsing, tokenizing, the hand-off to the
    engine thread, the first chunk's way back). The defaults add nothing: an in-process engine."""

    request_seconds: float = 0.0
    step_factor: float = 1.0
    details: dict | None = None  # the measurement behind the figures, for the report
    # Decode-only steps of 1..FEW_ROWS rows (`is_few_row_step`): a factor per row count; None: `step_factor`.
    few_row_factors: tuple[float, ...] | None = None

    @classmethod
    def from_dict(cls, data: dict) -> ServerOverhead:
        # NOTE: profiles before 2026-11-26 14:00 also kept a per-sampled-row term (`row_seconds`), since
        # dropped (docs/tuning.md); it is ignored. Those before 18:40 have no `few_row_factors` (one
        # `few_row_factor` between 17:30 and 18:40: measured again, see `profile._stale_overhead`).
        factors = data.get("few_row_factors")
        return cls(data.get("request_seconds", 0.0), data.get("step_factor", 1.0), data.get("details"),
                   tuple(factors) if factors else None)

    @classmethod
    def median_of(cls, overheads: Sequence[ServerOverhead]) -> ServerOverhead:
        """Each figure's median over several measurements (no details): this machine's speed drifts by 10-30%
        between minutes, and one measurement taken in a slow minute would set a whole command's predictions.
        The few-row factors are kept only if every measurement has them."""
        few = [o.few_row_factors for o in overheads]
        return cls(float(np.median([o.request_seconds for o in overheads])),
                   float(np.median([o.step_factor for o in overheads])), None,
                   None if any(f is None for f in few) else tuple(float(v) for v in np.median(np.array(few), axis=0)))

    def factor_of(self, rows: Sequence[RowShape]) -> float:
        if self.few_row_factors is not None and is_few_row_step(rows):
            return self.few_row_factors[len(rows) - 1]
        return self.step_factor

    def scale(self, step_seconds: Callable[[Sequence[RowShape]], float]) -> Callable[[Sequence[RowShape]], float]:
        if self.step_factor == 1.0 and self.few_row_factors is None:
            return step_seconds
        return lambda rows: self.factor_of(rows) * step_seconds(rows)


def describe_few_row_factors(factors: Sequence[float] | None) -> str:
    """'x0.78/0.84/0.96/0.96' (1..FEW_ROWS rows), or 'as the rest' for None."""
    return "as the rest" if factors is None else "x" + "/".join(f"{factor:.2f}" for factor in factors)


def is_few_row_step(rows: Sequence[RowShape]) -> bool:
    """A decode-only step of 1..FEW_ROWS rows: its linears and lm_head run the few-row C++ kernels. Behind
    the server such steps ran at x0.72-0.78 (1 row), x0.83-0.84 (2) and x0.94-0.96 (3-4) their in-process
    price, bigger ones at x0.84-0.94 (W2 at 0.5-0.8 req/s, 2026-11-26): one factor misprices a lightly
    loaded server's steps."""
    return 0 < len(rows) <= FEW_ROWS and all(row.num_new == 1 for row in rows)
