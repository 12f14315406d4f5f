"""A layer's elementwise ops fused in C++ (conveyor.model.fused_ops), against the torch reference path."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from conveyor import LLM, SamplingParams
from conveyor.config import EngineConfig
from conveyor.model import fused_ops
from conveyor.model.fused_ops import apply_elementwise_kernel, choose_elementwise_kernel, load_fused_ops
from conveyor.model.layers import GatedMLP, RMSNorm, RotaryEmbedding
from tests.conftest import TINY_ARCHITECTURES
from tests.reference import assert_same_tokens_and_logprobs

CPU = torch.device("cpu")
needs_ops = pytest.mark.skipif(load_fused_ops()[0] is None, reason="the C++ ops cannot be built here")
DTYPES = [torch.float32, torch.bfloat16]


def _assert_close_to_reference(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """fp32: summation order only. bf16: the same rounding steps, so equal but where a norm's sum of squares
    (fp32, another order) moves a value across a rounding boundary: one bf16 step, in few elements."""
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    if ours.dtype == torch.float32:
        torch.testing.assert_close(ours, reference, rtol=2e-6, atol=2e-6)
        return
    step = reference.float().abs().clamp_min(1e-3) * 2**-7  # one bf16 step at each value
    differ = ours.float() != reference.float()
    assert ((ours.float() - reference.float()).abs() <= step * 1.01).all()
    assert differ.float().mean() < 0.01


def _norm(dim: int, gemma: bool, dtype: torch.dtype, seed: int) -> RMSNorm:
    norm = RMSNorm(dim, 1e-6, gemma_style=gemma)
    norm.weight.copy_(torch.randn(dim, generator=torch.Generator().manual_seed(seed)) * 0.5)
    return norm.to(dtype)


@needs_ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gemma", [True, False])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_norms_and_residual_adds_match_the_torch_path(dtype: torch.dtype, gemma: bool, rows: int) -> None:
    ops = load_fused_ops()[0]
    generator = torch.Generator().manual_seed(rows)
    residual = (torch.randn(rows, 64, generator=generator) * 3).to(dtype)
    y = (torch.randn(rows, 64, generator=generator) * 40).to(dtype)
    first, second = _norm(64, gemma, dtype, 1), _norm(64, gemma, dtype, 2)
    _assert_close_to_reference(ops.rms_norm(y, first.scale(), first.eps), first(y))
    summed, normed = ops.add_rms_norm(residual, y, first.scale(), second.scale(), first.eps)
    reference_sum = residual + first(y)
    _assert_close_to_reference(summed, reference_sum)
    _assert_close_to_reference(normed, second(reference_sum))
    alone, empty = ops.add_rms_norm(residual, y, first.scale(), None, first.eps)
    assert torch.equal(alone, summed) and empty.numel() == 0
    # The module itself takes the fused path once given the ops, and leaves it when they are taken away.
    first.set_fused_ops(ops)
    assert torch.equal(first(y), ops.rms_norm(y, first.scale(), first.eps))
    first.set_fused_ops(None)
    assert first.fused_scale is None


@needs_ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "with_norm"), [(4, 1, True), (4, 2, False), (2, 2, True)])
def test_qk_norm_and_rotary_match_the_torch_path(dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                                                 with_norm: bool) -> None:
    ops = load_fused_ops()[0]
    tokens, head_dim = 37, 32
    generator = torch.Generator().manual_seed(num_heads * 10 + num_kv_heads)
    qkv = (torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=generator) * 4).to(dtype)
    positions = torch.randint(0, 500, (tokens,), generator=generator)
    rotary = RotaryEmbedding(head_dim, 512, 10000.0)
    q_norm, k_norm = _norm(head_dim, True, dtype, 3), _norm(head_dim, True, dtype, 4)
    q, k, _ = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q, k = q.reshape(tokens, num_heads, head_dim), k.reshape(tokens, num_kv_heads, head_dim)
    if with_norm:
        q, k = q_norm(q), k_norm(k)
    reference_q, reference_k = rotary(positions, q, k)
    scales = (q_norm.scale(), k_norm.scale()) if with_norm else (None, None)
    ours_q, ours_k = ops.qk_norm_rope(qkv, positions, rotary.cos, rotary.sin, *scales, 1e-6, num_heads,
                                      num_kv_heads, head_dim)
    _assert_close_to_reference(ours_q, reference_q)
    _assert_close_to_reference(ours_k, reference_k)


@needs_ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["gelu_pytorch_tanh", "silu"])
def test_the_activation_times_up_matches_the_torch_path(dtype: torch.dtype, activation: str) -> None:
    ops = load_fused_ops()[0]
    mlp = GatedMLP(16, 300, activation)
    # Values over the whole range the activations bend in, and far beyond it (exp's clamping).
    gate_up = torch.cat([torch.linspace(-30, 30, 300 * 40).reshape(40, 300),
                         torch.randn(40, 300, generator=torch.Generator().manual_seed(5)) * 3], dim=1).to(dtype)
    gate, up = gate_up.split(300, dim=-1)
    reference = mlp.act(gate) * up
    ours = ops.act_mul(gate_up, mlp.fused_activation)
    # exp is a polynomial (within ~2 ulp): each value is within the dtype's rounding steps of the exact one,
    # and never further from it than torch's own result is, by more than one such step.
    exact = mlp.act(gate.double()) * up.double()
    steps = exact.abs() * (2**-7 if dtype == torch.bfloat16 else 2**-21) + 1e-7
    our_error, torch_error = (ours.double() - exact).abs(), (reference.double() - exact).abs()
    assert (our_error <= steps).all()
    assert (our_error <= torch_error + steps).all()
    assert ours.dtype == dtype
    assert GatedMLP(16, 300, "gelu").fused_activation is None  # exact GELU: left to torch


def test_the_choice_falls_back_to_torch_where_the_ops_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_elementwise_kernel("torch", CPU, torch.float32) == ("torch", "requested")
    assert choose_elementwise_kernel("auto", torch.device("meta"), torch.float32) == ("torch", "device meta is not a CPU")
    assert choose_elementwise_kernel("auto", CPU, torch.float16) == ("torch", "torch.float16 is not covered")
    with pytest.raises(ValueError, match="unknown elementwise kernel"):
        choose_elementwise_kernel("inductor", CPU, torch.float32)
    monkeypatch.setattr(fused_ops, "load_fused_ops", lambda: (None, "no compiler"))
    assert choose_elementwise_kernel("auto", CPU, torch.float32) == ("torch", "no compiler")
    with pytest.raises(ValueError, match="elementwise kernel cpp cannot run: no compiler"):
        choose_elementwise_kernel("cpp", CPU, torch.float32)
    with pytest.raises(ValueError, match="elementwise_kernel must be one of auto, cpp, torch"):
        EngineConfig(elementwise_kernel="inductor")


def test_a_failed_build_leaves_the_torch_path_and_says_which_runs(monkeypatch: pytest.MonkeyPatch,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    from torch.utils import cpp_extension

    def broken(**_: object) -> None:
        raise RuntimeError("g++: not found")

    monkeypatch.setattr(cpp_extension, "load", broken)
    load_fused_ops.cache_clear()
    try:
        model = torch.nn.Sequential(RMSNorm(8, 1e-6), GatedMLP(8, 16, "silu"))
        with caplog.at_level(logging.INFO, logger="conveyor.model.fused_ops"):
            assert apply_elementwise_kernel(model, "auto", CPU, torch.float32) == "torch"
        assert "elementwise ops: torch (the C++ kernel could not be built (RuntimeError: g++: not found))" in caplog.text
        assert model[0].fused_ops is None and model[1].fused_ops is None
    finally:
        load_fused_ops.cache_clear()


@needs_ops
@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_engine_on_the_fused_ops_matches_the_torch_path(tiny_model_dirs: dict[str, Path], architecture: str) -> None:
    """Same ids, logprobs within fp32 noise, with prefill chunks sharing steps with decodes."""
    prompts = [[1, 40, 41, 42], [1] + [(7 * i) % 300 + 5 for i in range(45)], [1, 40, 41, 42, 43, 44]]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)
    results = {}
    for kernel in ("torch", "cpp"):
        llm = LLM(str(tiny_model_dirs[architecture]), block_size=4, max_num_batched_tokens=7, num_kv_blocks=128,
                  dtype="float32", elementwise_kernel=kernel)
        norms = [m for m in llm.engine.runner.model.modules() if isinstance(m, RMSNorm)]
        assert norms and all((m.fused_ops is not None) == (kernel == "cpp") for m in norms)
        results[kernel] = llm.generate(prompts, params)
    assert_same_tokens_and_logprobs(results["torch"], results["cpp"])


_PRECISIONS = {"fp32": {"dtype": "float32"}, "bf16": {"dtype": "bfloat16"}, "int8": {"quantization": "int8"}}


@needs_ops
@pytest.mark.slow
@pytest.mark.parametrize("precision", list(_PRECISIONS))
def test_the_default_model_decodes_the_same_on_the_fused_ops(precision: str) -> None:
    """Real text, 16 rows decoding at once: the same ids in fp32, logprobs within each precision's noise."""
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village",
               "List three prime numbers:"] * 4
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    results = {kernel: LLM(elementwise_kernel=kernel, **_PRECISIONS[precision]).generate(prompts, params)
               for kernel in ("torch", "cpp")}
    # fp32: summation order only (1e-5 seen); bf16 rounds every activation (mean 0.020, max 0.11 seen); int8
    # re-quantizes them at each linear, where a last-bit difference moves a rounding step (mean 0.028, max 0.21).
    mean_bound, max_bound = {"fp32": (1e-4, 1e-3), "bf16": (0.04, 0.2), "int8": (0.06, 0.4)}[precision]
    differences = []
    for reference, ours in zip(results["torch"], results["cpp"]):
        ref, got = reference.outputs[0], ours.outputs[0]
        assert ref.logprobs is not None and got.logprobs is not None
        for ref_token, our_token, ref_top, our_top in zip(ref.token_ids, got.token_ids, ref.logprobs, got.logprobs):
            differences.append(abs(our_top[our_token].logprob - ref_top[ref_token].logprob))
            if our_token != ref_token:  # a near-tie flipped: the texts part from here, as in any precision change
                assert precision != "fp32"
                break
    assert max(differences) < max_bound and sum(differences) / len(differences) < mean_bound
