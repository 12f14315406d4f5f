"""int8 compute for the linear layers (`EngineConfig.quantization`): two methods.

`int8-fast`: every linear layer in int8. Weights are rounded to int8 once, with one scale per output
channel; activations are rounded to int8 on every call, with one scale per token (row), so a token with
large activations does not cost the others their precision. The matmul runs in integers (int32
accumulation, exact) and the two scales are applied to its result: `torch._int_mm` is the reference
kernel; on a CPU where oneDNN runs, `OneDNNInt8Linear` does the same integer products through oneDNN's
int8 linear with the weight prepacked once. Fastest, but its next-token distributions drift from the
exact model's ~8x more than llama.cpp's Q4_K_M compute does (docs/benchmarks.md, "Quality").

`int8`: int8 where rounding is cheap, SmoothQuant-smoothed (q/k/v, o, gate/up), and bf16 (fp32 where
bf16 is slow) in the two layers whose inputs rounding hurts most: down_proj (heavy-tailed gelu(gate) *
up) and, with `int8_head` off, the lm_head. The smoothing factors come from the activations' per-channel maxima over a short
calibration pass at load (`activation_maxima`, on an OS-shipped English text). Within llama.cpp's
Q4_K_M error on the same tokens (docs/benchmarks.md, "A better int8 mode").

Embedding lookups, norms and attention stay in the model dtype. On a CPU with native bf16 `int8` runs
over a bf16 model (`EngineConfig.precision`): bf16 rows are rounded to int8 and the int8 layers' results
rounded to bf16 by the compiled kernel's `quantize_rows` / `scale_rows` (`OneDNNInt8Linear.forward`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from conveyor.config import QUANTIZATION_METHODS, cpu_flags
from conveyor.model.attention import SequenceSpan, build_attention_metadata
from conveyor.model.int8_gemv import MAX_ROWS, Bf16Rows, pack
from conveyor.model.layers import linear, swap_linears

# oneDNN's int8 linear takes unsigned activations: int8 values shifted by this, undone by its zero point.
_UINT8_SHIFT = 128
# The int8 method: SmoothQuant's migration strength, and the layers it keeps out of int8 (docs/benchmarks.md).
SMOOTHING_ALPHA = 0.5
_HIGH_PRECISION_LAYERS = ("down_proj", "lm_head")
_NO_TENSOR = torch.empty(0)  # the compiled kernel's "none" for an optional tensor


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row: (int8 values, fp32 scales [rows, 1])."""
    scale = t.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    return torch.round(t / scale).to(torch.int8), scale


