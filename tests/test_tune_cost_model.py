"""The step-cost features and the fit: a known synthetic cost model is recovered from its own steps."""

from __future__ import annotations

import numpy as np
import pytest

from conveyor.tune.cost_model import (
    FEATURES,
    AttentionShape,
    CostModel,
    RowShape,
    fit_cost_model,
    step_features,
)

SHAPE = AttentionShape(block_size=16, num_full_layers=1, num_sliding_layers=3, sliding_window=64)


def _random_steps(rng: np.random.Generator, count: int) -> list[list[RowShape]]:
    steps = []
    for _ in range(count):
        rows = [RowShape(int(rng.integers(1, 1500)), 1, True) for _ in range(int(rng.integers(0, 40)))]
        for _ in range(int(rng.integers(0 if rows else 1, 3))):
            rows.append(RowShape(int(rng.integers(0, 600)), int(rng.integers(2, 512)), bool(rng.integers(0, 2))))
        steps.append(rows)
    return steps


def test_features_of_a_hand_computed_step() -> None:
    shape = AttentionShape(block_size=4, num_full_layers=1, num_sliding_layers=1, sliding_window=8)
    rows = [RowShape(start=11, num_new=1, samples=True), RowShape(start=2, num_new=1, samples=True),
            RowShape(start=6, num_new=3, samples=False)]
    features = dict(zip(FEATURES, step_features(rows, shape)))
    # Decode contexts 12 and 3 tokens. Full layer: 3 and 1 blocks are two groups, 3*4 + 1*4 = 16 keys.
    # Sliding (window 8): 12 tokens see keys 4..11, blocks 1..2 (2 blocks); 3 tokens, 1 block: one group
    # (2 <= 1.3 * 1 + 1), padded to 2 blocks: 2 rows * 8 = 16 keys. Averaged over the two layers.
    assert (features["decode_rows"], features["decode_groups"], features["decode_keys"]) == (2, 1.5, 16)
    # The chunk: 3 queries over 9 keys on the full layer; sliding, its first query (position 6) sees from 0.
    assert (features["prefill_chunks"], features["prefill_keys"]) == (1, 27)
    assert features["prefill_context"] == 9  # the keys the chunk gathers: its prefix and itself, on both layers
    assert (features["step"], features["tokens"], features["sampled"]) == (1, 5, 2)
    assert features["decode_keys_sq"] == 16 ** 2 / 1e6 and features["small_decode"] == 0  # a chunk joined
    assert features["mixed"] == 1
    late = dict(zip(FEATURES, step_features([RowShape(start=20, num_new=2, samples=True)], shape)))
    # After 20 cached tokens: the full layer gathers all 22 keys, the sliding one from position 20 - 8 + 1 = 13.
    assert (late["prefill_context"], late["prefill_keys"]) == ((22 + 9) / 2, (2 * 22 + 2 * 9) / 2)
    assert late["mixed"] == 0  # a chunk alone
    alone = dict(zip(FEATURES, step_features(rows[:2], shape)))
    assert alone["small_decode"] == 1 and alone["decode_keys"] == 16 and alone["mixed"] == 0
    three = [RowShape(start=11, num_new=1, samples=True)] * 3
    assert dict(zip(FEATURES, step_features(three, shape)))["small_decode"] == 0


def test_the_fit_recovers_a_known_cost_model() -> None:
    truth = CostModel(SHAPE, (0.004, 2e-4, 1e-3, 5e-5, 8e-4, 3e-8, 2e-3, 1e-8, 2e-6, 3e-3, 4e-6, 5e-3))
    steps = _random_steps(np.random.default_rng(0), 300)
    seconds = [truth.step_seconds(rows) for rows in steps]
    fitted = fit_cost_model(steps, seconds, SHAPE)
    assert fitted.coefficients == pytest.approx(truth.coefficients, rel=1e-6)
    assert CostModel.from_dict(fitted.to_dict()) == fitted


def test_the_fit_never_prices_a_feature_negatively() -> None:
    steps = _random_steps(np.random.default_rng(1), 200)
    rng = np.random.default_rng(2)
    # Time that grows only with tokens, with noise: the other terms must not go negative to fit the noise.
    seconds = [0.01 + 1e-4 * step_features(rows, SHAPE)[1] * rng.uniform(0.9, 1.1) for rows in steps]
    fitted = fit_cost_model(steps, seconds, SHAPE)
    assert min(fitted.coefficients) >= 0.0
    assert fitted.coefficients[1] == pytest.approx(1e-4, rel=0.1)


def test_a_few_stalled_steps_do_not_drag_the_fit() -> None:
    truth = CostModel(SHAPE, (0.004, 2e-4, 1e-3, 5e-5, 8e-4, 3e-8, 2e-3, 1e-8, 2e-6, 3e-3, 4e-6, 5e-3))
    steps = _random_steps(np.random.default_rng(3), 300)
    seconds = [truth.step_seconds(rows) for rows in steps]
    for index in range(0, 300, 30):  # one step in thirty took five times as long
        seconds[index] *= 5
    fitted = fit_cost_model(steps, seconds, SHAPE)
    assert fitted.coefficients == pytest.approx(truth.coefficients, rel=1e-6)
