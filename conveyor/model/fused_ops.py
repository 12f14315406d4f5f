"""Which path runs a decoder layer's small elementwise ops: fused C++ kernels, or torch one op at a time.

Between its matmuls a layer runs many small ops (Gemma 3: four RMS norms and two residual adds, the
q/k norms, rotary, GELU-tanh times up), each its own dispatch and pass over memory, with casts to fp32
and back in bf16. csrc/fused_layer_ops.cpp does each group in one pass per row, rounding where the torch
path (the reference, `--elementwise-kernel torch`) rounds, so the two agree up to the summation order
inside a norm (docs/benchmarks.md, "Fused elementwise ops"). It is compiled like the decode attention
kernel (`conveyor.model.paged_decode.build_cpp_extension`), once per machine, then loaded from the cache.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conveyor.config import ELEMENTWISE_KERNELS
from conveyor.model.layers import RMSNorm
from conveyor.model.paged_decode import build_cpp_extension

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "fused_layer_ops.cpp"
_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def load_fused_ops() -> tuple[Any, str]:
    """The compiled module (rms_norm, add_rms_norm, qk_norm_rope, act_mul), or None and why it cannot be built."""
    # -ffp-contract=off: no fused multiply-adds where the torch reference rounds a product before a sum;
    # -fno-trapping-math (no FP exception traps; values unchanged) lets g++ vectorize exp's float-int steps.
    return build_cpp_extension("conveyor_fused_layer_ops", _SOURCE, ("-ffp-contract=off", "-fno-trapping-math"))


def choose_elementwise_kernel(requested: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """The elementwise path ("cpp" or "torch") and why, for a request of "auto", "cpp" or "torch".

    "auto" takes the C++ kernels wherever they run; "cpp" where they cannot is an error, not a silent fallback.
    """
    if requested not in ELEMENTWISE_KERNELS:
        raise ValueError(f"unknown elementwise kernel {requested!r}; choose from {', '.join(ELEMENTWISE_KERNELS)}")
    if requested == "torch":
        return "torch", "requested"
    if device.type != "cpu":
        reason = f"device {device.type} is not a CPU"
    elif dtype not in _DTYPES:
        reason = f"{dtype} is not covered"
    else:
        module, reason = load_fused_ops()
        if module is not None:
            return "cpp", reason
    if requested == "cpp":
        raise ValueError(f"elementwise kernel cpp cannot run: {reason}")
    return "torch", reason


def apply_elementwise_kernel(model: nn.Module, requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Choose the elementwise path and give it to every module that has one (norms, attention's q/k norm and
    rotary, the MLP's activation, decoder layers' residual adds); log the choice. Call it once the model's
    weights are final (it computes each norm's fp32 scale)."""
    kernel, reason = choose_elementwise_kernel(requested, device, dtype)
    ops = load_fused_ops()[0] if kernel == "cpp" else None
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.set_fused_ops(ops)
        elif hasattr(module, "fused_ops"):  # SelfAttention, GatedMLP, decoder layers that fuse their adds
            module.fused_ops = ops
    logger.info("elementwise ops: %s (%s)", kernel, reason)
    return kernel