class Int8Linear(nn.Module):
    """`y = x @ W.T + b` with W stored as int8 [in, out] (transposed for `_int_mm`) and per-row scales.

    `smooth` (one factor per input channel, SmoothQuant): the weight's columns are multiplied by it before
    rounding and the activations divided by it before theirs, so a channel with outsized activations no
    longer sets every token's int8 step; the product is unchanged in exact arithmetic.

    `gemv` (`conveyor.model.int8_gemv`'s compiled kernel): steps of 1-4 rows take it, the same product
    to the bit, with the weight packed once more in its layout.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 smooth: torch.Tensor | None = None, gemv: Any = None) -> None:
        super().__init__()
        weight = weight.detach().float()
        self.inv_smooth: torch.Tensor | None = None
        if smooth is not None:
            weight = weight * smooth.float()[None, :]
            self.inv_smooth = (1.0 / smooth.float()).contiguous()
        quantized, scale = quantize_rows(weight)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight_scale", scale.squeeze(1))  # [out_features], fp32
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self._store_weight(quantized)
        self.kernels = gemv  # the compiled module: OneDNNInt8Linear rounds and scales rows with it
        self.gemv = gemv if gemv is not None and self.in_features % gemv.W8A8_STEP == 0 else None
        if self.gemv is not None:
            self.register_buffer("packed_rows", pack(quantized, gemv.W8A8_STEP))
            self.register_buffer("weight_sums", quantized.sum(dim=1, dtype=torch.int32))

    def _store_weight(self, quantized: torch.Tensor) -> None:
        self.register_buffer("weight_t", quantized.t().contiguous())  # [in_features, out_features]

    def _scaled_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """fp32 rows [S, in] -> fp32 x @ W.T through int8, both scales applied."""
        quantized, row_scale = quantize_rows(rows)
        # Weight scale first, as oneDNN applies it: the two kernels then agree to the bit.
        return torch._int_mm(quantized, self.weight_t).float().mul_(self.weight_scale).mul_(row_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if (self.gemv is not None and 1 <= rows.shape[0] <= MAX_ROWS
                and rows.dtype in (torch.float32, torch.bfloat16)):
            # bf16 rows go in as they are: the kernel widens them (exact), with no fp32 copy made first.
            smooth = self.inv_smooth if self.inv_smooth is not None else rows.new_empty(0)
            out = self.gemv.w8a8(rows, smooth, self.packed_rows, self.weight_scale, self.weight_sums,
                                 self.out_features)
        else:
            rows = rows.float()
            if self.inv_smooth is not None:
                rows = rows * self.inv_smooth
            out = self._scaled_matmul(rows)
        if self.bias is not None:
            out.add_(self.bias.float())
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class OneDNNInt8Linear(Int8Linear):
    """Int8Linear's arithmetic through oneDNN's int8 linear, with the int8 weight prepacked once.

    The prepacked weight is an opaque oneDNN tensor, held as a plain attribute like `OneDNNLinear`'s.
    """

    def _store_weight(self, quantized: torch.Tensor) -> None:
        self.packed_weight = torch.ops.onednn.qlinear_prepack(quantized, None)
        self.weight_zero_point = torch.zeros(self.out_features, dtype=torch.long)

    def _int8_matmul(self, shifted: torch.Tensor) -> torch.Tensor:
        """(int8 rows + 128) as uint8 -> fp32 integer sums times the weight scales, through oneDNN."""
        return torch.ops.onednn.qlinear_pointwise(
            shifted, 1.0, _UINT8_SHIFT, self.packed_weight, self.weight_scale, self.weight_zero_point, None,
            1.0, 0, torch.float32, "none", [], "")

    def _scaled_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.shape[0] == 0:  # oneDNN refuses an empty input
            return rows.new_empty(0, self.out_features)
        quantized, row_scale = quantize_rows(rows)
        # v + 128 as a byte is v's two's-complement byte with its top bit flipped.
        return self._int8_matmul(quantized.view(torch.uint8).bitwise_xor_(_UINT8_SHIFT)).mul_(row_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.kernels is None or rows.shape[0] == 0 or (self.gemv is not None and rows.shape[0] <= MAX_ROWS):
            return super().forward(x)
        # The compiled kernel's rounding and epilogue: the same values as Int8Linear's torch ops, each in
        # one pass, and the rows of a bf16 model read and written in bf16 (no fp32 copies).
        if rows.dtype not in (torch.float32, torch.bfloat16):
            rows = rows.float()
        smooth = self.inv_smooth if self.inv_smooth is not None else _NO_TENSOR
        shifted, row_scale = self.kernels.quantize_rows(rows, smooth)
        bias = self.bias.float() if self.bias is not None else _NO_TENSOR
        out = self.kernels.scale_rows(self._int8_matmul(shifted), row_scale, bias, rows.dtype == torch.bfloat16)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class HighPrecisionLinear(nn.Module):
    """A linear layer of the `int8` method that rounding would hurt, run in `dtype` (bf16, or fp32 where
    bf16 is slow) inside an fp32 or bf16 model: the input is cast to `dtype` and the output back.

    The "onednn" kernel prepacks the weight like `conveyor.model.kernels.OneDNNLinear`, and with `gemv`
    a bf16 layer runs steps of 1-4 rows through the C++ bf16 product (`Bf16Rows`), as that one does.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, kernel: str,
                 gemv: Any = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = dtype
        weight = weight.detach().to(dtype).contiguous()
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight) if kernel == "onednn" else None
        if self.packed_weight is None:
            self.register_buffer("weight", weight)
        use_gemv = kernel == "onednn" and Bf16Rows.fits(weight, gemv)
        self.small_rows = Bf16Rows(weight, self.bias, gemv) if use_gemv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.small_rows is not None and x.dtype in (torch.float32, torch.bfloat16)
                and 1 <= x.numel() // self.in_features <= MAX_ROWS):
            # The kernel rounds fp32 rows to bf16 itself and gives back bf16 values in x's dtype.
            return self.small_rows(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
        rows = x.reshape(-1, self.in_features).to(self.compute_dtype)
        if self.packed_weight is None:
            out = linear(rows, self.weight, self.bias)
        elif rows.shape[0] == 0:  # oneDNN refuses an empty input
            out = rows.new_empty(0, self.out_features)
        else:
            out = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), self.packed_weight, self.bias, "none", [], "")
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.compute_dtype}"


