"""int8 linear layers: the kernels against fp32, the two methods' swaps on real architectures, the int8
method's calibration, the engine knob."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from conveyor import EngineConfig, SamplingParams
from conveyor.engine.engine import LLMEngine
from conveyor.engine.runner import calibration_windows
from conveyor.model.int8_gemv import load_int8_gemv
from conveyor.model.kernels import choose_linear_kernel
from conveyor.model.quantization import (
    HighPrecisionLinear,
    Int8Linear,
    OneDNNInt8Linear,
    activation_maxima,
    high_precision_dtype,
    quantize_linears,
    smoothing_factors,
)
from conveyor.model.registry import build_model


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


@pytest.mark.skipif(choose_linear_kernel("auto", torch.device("cpu"), torch.int8)[0] != "onednn"
                    or load_int8_gemv()[0] is None, reason="oneDNN or the compiled int8 kernel cannot run here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows,in_features", [(5, 640), (300, 640), (37, 104)])
def test_compiled_rounding_and_epilogue_compute_what_the_int_mm_path_computes(
        dtype: torch.dtype, num_rows: int, in_features: int) -> None:
    """The compiled kernel's row rounding and epilogue around oneDNN's int8 linear (5+ rows; 104 inputs:
    a tail after the vector loop, and no few-row product), in fp32 and in a bf16 model: equal bits."""
    gemv, _ = load_int8_gemv()
    generator = torch.Generator().manual_seed(num_rows)
    weight = torch.randn(700, in_features, generator=generator) * 0.05
    bias = torch.randn(700, generator=generator)
    x = (torch.randn(num_rows, in_features, generator=generator) * torch.logspace(-3, 2, num_rows)[:, None]).to(dtype)
    x[0] = 0.0  # an all-zero row: scale clamped, every value 0
    smooth = torch.rand(in_features, generator=generator) * 4 + 0.25
    for layer_bias, layer_smooth in ((None, None), (bias, smooth)):
        reference = Int8Linear(weight, layer_bias, layer_smooth)(x)
        ours = OneDNNInt8Linear(weight, layer_bias, layer_smooth, gemv)(x)
        assert ours.dtype == dtype and torch.equal(ours, reference)


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
@pytest.mark.parametrize("method", ["int8", "int8-fast"])
def test_engine_with_int8_swaps_every_linear_and_stays_near_fp32(
        tiny_model_dirs: dict[str, Path], architecture: str, method: str) -> None:
    path = str(tiny_model_dirs[architecture])
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    prompt = [1] + [(7 * i) % 250 + 5 for i in range(20)]
    results = {}
    for quantization in (None, method):
        engine = LLMEngine(EngineConfig(model=path, block_size=4, num_kv_blocks=64, dtype="float32",
                                        quantization=quantization))
        request = engine.add_request(prompt, params)
        while engine.has_unfinished_requests():
            for output in engine.step()[0]:
                if output.finished:
                    results[quantization] = output.outputs[0]
        model = engine.runner.model
        if quantization is not None:
            assert not any(isinstance(m, nn.Linear) for m in model.modules())
        if quantization == "int8-fast":
            assert isinstance(model.lm_head, Int8Linear)  # tied or not, the logits come from int8 too
        if quantization == "int8":  # down_proj and the lm_head in bf16 (fp32 where bf16 is slow), the rest int8
            assert isinstance(model.lm_head, HighPrecisionLinear)
            for layer in model.layers:
                assert isinstance(layer.mlp.down_proj, HighPrecisionLinear)
                for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj):
                    assert isinstance(linear, Int8Linear) and linear.inv_smooth is not None
        assert request.request_id
    fp32, int8 = results[None], results[method]
    assert fp32.logprobs is not None and int8.logprobs is not None
    first_fp32 = fp32.logprobs[0][fp32.token_ids[0]].logprob
    first_int8 = int8.logprobs[0].get(fp32.token_ids[0])
    assert first_int8 is not None, "int8 lost the fp32 choice from its top 3 at the first token"
    assert abs(first_int8.logprob - first_fp32) < 0.15  # measured 0.055 on the tiny llama (int8-fast)
    # The int8 mode flushes denormals to zero only inside the model's work: the caller's code still has them.
    assert (torch.tensor([1e-40], dtype=torch.float32) * 1.0).item() != 0.0


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no bf16 in oneDNN here")
@pytest.mark.skipif(load_int8_gemv()[0] is None, reason="the few-row kernel cannot be built here")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_int8_lm_head_gives_few_row_steps_the_logits_of_a_larger_step(
        tiny_model_dirs: dict[str, Path], dtype: str) -> None:
    """Steps of 1-4 rows take the compiled w8a8 product, larger ones oneDNN's int8 linear and the compiled
    epilogue: both equal the torch reference to the bit, so a row's logits do not depend on its step."""
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dirs["gemma3"]), block_size=4, num_kv_blocks=16,
                                    dtype=dtype, quantization="int8", int8_lm_head=True))
    model = engine.runner.model
    # Unsmoothed (the calibration never runs the lm_head), no few-row head of its own: its w8a8 takes them.
    assert isinstance(model.lm_head, OneDNNInt8Linear) and model.lm_head.gemv is not None
    assert model.lm_head.inv_smooth is None and model.small_row_head is None
    hidden = torch.randn(9, model.config.hidden_size, generator=torch.Generator().manual_seed(3)).to(
        engine.runner.dtype)
    with torch.inference_mode():
        larger = model.compute_logits(hidden, upcast=False)
        assert larger.dtype == engine.runner.dtype
        for rows in range(1, 5):
            assert torch.equal(model.compute_logits(hidden[:rows], upcast=False), larger[:rows])
        reference = Int8Linear.forward(model.lm_head, model.norm(hidden))  # the torch path, every row count
    assert torch.equal(larger, reference)


