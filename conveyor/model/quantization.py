"""Opt-in int8 compute for the linear layers (`EngineConfig.quantization = "int8"`).

Weights are rounded to int8 once, with one scale per output channel; activations are rounded to int8
on every call, with one scale per token (row), so a token with large activations does not cost the
others their precision. The matmul runs in integers (`torch._int_mm`, int32 accumulation, exact) and
the two scales are applied to its result. It is faster than fp32 on a CPU with AVX-512 VNNI
(docs/benchmarks.md), at the price of a small drift from the fp32 logits (measured against transformers
in docs/configuration.md). Embedding lookups, norms and attention stay in the model dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from conveyor.config import QUANTIZATION_METHODS
from conveyor.model.kernels import swap_linears


class Int8Linear(nn.Module):
    """`y = x @ W.T + b` with W stored as int8 [in, out] (transposed for `_int_mm`) and per-row scales."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        quantized = torch.round(weight / scale[:, None]).to(torch.int8)
        self.register_buffer("weight_t", quantized.t().contiguous())  # [in_features, out_features]
        self.register_buffer("weight_scale", scale)  # [out_features], fp32
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        row_scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
        quantized = torch.round(rows / row_scale).to(torch.int8)
        out = torch._int_mm(quantized, self.weight_t).float()
        out.mul_(row_scale).mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias.float())
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linears(model: nn.Module, method: str) -> int:
    """Swap every nn.Linear in `model` for its quantized form, in place; returns how many were swapped.

    A model whose lm_head is tied to the embedding gets its own quantized lm_head (the embedding keeps
    its full-precision table for lookups).
    """
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"unsupported quantization {method!r}; choose from {', '.join(QUANTIZATION_METHODS)}")
    return swap_linears(model, Int8Linear)