@torch.inference_mode()
def activation_maxima(model: nn.Module, windows: list[list[int]], block_size: int = 16) -> dict[str, torch.Tensor]:
    """Each linear layer's largest |input| per input channel over `windows` of token ids, each run as one
    prefill through the (unquantized) model: {module name: fp32 [in_features]}. The lm_head is not run."""
    maxima: dict[str, torch.Tensor] = {}

    def record(name: str):  # type: ignore[no-untyped-def]
        def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            seen = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(dim=0).float()
            maxima[name] = seen if name not in maxima else torch.maximum(maxima[name], seen)
        return hook

    handles = [module.register_forward_pre_hook(record(name))
               for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    try:
        device = next(model.parameters()).device
        num_blocks = -(-max(len(ids) for ids in windows) // block_size)
        dtype = next(model.parameters()).dtype
        kv_caches = model.allocate_kv_cache(num_blocks + 1, block_size, dtype, device)  # type: ignore[operator]
        for ids in windows:
            span = SequenceSpan(0, 0, len(ids), list(range(1, -(-len(ids) // block_size) + 1)))
            meta = build_attention_metadata([span], block_size, model.config.sliding_window, device)  # type: ignore[union-attr]
            positions = torch.arange(len(ids), device=device)
            model.hidden_states(torch.tensor(ids, device=device), positions, kv_caches, meta)  # type: ignore[operator]
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def smoothing_factors(weight: torch.Tensor, activation_max: torch.Tensor, alpha: float = SMOOTHING_ALPHA) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors, max|X_j|^alpha / max|W_j|^(1 - alpha): alpha 0.5 splits each
    channel's range evenly between the activations (divided by it) and the weight's column (multiplied)."""
    weight_max = weight.detach().float().abs().amax(dim=0).clamp_min(1e-5)
    return (activation_max.float().clamp_min(1e-5) ** alpha / weight_max ** (1 - alpha)).clamp_min(1e-5)


def high_precision_dtype() -> torch.dtype:
    """bf16 where the CPU runs it natively (AVX-512 BF16 or AMX), else fp32: emulated bf16 is slower."""
    return torch.bfloat16 if not {"avx512_bf16", "amx_bf16"}.isdisjoint(cpu_flags()) else torch.float32


def quantize_linears(model: nn.Module, method: str, kernel: str = "torch",
                     maxima: dict[str, torch.Tensor] | None = None, gemv: Any = None, int8_head: bool = False) -> int:
    """Swap every nn.Linear in `model` for its quantized form, in place; returns how many were swapped.

    `kernel` "onednn" takes oneDNN's int8 linear, "torch" `torch._int_mm`. A model whose lm_head is tied
    to the embedding gets its own lm_head (the embedding keeps its full-precision table for lookups).
    `method` "int8" needs `maxima` (`activation_maxima` of the unquantized model) for its smoothing.
    `gemv`: the few-row kernel of the int8 layers (`Int8Linear`) and of down_proj in bf16, or None.
    `int8_head`: under "int8", the lm_head is an int8 layer too (one scale per vocabulary row, one per
    token, no smoothing), as int8-fast's is; else it stays in bf16 (fp32 where bf16 is slow).
    """
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"unsupported quantization {method!r}; choose from {', '.join(QUANTIZATION_METHODS)}")
    int8_class = OneDNNInt8Linear if kernel == "onednn" else Int8Linear

    def int8_linear(weight: torch.Tensor, bias: torch.Tensor | None, smooth: torch.Tensor | None = None) -> Int8Linear:
        return int8_class(weight, bias, smooth, gemv)

    if method == "int8-fast":
        return swap_linears(model, int8_linear)
    if maxima is None:
        raise ValueError("quantization int8 needs the activation maxima of a calibration pass")
    precise = high_precision_dtype()
    swapped = 0
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            full_name = f"{parent_name}.{name}" if parent_name else name
            if name == "lm_head" and int8_head:
                layer: nn.Module = int8_linear(child.weight, child.bias)
            elif name in _HIGH_PRECISION_LAYERS:  # a bf16 lm_head's few-row steps have a head of their own
                layer = HighPrecisionLinear(child.weight, child.bias, precise, kernel,
                                                       gemv if name != "lm_head" else None)
            else:
                layer = int8_linear(child.weight, child.bias, smoothing_factors(child.weight, maxima[full_name]))
            setattr(parent, name, layer)
            swapped += 1
    embed = getattr(model, "embed_tokens", None)
    if getattr(model, "lm_head", "absent") is None and isinstance(embed, nn.Embedding):
        model.lm_head = (int8_linear(embed.weight, None) if int8_head  # type: ignore[assignment]
                         else HighPrecisionLinear(embed.weight, None, precise, kernel))
        swapped += 1
    return swapped