def test_int8_lm_head_is_opt_in_and_only_under_the_int8_method(tiny_model_dirs: dict[str, Path]) -> None:
    """It doubles the int8 mode's KL on the default model (docs/benchmarks.md): off unless asked for."""
    assert EngineConfig().int8_lm_head is False
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dirs["gemma3"]), block_size=4, num_kv_blocks=16,
                                    dtype="float32", quantization="int8"))
    assert isinstance(engine.runner.model.lm_head, HighPrecisionLinear)
    # asked for outside the int8 method, it is refused with a clear error rather than silently ignored
    for quantization in (None, "int8-fast"):
        with pytest.raises(ValueError, match="int8_lm_head applies under quantization int8 only"):
            EngineConfig(quantization=quantization, int8_lm_head=True)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="no bf16 in oneDNN here")
def test_int8_over_bf16_keeps_bf16_activations_and_cache_and_stays_near_bf16(tiny_model_dirs: dict[str, Path]) -> None:
    path = str(tiny_model_dirs["gemma3"])
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    prompt = [1] + [(7 * i) % 250 + 5 for i in range(20)]
    first = {}
    for quantization in (None, "int8"):
        engine = LLMEngine(EngineConfig(model=path, block_size=4, num_kv_blocks=64, dtype="bfloat16",
                                        quantization=quantization))
        engine.add_request(prompt, params)
        while engine.has_unfinished_requests():
            for output in engine.step()[0]:
                if output.finished:
                    first[quantization] = output.outputs[0]
        assert engine.runner.kv_caches[0][0].dtype == torch.bfloat16
    layer = engine.runner.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Int8Linear) and layer.self_attn.qkv_proj.inv_smooth is not None
    assert engine.runner.model.embed_tokens.weight.dtype == torch.bfloat16
    bf16, int8 = first[None], first["int8"]
    assert bf16.logprobs is not None and int8.logprobs is not None
    chosen = int8.logprobs[0].get(bf16.token_ids[0])
    assert chosen is not None and abs(chosen.logprob - bf16.logprobs[0][bf16.token_ids[0]].logprob) < 0.15


def test_activation_maxima_cover_every_linear_but_the_lm_head(tiny_model_dirs: dict[str, Path]) -> None:
    from conveyor.model.loader import load_model_weights

    config, weights = load_model_weights(str(tiny_model_dirs["gemma3"]))
    model = build_model(config, 64, weights).eval()
    windows = [[1, *range(5, 40)], [1, *range(40, 60)]]
    maxima = activation_maxima(model, windows, block_size=4)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(maxima) == set(linears) - {"lm_head"} and len(maxima) == 4 * config.num_layers
    for name, seen in maxima.items():
        assert seen.shape == (linears[name].in_features,) and bool((seen > 0).all()), name
    # The maximum over both windows is at least each window's own.
    first = activation_maxima(model, windows[:1], block_size=4)
    assert all(bool((maxima[name] >= first[name]).all()) for name in maxima)


