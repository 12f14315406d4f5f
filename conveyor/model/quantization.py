"""Opt-in int8 compute for the linear layers (`EngineConfig.quantization = "int8"`).

Weights are rounded to int8 once, with one scale per output channel; activations are rounded to int8
on every call, with one scale per token (row), so a token with large activations does not cost the
others their precision. The matmul runs in integers (int32 accumulation, exact) and the two scales are
applied to its result: `torch._int_mm` is the reference kernel; on a CPU where oneDNN runs,
`OneDNNInt8Linear` does the same integer products through oneDNN's int8 linear with the weight
prepacked once, which measured faster (docs/benchmarks.md, "oneDNN prepacked linear layers"). It is faster than fp32 on a CPU with AVX-512 VNNI
(docs/benchmarks.md), at the price of a small drift from the fp32 logits (measured against transformers
in docs/configuration.md). Embedding lookups, norms and attention stay in the model dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from conveyor.config import QUANTIZATION_METHODS
from conveyor.model.layers import swap_linears

# oneDNN's int8 linear takes unsigned activations: int8 values shifted by this, undone by its zero point.
_UINT8_SHIFT = 128


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row: (int8 values, fp32 scales [rows, 1])."""
    scale = t.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    return torch.round(t / scale).to(torch.int8), scale


class Int8Linear(nn.Module):
    """`y = x @ W.T + b` with W stored as int8 [in, out] (transposed for `_int_mm`) and per-row scales.

    `smooth` (one factor per input channel, SmoothQuant): the weight's columns are multiplied by it before
    rounding and the activations divided by it before theirs, so a channel with outsized activations no
    longer sets every token's int8 step; the product is unchanged in exact arithmetic.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 smooth: torch.Tensor | None = None) -> None:
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

    def _store_weight(self, quantized: torch.Tensor) -> None:
        self.register_buffer("weight_t", quantized.t().contiguous())  # [in_features, out_features]

    def _scaled_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        """fp32 rows [S, in] -> fp32 x @ W.T through int8, both scales applied."""
        quantized, row_scale = quantize_rows(rows)
        # Weight scale first, as oneDNN applies it: the two kernels then agree to the bit.
        return torch._int_mm(quantized, self.weight_t).float().mul_(self.weight_scale).mul_(row_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
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

    def _scaled_matmul(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.shape[0] == 0:  # oneDNN refuses an empty input
            return rows.new_empty(0, self.out_features)
        quantized, row_scale = quantize_rows(rows)
        # v + 128 as a byte is v's two's-complement byte with its top bit flipped.
        shifted = quantized.view(torch.uint8).bitwise_xor_(_UINT8_SHIFT)
        out = torch.ops.onednn.qlinear_pointwise(
            shifted, 1.0, _UINT8_SHIFT, self.packed_weight, self.weight_scale, self.weight_zero_point, None,
            1.0, 0, torch.float32, "none", [], "")
        return out.mul_(row_scale)


def quantize_linears(model: nn.Module, method: str, kernel: str = "torch") -> int:
    """Swap every nn.Linear in `model` for its quantized form, in place; returns how many were swapped.

    `kernel` "onednn" takes oneDNN's int8 linear, "torch" `torch._int_mm`. A model whose lm_head is tied
    to the embedding gets its own quantized lm_head (the embedding keeps its full-precision table for
    lookups).
    """
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"unsupported quantization {method!r}; choose from {', '.join(QUANTIZATION_METHODS)}")
    return swap_linears(model, OneDNNInt8Linear if kernel == "onednn" else Int8Linear)
