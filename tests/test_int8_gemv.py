"""Steps of 1-4 rows in C++ (conveyor.model.int8_gemv): int8 and bf16 weights, against the torch/oneDNN paths."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conveyor import LLM, SamplingParams
from conveyor.model import int8_gemv
from conveyor.model.int8_gemv import (
    LM_HEAD_GROUP,
    Bf16Rows,
    SmallRowLmHead,
    load_int8_gemv,
    lossless_groups,
    pack,
)
from conveyor.model.kernels import OneDNNLinear, apply_linear_kernel, onednn_unavailable_reason
from conveyor.model.quantization import (
    HighPrecisionLinear,
    Int8Linear,
    OneDNNInt8Linear,
    high_precision_dtype,
)
from tests.conftest import TINY_ARCHITECTURES
from tests.reference import assert_same_tokens_and_logprobs

CPU = torch.device("cpu")
needs_gemv = pytest.mark.skipif(load_int8_gemv()[0] is None, reason="the C++ kernel cannot be built here")
needs_onednn_bf16 = pytest.mark.skipif(onednn_unavailable_reason(CPU, torch.bfloat16) is not None,
                                       reason="oneDNN's bf16 linear (the reference) does not run here")


def _q8_0_table(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A table as a GGUF Q8_0 tensor dequantizes: int8 values times an fp16 scale per 32 of a row."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(-127, 128, (rows, cols // 32, 32), generator=generator).float()
    values[..., 0] = 127.0  # Q8_0 sets each block's scale from its largest value: it rounds to +-127
    scales = (torch.rand(rows, cols // 32, 1, generator=generator) * 1e-3).half().float()
    return (values * scales).reshape(rows, cols)


def _reference_and_kernel_layers(layer_class: type[Int8Linear], in_features: int, out_features: int,
                                 gemv: object, generator: torch.Generator) -> list[tuple[Int8Linear, Int8Linear]]:
    """(the torch reference layer, the same weights in `layer_class` with the few-row kernel), without and
    with SmoothQuant smoothing."""
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    bias = torch.randn(out_features, generator=generator)
    smooth = torch.rand(in_features, generator=generator) + 0.5
    return [(Int8Linear(weight, bias, layer_smooth), layer_class(weight, bias, layer_smooth, gemv))
            for layer_smooth in (None, smooth)]


@needs_gemv
@pytest.mark.parametrize("layer_class", [Int8Linear, OneDNNInt8Linear])
@pytest.mark.parametrize(("in_features", "out_features"), [(64, 8), (640, 1536), (2048, 638), (128, 4097)])
def test_the_int8_layers_few_row_product_equals_the_reference_to_the_bit(
        layer_class: type[Int8Linear], in_features: int, out_features: int) -> None:
    gemv = load_int8_gemv()[0]
    generator = torch.Generator().manual_seed(in_features + out_features)
    for reference, ours in _reference_and_kernel_layers(layer_class, in_features, out_features, gemv, generator):
        assert ours.gemv is gemv
        for rows in (1, 2, 3, 4, 9):  # 9: past the kernel's rows, the layer's own path
            x = torch.randn(rows, in_features, generator=generator) * 4
            x[0, :5] = 0.0
            assert torch.equal(ours(x), reference(x))
    # The kernel steps 64 inputs at a time: other widths keep the layer's own path.
    assert Int8Linear(torch.randn(8, 96), None, None, gemv).gemv is None


@needs_gemv
@pytest.mark.parametrize("layer_class", [Int8Linear, OneDNNInt8Linear])
@pytest.mark.parametrize(("in_features", "out_features"), [(64, 8), (640, 1536), (2048, 638)])
def test_bf16_rows_go_into_the_few_row_product_as_their_exact_fp32_values(
        layer_class: type[Int8Linear], in_features: int, out_features: int) -> None:
    """A bf16 model's rows are read in bf16 by the kernel, no fp32 copy made first: the same bits as the
    reference path, which widens them to fp32 (exact) and rounds its result to bf16."""
    gemv = load_int8_gemv()[0]
    generator = torch.Generator().manual_seed(in_features * 3 + out_features)
    for reference, ours in _reference_and_kernel_layers(layer_class, in_features, out_features, gemv, generator):
        empty = torch.empty(0)
        for rows in (1, 2, 3, 4):
            x = (torch.randn(rows, in_features, generator=generator) * 4).to(torch.bfloat16)
            x[0, :5] = 0.0
            expected = reference(x.float()).to(torch.bfloat16)
            assert torch.equal(ours(x), expected)
            assert ours(x).dtype == torch.bfloat16
            inv = ours.inv_smooth if ours.inv_smooth is not None else empty
            kernel_args = (inv, ours.packed_rows, ours.weight_scale, ours.weight_sums, out_features)
            assert torch.equal(gemv.w8a8(x, *kernel_args), gemv.w8a8(x.float(), *kernel_args))
        strided = (torch.randn(3, 2 * in_features, generator=generator)).to(torch.bfloat16)[:, ::2]
        assert torch.equal(ours(strided), reference(strided.float()).to(torch.bfloat16))


@needs_gemv
@pytest.mark.parametrize("group", [32, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_weight_only_product_matches_fp32_within_summation_order(group: int | None, dtype: torch.dtype) -> None:
    gemv = load_int8_gemv()[0]
    generator = torch.Generator().manual_seed(3)
    n, k = 1027, 640  # n not a multiple of the 4-channel blocks
    values = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
    group = group or k
    scales = torch.rand(n, k // group, generator=generator) + 0.01
    weight = (values.float().reshape(n, k // group, group) * scales[..., None]).reshape(n, k)
    for rows in (1, 2, 3, 4):
        x = torch.randn(rows, k, generator=generator).to(dtype)
        ours = gemv.weight_only(x, pack(values, gemv.WEIGHT_ONLY_STEP), scales, n, group)
        reference = x.double() @ weight.double().t()
        assert ours.dtype == torch.float32 and ours.shape == (rows, n)
        bound = 1e-6 * (x.double().abs() @ weight.double().abs().t()) + 1e-6
        assert ((ours.double() - reference).abs() <= bound).all()
    with pytest.raises(RuntimeError, match="1 to 4 rows"):
        gemv.weight_only(torch.zeros(5, k), pack(values, 16), scales, n, group)


def _close_to_bf16_rounding(ours: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor) -> bool:
    """`ours` (bf16 values) is `exact` (fp64) rounded to bf16, give or take a bf16 step (fp32 sums in two
    summation orders may round to neighbours) and fp32 summation noise (`magnitude`: the sum of |products|)."""
    bound = exact.abs() * 2.0 ** -6 + magnitude * 1e-5 + 1e-30
    return bool(((ours.double() - exact).abs() <= bound).all())


@needs_gemv
@pytest.mark.parametrize(("in_features", "out_features"), [(32, 5), (640, 1536), (2048, 638), (1024, 4097)])
def test_the_bf16_product_is_a_bf16_linear_within_summation_order(in_features: int, out_features: int) -> None:
    gemv = load_int8_gemv()[0]
    generator = torch.Generator().manual_seed(in_features + out_features)
    weight = (torch.randn(out_features, in_features, generator=generator) * 0.05).bfloat16()
    bias = torch.randn(out_features, generator=generator).bfloat16()
    for layer_bias in (None, bias):
        rows_kernel = Bf16Rows(weight, layer_bias, gemv)
        for rows in (1, 2, 3, 4):
            x = torch.randn(rows, in_features, generator=generator) * 3
            exact = x.bfloat16().double() @ weight.double().t()
            magnitude = x.bfloat16().double().abs() @ weight.double().abs().t()
            if layer_bias is not None:
                exact += layer_bias.double()
            for dtype in (torch.float32, torch.bfloat16):  # fp32 rows are rounded to bf16 first
                ours = rows_kernel(x.to(dtype))
                assert ours.dtype == dtype and ours.shape == (rows, out_features)
                assert torch.equal(ours, ours.bfloat16().to(dtype))  # bf16 values, as a bf16 linear gives
                assert _close_to_bf16_rounding(ours, exact, magnitude)
    with pytest.raises(RuntimeError, match="1 to 4 rows"):
        gemv.bf16(torch.zeros(5, in_features), rows_kernel.packed, torch.empty(0), out_features)
    with pytest.raises(RuntimeError, match="BFloat16"):
        gemv.bf16(torch.zeros(1, in_features), rows_kernel.packed.float(), torch.empty(0), out_features)


@needs_gemv
@needs_onednn_bf16
def test_bf16_layers_take_the_kernel_at_1_to_4_rows_and_onednn_beyond() -> None:
    gemv = load_int8_gemv()[0]
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(300, 640, generator=generator) * 0.05
    bias = torch.randn(300, generator=generator)
    layers = [OneDNNLinear(weight.bfloat16(), bias.bfloat16(), gemv),
              HighPrecisionLinear(weight, bias, torch.bfloat16, "onednn", gemv)]
    references = [OneDNNLinear(weight.bfloat16(), bias.bfloat16()),
                  HighPrecisionLinear(weight, bias, torch.bfloat16, "onednn")]
    for layer, reference, dtype in zip(layers, references, (torch.bfloat16, torch.float32), strict=True):
        assert layer.small_rows is not None and reference.small_rows is None
        for rows in (1, 4, 9):
            x = (torch.randn(rows, 640, generator=generator) * 3).to(dtype)
            ours, theirs = layer(x), reference(x)
            assert ours.dtype == theirs.dtype == dtype
            if rows > 4:  # past the kernel's rows: oneDNN's own product
                assert torch.equal(ours, theirs)
            else:
                assert torch.equal(ours, layer.small_rows(x))
                rounded_x, rounded_w = x.bfloat16().double(), weight.bfloat16().double()
                exact = rounded_x @ rounded_w.t() + bias.bfloat16().double()
                magnitude = rounded_x.abs() @ rounded_w.abs().t()
                assert _close_to_bf16_rounding(ours, exact, magnitude)
                assert _close_to_bf16_rounding(theirs, exact, magnitude)
    # Not bf16, or inputs not 32 at a time, or no kernel: oneDNN at every row count.
    assert OneDNNLinear(weight, bias, gemv).small_rows is None
    assert OneDNNLinear(torch.randn(8, 48).bfloat16(), None, gemv).small_rows is None
    assert HighPrecisionLinear(weight, bias, torch.float32, "onednn", gemv).small_rows is None
    assert HighPrecisionLinear(weight, bias, torch.bfloat16, "torch", gemv).small_rows is None


def test_only_a_lossless_table_becomes_int8() -> None:
    table = _q8_0_table(100, 64, seed=1)
    values, scales = lossless_groups(table)  # type: ignore[misc]
    assert values.dtype == torch.int8 and scales.shape == (100, 64 // LM_HEAD_GROUP)
    assert torch.equal((values.float().reshape(100, 2, 32) * scales[..., None]).reshape(100, 64), table)
    assert lossless_groups(table + 1e-9) is None  # off the int8 grid
    assert lossless_groups(torch.randn(100, 64)) is None
    assert lossless_groups(table.bfloat16()) is None  # only fp32 tables are checked
    assert lossless_groups(torch.zeros(4, 64)) is not None  # an all-zero block is its own int8 form


@needs_gemv
def test_the_small_row_lm_head_is_the_fp32_lm_head() -> None:
    gemv = load_int8_gemv()[0]
    table = _q8_0_table(3001, 640, seed=2)
    head = SmallRowLmHead(*lossless_groups(table), gemv)  # type: ignore[misc]
    hidden = torch.randn(3, 640, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(head(hidden), hidden @ table.t(), rtol=1e-5, atol=1e-5)


def test_without_the_kernel_the_layers_keep_their_paths_and_say_why(monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    def model() -> torch.nn.Module:
        net = torch.nn.Module()
        net.proj = torch.nn.Linear(64, 16)
        net.embed_tokens = torch.nn.Embedding(40, 64)
        net.lm_head = None
        net.small_row_head = None
        return net

    table = _q8_0_table(40, 64, seed=5)
    with caplog.at_level(logging.INFO, logger="conveyor.model.kernels"):
        torch_path = model()
        apply_linear_kernel(torch_path, "torch", "int8-fast", CPU, torch.float32, None, table)
        assert torch_path.small_row_head is None and torch_path.proj.gemv is None
        assert "small-row int8 kernel: torch (the linear kernel is torch; lm_head int8 (int8-fast))" in caplog.text
        monkeypatch.setattr(int8_gemv, "load_int8_gemv", lambda: (None, "no compiler"))
        unbuilt = model()
        apply_linear_kernel(unbuilt, "auto", None, CPU, torch.float32, None, table)
        assert unbuilt.small_row_head is None
        assert "small-row int8 kernel: torch (no compiler; lm_head kept)" in caplog.text


def _lossless_head_copy(source: Path, target: Path) -> Path:
    """The tiny model with its embedding and lm_head rounded as GGUF Q8_0 stores them."""
    shutil.copytree(source, target)
    weights = load_file(str(target / "model.safetensors"))
    for name, tensor in weights.items():
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            values, scales = lossless_groups_or_round(tensor.float())
            weights[name] = (values.float().reshape(tensor.shape[0], -1, 32) * scales[..., None]).reshape(tensor.shape)
    save_file(weights, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def lossless_groups_or_round(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = table.reshape(table.shape[0], -1, 32)
    scales = (blocks.abs().amax(dim=2) / 127.0).half().float().clamp_min(1e-8)
    return torch.round(blocks / scales[..., None]).clamp(-127, 127).to(torch.int8).reshape(table.shape), scales


@needs_gemv
@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
@pytest.mark.parametrize(("dtype", "quantization"), [("float32", None), ("float32", "int8"), ("bfloat16", None)])
def test_engine_on_the_kernel_matches_the_engine_without_it(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch, architecture: str,
                                                            dtype: str, quantization: str | None) -> None:
    """Same ids, logprobs within the precision's noise: decodes of 1-3 rows take the kernel, prefill chunks
    do not.

    fp32: the lm_head (made lossless) is the kernel's part. int8: the int8 layers (equal to the bit) and
    the bf16 down_proj (summation order); its lm_head is left as it is (lossless, the kernel's fp32 product
    would replace its bf16 one). bf16: the decoder's linears (summation order) and the lossless lm_head."""
    if dtype == "bfloat16" and onednn_unavailable_reason(CPU, torch.bfloat16) is not None:
        pytest.skip("oneDNN's bf16 linear does not run here")
    model_dir = tiny_model_dirs[architecture]
    if quantization is None:
        model_dir = _lossless_head_copy(model_dir, tmp_path / architecture)
    prompts = [[1, 40, 41, 42], [1] + [(7 * i) % 300 + 5 for i in range(45)], [1, 40, 41, 42, 43, 44]]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)
    kwargs = dict(block_size=4, max_num_batched_tokens=7, num_kv_blocks=128, dtype=dtype, quantization=quantization)
    ours = LLM(str(model_dir), **kwargs)
    model = ours.engine.runner.model
    assert (model.small_row_head is not None) == (quantization is None)
    assert all(m.gemv is not None for m in model.modules() if isinstance(m, Int8Linear) and m.in_features % 64 == 0)
    in_bf16 = dtype == "bfloat16" or (quantization == "int8" and high_precision_dtype() == torch.bfloat16)
    layers = [m for m in model.layers.modules() if isinstance(m, (OneDNNLinear, HighPrecisionLinear))]
    assert layers and all((m.small_rows is not None) == in_bf16 for m in layers if m.in_features % 32 == 0)
    assert getattr(model.lm_head, "small_rows", None) is None  # the lm_head's small steps: small_row_head
    results = ours.generate(prompts, params)
    if dtype == "bfloat16":  # the same lm_head (the kernel's), so that the bf16 layers are the difference
        monkeypatch.setattr(Bf16Rows, "fits", staticmethod(lambda weight, gemv: False))
    else:
        monkeypatch.setattr(int8_gemv, "load_int8_gemv", lambda: (None, "disabled by the test"))
    reference = LLM(str(model_dir), **kwargs)
    assert (reference.engine.runner.model.small_row_head is None) == (dtype != "bfloat16")
    tolerance = 1e-4 if dtype == "float32" and quantization is None else 2e-2
    assert_same_tokens_and_logprobs(reference.generate(prompts, params), results, tolerance=tolerance)


@needs_gemv
@pytest.mark.slow
def test_the_default_models_lm_head_is_lossless_and_decodes_as_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default GGUF's tied embedding is Q8_0: the int8 lm_head is the fp32 one, one stream decodes the same."""
    prompts = ["The capital of France is", "def fibonacci(n):\n    "]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)
    ours = LLM(dtype="float32")
    assert ours.engine.runner.model.small_row_head is not None
    results = [ours.generate([prompt], params)[0] for prompt in prompts]  # one row at a time
    del ours
    monkeypatch.setattr(int8_gemv, "load_int8_gemv", lambda: (None, "disabled by the test"))
    reference = LLM(dtype="float32")
    assert_same_tokens_and_logprobs([reference.generate([prompt], params)[0] for prompt in prompts], results,
                                    tolerance=1e-3)