def test_smoothing_factors_balance_activation_and_weight_ranges() -> None:
    weight = torch.tensor([[1.0, 0.5, -4.0], [0.25, -2.0, 1.0]])
    factors = smoothing_factors(weight, torch.tensor([100.0, 1.0, 4.0]), alpha=0.5)
    # alpha 0.5: after smoothing, each channel's activation max and weight max are equal: sqrt(a * w).
    assert torch.allclose(factors, torch.tensor([10.0, 1 / 2 ** 0.5, 1.0]))
    assert torch.allclose(torch.tensor([100.0, 1.0, 4.0]) / factors, torch.tensor([1.0, 2.0, 4.0]) * factors)


def test_int8_needs_calibration_maxima() -> None:
    with pytest.raises(ValueError, match="activation maxima"):
        quantize_linears(nn.Sequential(nn.Linear(2, 2)), "int8")


@pytest.mark.parametrize("kernel", ["torch", "onednn"])
def test_high_precision_linear_is_the_layer_in_its_dtype(kernel: str) -> None:
    if kernel == "onednn" and choose_linear_kernel("auto", torch.device("cpu"), torch.bfloat16)[0] != "onednn":
        pytest.skip("oneDNN bf16 cannot run on this machine")
    generator = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(48, 64, generator=generator), torch.randn(48, generator=generator)
    for rows in (0, 1, 5, 40):
        x = torch.randn(rows, 64, generator=generator)
        out = HighPrecisionLinear(weight, bias, torch.bfloat16, kernel)(x)
        expected = torch.nn.functional.linear(x.bfloat16(), weight.bfloat16(), bias.bfloat16()).float()
        assert out.dtype == torch.float32 and out.shape == (rows, 48)
        assert torch.allclose(out, expected, rtol=1e-2, atol=1e-2)
        exact = HighPrecisionLinear(weight, bias, torch.float32, kernel)(x)
        assert torch.allclose(exact, x @ weight.t() + bias, rtol=1e-5, atol=1e-5)


def test_high_precision_layers_take_bf16_only_where_the_cpu_runs_it_natively(monkeypatch: pytest.MonkeyPatch) -> None:
    import conveyor.model.quantization as quantization

    monkeypatch.setattr(quantization, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni", "avx512_bf16"}))
    assert high_precision_dtype() == torch.bfloat16
    monkeypatch.setattr(quantization, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    assert high_precision_dtype() == torch.float32


def test_calibration_reads_an_os_text_that_is_not_the_evaluation_text(tiny_model_dirs: dict[str, Path]) -> None:
    from conveyor.bench.quality import DEFAULT_TEXT
    from conveyor.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dirs["gemma3"]))
    path, windows = calibration_windows(tokenizer, bos_id=2, max_len=100)
    assert path != DEFAULT_TEXT and Path(path).is_file()
    assert all(window[0] == 2 and 2 not in window[1:] and len(window) <= 100 for window in windows)
    assert sum(len(w) - 1 for w in windows) == 1024


def test_int8_calibration_is_cached(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CONVEYOR_CACHE_DIR", str(tmp_path))
    config = EngineConfig(model=str(tiny_model_dirs["llama"]), block_size=4, num_kv_blocks=64, quantization="int8")
    with caplog.at_level("INFO", logger="conveyor.engine.runner"):
        first = LLMEngine(config)
        second = LLMEngine(config)
    messages = [r.getMessage() for r in caplog.records if "int8 calibration" in r.getMessage()]
    assert len(messages) == 2 and "(cached)" in messages[0] and "cached maxima" in messages[1]
    assert len(list((tmp_path / "calibration").glob("*.safetensors"))) == 1
    layer = lambda engine: engine.runner.model.layers[0].self_attn.qkv_proj  # noqa: E731
    assert torch.equal(layer(first).inv_smooth, layer(second).inv_smooth)


def test_unknown_quantization_is_refused() -> None:
    with pytest.raises(ValueError, match="quantization must be one of int8, int8-fast"):
        EngineConfig(quantization="int4")
    with pytest.raises(ValueError, match="unsupported quantization 'fp4'"):
        quantize_linears(nn.Sequential(nn.Linear(2, 2)), "fp4")
