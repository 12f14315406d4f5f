"""Prefill attention read from the paged KV cache in place by a small C++ kernel, or by torch's SDPA.

The torch path (`PagedAttention._prefill`, the reference) gathers a chunk's keys and values out of the
pool with `index_select` and runs SDPA with an explicit causal (windowed) mask: the masked scores are
computed too, and each query head runs against its KV head separately. The C++ kernel
(csrc/paged_prefill_attention.cpp) reads the chunk's blocks once, folds the query heads that share a KV
head into one set of rows, visits only the keys a block of queries can see, and runs an exact online
softmax in fp32 (docs/benchmarks.md, "Prefill attention read in place"). It covers fp32 and bf16 on a CPU,
head dims a multiple of 16; it is built and cached like the decode kernel (`paged_decode.build_cpp_extension`).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch
from torch import nn

from conveyor.model.attention import PagedAttention, PrefillKernel
from conveyor.model.paged_decode import build_cpp_extension

_SOURCE = Path(__file__).parent / "csrc" / "paged_prefill_attention.cpp"
DTYPES = (torch.float32, torch.bfloat16)
logger = logging.getLogger(__name__)


@functools.cache
def load_prefill_kernel() -> tuple[PrefillKernel | None, str]:
    """The compiled kernel (built once per machine and source), or None and why it cannot be built."""
    module, why = build_cpp_extension("conveyor_paged_prefill", _SOURCE, ("-fno-trapping-math",))
    return (None if module is None else module.paged_prefill_attention), why


def prefill_unavailable_reason(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the prefill kernel cannot run for a layer here, or None when it can."""
    if device.type != "cpu":
        return f"device {device.type} is not a CPU"
    if dtype not in DTYPES:
        return f"{dtype} is not covered (float32 and bfloat16 are)"
    if head_dim % 16:
        return f"head_dim {head_dim} is not a multiple of 16"
    return load_prefill_kernel()[1] if load_prefill_kernel()[0] is None else None


def apply_prefill_kernel(model: nn.Module, use_kernel: bool, device: torch.device, dtype: torch.dtype) -> str:
    """Give every `PagedAttention` of the model the prefill kernel where it can run (`use_kernel`: the
    attention path chosen is the C++ one) or torch's path; log the choice and return it."""
    kernel, reason = "torch", "the attention path chosen is torch's"
    for module in model.modules():
        if isinstance(module, PagedAttention):
            why = prefill_unavailable_reason(device, dtype, module.head_dim) if use_kernel else reason
            module.prefill_kernel = load_prefill_kernel()[0] if why is None else None
            kernel, reason = ("cpp", load_prefill_kernel()[1]) if why is None else ("torch", why)
    logger.info("prefill attention: %s (%s)", kernel, reason)
    return kernel
