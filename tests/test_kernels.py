"""The linear kernel choice: oneDNN's prepacked linear against the torch reference path, and the fallback."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from conveyor import LLM, SamplingParams
from conveyor.model.kernels import OneDNNLinear, apply_linear_kernel, choose_linear_kernel
from conveyor.model.layers import Linear, linear
from tests.conftest import TINY_ARCHITECTURES
from tests.reference import assert_same_tokens_and_logprobs

CPU = torch.device("cpu")
needs_onednn = pytest.mark.skipif(choose_linear_kernel("auto", CPU, torch.float32)[0] != "onednn",
                                  reason="oneDNN cannot run on this machine")


@needs_onednn
@pytest.mark.parametrize("num_rows", [0, 1, 2, 9, 32, 33, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_onednn_linear_equals_the_torch_path_in_fp32(num_rows: int, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(num_rows)
    weight = torch.randn(3000, 640, generator=generator)
    bias = torch.randn(3000, generator=generator) if with_bias else None
    x = torch.randn(num_rows, 640, generator=generator)
    out = OneDNNLinear(weight, bias)(x)
    assert out.shape == (num_rows, 3000) and out.dtype == torch.float32
    # The same fp32 products; only the order of summation differs.
    torch.testing.assert_close(out, linear(x, weight, bias), rtol=1e-5, atol=1e-4)


@needs_onednn
def test_onednn_linear_keeps_leading_dimensions_and_takes_strided_input() -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=generator)
    x = torch.randn(3, 5, 128, generator=generator)[..., ::2]  # not contiguous
    out = OneDNNLinear(weight)(x)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, weight), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(choose_linear_kernel("auto", CPU, torch.bfloat16)[0] != "onednn",
                    reason="oneDNN bfloat16 cannot run on this machine")
@pytest.mark.parametrize("num_rows", [1, 8, 64])
def test_onednn_linear_in_bf16_is_as_close_to_fp32_as_the_torch_path(num_rows: int) -> None:
    generator = torch.Generator().manual_seed(num_rows)
    weight = torch.randn(1000, 640, generator=generator).bfloat16()
    x = torch.randn(num_rows, 640, generator=generator).bfloat16()
    exact = torch.nn.functional.linear(x.double(), weight.double())
    ours = OneDNNLinear(weight)(x)
    assert ours.dtype == torch.bfloat16
    reference_error = (linear(x, weight).double() - exact).abs().max()
    our_error = (ours.double() - exact).abs().max()
    assert our_error <= 1.5 * reference_error + 1e-6


def test_the_kernel_choice_falls_back_to_torch_where_onednn_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_linear_kernel("torch", CPU, torch.float32) == ("torch", "requested")
    assert choose_linear_kernel("auto", torch.device("meta"), torch.float32) == ("torch", "device meta is not a CPU")
    assert choose_linear_kernel("auto", CPU, torch.float16)[0] == "torch"
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert choose_linear_kernel("auto", CPU, torch.float32) == ("torch", "this torch build has no oneDNN")
    with pytest.raises(ValueError, match="linear kernel onednn cannot run: this torch build has no oneDNN"):
        choose_linear_kernel("onednn", CPU, torch.float32)
    with pytest.raises(ValueError, match="unknown linear kernel"):
        choose_linear_kernel("mkl", CPU, torch.float32)


class _TiedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 16)
        self.proj = Linear(16, 16)
        self.lm_head: nn.Module | None = None


@needs_onednn
def test_a_tied_lm_head_gets_its_own_prepacked_copy_and_the_embedding_keeps_its_table(
        caplog: pytest.LogCaptureFixture) -> None:
    model = _TiedModel()
    table = model.embed_tokens.weight
    with caplog.at_level(logging.INFO, logger="conveyor.model.kernels"):
        assert apply_linear_kernel(model, "auto", None, CPU, torch.float32) == "onednn"
    assert "linear kernel for float32: onednn (oneDNN available" in caplog.text and "2 layers" in caplog.text
    assert isinstance(model.proj, OneDNNLinear) and isinstance(model.lm_head, OneDNNLinear)
    assert model.embed_tokens.weight is table
    hidden = torch.randn(4, 16)
    torch.testing.assert_close(model.lm_head(hidden), hidden @ table.T, rtol=1e-5, atol=1e-5)


def test_without_onednn_the_model_keeps_its_torch_layers_and_says_so(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    model = _TiedModel()
    with caplog.at_level(logging.INFO, logger="conveyor.model.kernels"):
        assert apply_linear_kernel(model, "auto", None, CPU, torch.float32) == "torch"
    assert "linear kernel for float32: torch (this torch build has no oneDNN; 0 layers" in caplog.text
    assert type(model.proj) is Linear and model.lm_head is None


@needs_onednn
@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_engine_on_onednn_matches_the_torch_path(tiny_model_dirs: dict[str, Path], architecture: str) -> None:
    """Same ids, logprobs within fp32 noise, with prefill chunks sharing steps with decodes."""
    prompts = [[1, 40, 41, 42], [1] + [(7 * i) % 300 + 5 for i in range(45)]]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=5)
    results = {}
    for kernel in ("torch", "onednn"):
        llm = LLM(str(tiny_model_dirs[architecture]), block_size=4, max_num_batched_tokens=7, num_kv_blocks=128,
                  linear_kernel=kernel, dtype="float32")
        model = llm.engine.runner.model
        assert any(isinstance(m, OneDNNLinear) for m in model.modules()) == (kernel == "onednn")
        results[kernel] = llm.generate(prompts, params)
    assert_same_tokens_and_logprobs(results["torch"], results["onednn"])
