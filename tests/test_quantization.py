"""Opt-in int8 linear layers: the kernel against fp32, the swap on real architectures, the engine knob."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conveyor import EngineConfig, SamplingParams
from conveyor.engine.engine import LLMEngine
from conveyor.model.kernels import choose_linear_kernel
from conveyor.model.quantization import Int8Linear, OneDNNInt8Linear, quantize_linears


def test_int8_linear_is_close_to_fp32_for_every_row_scale() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=True)
    # Rows of very different magnitude: each token gets its own activation scale.
    x = torch.randn(3, 5, 96) * torch.tensor([1e-3, 1.0, 50.0]).view(3, 1, 1)
    expected = linear(x).detach()
    got = Int8Linear(linear.weight, linear.bias)(x)
    assert got.shape == expected.shape and got.dtype == x.dtype
    error = (got - expected).abs().amax(dim=-1) / expected.abs().amax(dim=-1)
    assert float(error.max()) < 0.03
    # ... and it really is quantized: the result is not the fp32 one.
    assert not torch.equal(got, expected)


def test_int8_linear_handles_zero_rows_and_weights() -> None:
    weight = torch.zeros(4, 8)
    weight[0, 0] = 1.0
    out = Int8Linear(weight)(torch.zeros(2, 8))
    assert torch.equal(out, torch.zeros(2, 4))


@pytest.mark.skipif(choose_linear_kernel("auto", torch.device("cpu"), torch.int8)[0] != "onednn",
                    reason="oneDNN cannot run on this machine")
@pytest.mark.parametrize("num_rows", [0, 1, 9, 300])
@pytest.mark.parametrize("with_bias", [False, True])
def test_onednn_int8_linear_computes_what_the_int_mm_path_computes(num_rows: int, with_bias: bool) -> None:
    """The same int8 values, exact integer sums and the same two fp32 scalings in the same order: equal bits.

    Bit-equality matters: a last-bit difference can flip the next layer's int8 rounding and grow."""
    generator = torch.Generator().manual_seed(num_rows)
    weight = torch.randn(700, 640, generator=generator) * 0.05
    bias = torch.randn(700, generator=generator) if with_bias else None
    x = torch.randn(num_rows, 640, generator=generator) * torch.logspace(-3, 2, num_rows)[:, None]
    reference = Int8Linear(weight, bias)(x)
    ours = OneDNNInt8Linear(weight, bias)(x)
    assert ours.shape == (num_rows, 700)
    assert torch.equal(ours, reference)
    smooth = torch.rand(640, generator=generator) * 4 + 0.25
    assert torch.equal(OneDNNInt8Linear(weight, bias, smooth)(x), Int8Linear(weight, bias, smooth)(x))


def test_smoothing_moves_an_outlier_channel_into_the_weight() -> None:
    """One input channel 100x the others sets every token's int8 step; dividing it out before rounding
    (and multiplying it into the weight's column) keeps the other channels' precision."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 256, generator=generator) * 0.05
    x = torch.randn(32, 256, generator=generator)
    x[:, 7] *= 100.0
    expected = x @ weight.t()
    smooth = torch.ones(256)
    smooth[7] = 30.0

    def error(layer: Int8Linear) -> float:
        return float((layer(x) - expected).norm() / expected.norm())

    plain, smoothed = error(Int8Linear(weight)), error(Int8Linear(weight, smooth=smooth))
    assert smoothed < plain / 2, (plain, smoothed)


@pytest.mark.parametrize("architecture", ["gemma3", "llama"])
def test_engine_with_int8_swaps_every_linear_and_stays_near_fp32(
        tiny_model_dirs: dict[str, Path], architecture: str) -> None:
    path = str(tiny_model_dirs[architecture])
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    prompt = [1] + [(7 * i) % 250 + 5 for i in range(20)]
    results = {}
    for quantization in (None, "int8"):
        engine = LLMEngine(EngineConfig(model=path, block_size=4, num_kv_blocks=64, quantization=quantization))
        request = engine.add_request(prompt, params)
        while engine.has_unfinished_requests():
            for output in engine.step()[0]:
                if output.finished:
                    results[quantization] = output.outputs[0]
        model = engine.runner.model
        if quantization == "int8":
            assert not any(isinstance(m, nn.Linear) for m in model.modules())
            assert isinstance(model.lm_head, Int8Linear)  # tied or not, the logits come from int8 too
        assert request.request_id
    fp32, int8 = results[None], results["int8"]
    assert fp32.logprobs is not None and int8.logprobs is not None
    first_fp32 = fp32.logprobs[0][fp32.token_ids[0]].logprob
    first_int8 = int8.logprobs[0].get(fp32.token_ids[0])
    assert first_int8 is not None, "int8 lost the fp32 choice from its top 3 at the first token"
    assert abs(first_int8.logprob - first_fp32) < 0.15  # measured 0.055 on the tiny llama


def test_unknown_quantization_is_refused() -> None:
    with pytest.raises(ValueError, match="quantization must be one of int8"):
        EngineConfig(quantization="int4")
    with pytest.raises(ValueError, match="unsupported quantization 'fp4'"):
        quantize_linears(nn.Sequential(nn.Linear(2, 2)), "fp4")
