"""Which kernel runs the linear layers, chosen once per machine when the model is loaded.

On a CPU, oneDNN's linear with its weight reordered once into the blocked layout it prefers
(`torch.ops.mkldnn._reorder_linear_weight`, then `_linear_pointwise` on every call) multiplies several
times faster than MKL's `F.linear` at decode-sized steps, and faster at prefill sizes too
(docs/benchmarks.md, "oneDNN prepacked linear layers"). It computes the same fp32 products; only the
summation order differs. bf16 takes the same path; the int8 mode takes oneDNN's int8 linear
(`conveyor.model.quantization.OneDNNInt8Linear`). The plain torch path (`conveyor.model.layers.Linear`,
`Int8Linear`) stays the reference, and runs wherever oneDNN cannot: another device, a torch built
without it, a dtype it does not cover.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from conveyor.config import LINEAR_KERNELS
from conveyor.model.int8_gemv import MAX_ROWS, Bf16Rows, apply_small_row_lm_head, small_row_kernel
from conveyor.model.layers import swap_linears
from conveyor.model.quantization import quantize_linears

logger = logging.getLogger(__name__)

_ONEDNN_DTYPES = (torch.float32, torch.bfloat16, torch.int8)  # int8: the int8 mode's compute


class OneDNNLinear(nn.Module):
    """`y = x @ W.T + b` through oneDNN, with W reordered once into oneDNN's blocked layout.

    The reordered weight is an opaque oneDNN tensor: it is held as a plain attribute, not a parameter,
    because `Module.to` and state dicts cannot handle it. Build this after the model has its final dtype.
    With `gemv` (`conveyor.model.int8_gemv`'s compiled kernel) a bf16 layer runs steps of 1-4 rows
    through its bf16 product instead (`Bf16Rows`: the same arithmetic, the weight packed once more).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, gemv: Any = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.small_rows = Bf16Rows(weight, bias, gemv) if Bf16Rows.fits(weight, gemv) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 0:  # oneDNN refuses an empty input
            return x.new_empty(*x.shape[:-1], self.out_features)
        if self.small_rows is not None and rows.shape[0] <= MAX_ROWS:
            out = self.small_rows(rows)
        else:
            out = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), self.packed_weight, self.bias, "none", [], "")
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def onednn_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why oneDNN's prepacked linear cannot run here, or None when it can."""
    if device.type != "cpu":
        return f"device {device.type} is not a CPU"
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN"
    if dtype not in _ONEDNN_DTYPES:
        return f"{dtype} is not covered (float32, bfloat16 and int8 are)"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no bfloat16 support in oneDNN"
    return None


def choose_linear_kernel(requested: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """The kernel to run ("onednn" or "torch") and why, for a request of "auto", "onednn" or "torch".

    "auto" takes oneDNN wherever it can run; "onednn" where it cannot is an error, not a silent fallback.
    """
    if requested not in LINEAR_KERNELS:
        raise ValueError(f"unknown linear kernel {requested!r}; choose from {', '.join(LINEAR_KERNELS)}")
    if requested == "torch":
        return "torch", "requested"
    reason = onednn_unavailable_reason(device, dtype)
    if reason is None:
        return "onednn", f"oneDNN available for {dtype} on {device.type}"
    if requested == "onednn":
        raise ValueError(f"linear kernel onednn cannot run: {reason}")
    return "torch", reason


def apply_linear_kernel(model: nn.Module, requested: str, quantization: str | None, device: torch.device,
                        dtype: torch.dtype, maxima: dict[str, torch.Tensor] | None = None,
                        head_table: torch.Tensor | None = None, int8_head: bool = False) -> str:
    """Choose the linear kernel for this machine (and precision), swap the model's linear layers to it
    (quantizing them first in a quantized mode; `maxima` as `quantize_linears` takes them), log the
    choice; returns the kernel's name.

    With oneDNN, steps of 1-4 rows also get the C++ few-row kernel (`conveyor.model.int8_gemv`) where it
    builds: in the int8 layers, in the bf16 layers of the decoder stack (the bf16 mode's, the int8 mode's
    down_proj), and in the lm_head when `head_table` (its fp32 weights, taken before the model's cast:
    `lm_head_table`) is lossless as int8. `int8_head`: the int8 method's lm_head in int8 as well
    (`quantize_linears`); it then needs no few-row head of its own."""
    kernel, reason = choose_linear_kernel(requested, device, torch.int8 if quantization else dtype)
    gemv, gemv_reason = small_row_kernel(kernel)
    if quantization is not None:
        swapped = quantize_linears(model, quantization, kernel, maxima, gemv, int8_head)
    elif kernel == "onednn":
        # The decoder stack's layers first, with the few-row bf16 product; then the rest (the lm_head: the
        # few-row head above takes its small steps, and a second copy of its table would cost 335 MB).
        layers = getattr(model, "layers", None)
        swapped = swap_linears(layers, functools.partial(OneDNNLinear, gemv=gemv)) if layers is not None else 0
        swapped += swap_linears(model, OneDNNLinear)
    else:
        swapped = 0
    precision = quantization or str(dtype).removeprefix("torch.")
    logger.info("linear kernel for %s: %s (%s; %d layers swapped)", precision, kernel, reason, swapped)
    # An int8 lm_head (int8-fast's, int8's with int8_head) is an int8 layer of its own, with the kernel's
    # w8a8 product at 1-4 rows: it stays as it is.
    if quantization == "int8-fast" or (quantization == "int8" and int8_head):
        head = f"lm_head int8 ({quantization})"
    else:
        head = apply_small_row_lm_head(model, gemv, head_table)
    logger.info("small-row int8 kernel: %s (%s; %s)", "torch" if gemv is None else "cpp", gemv_reason, head)
    return kernel
