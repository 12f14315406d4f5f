"""Greedy sampling's argmax over the logits rows: a small C++ kernel on a CPU, torch's argmax elsewhere.

torch's `argmax(dim=-1)` is not vectorized on a CPU: 0.2 ms for one 262k-vocabulary row in fp32, 0.9 ms in
bf16, ~4 ms for 32 rows, where a plain max over the same values takes a twentieth of that.
csrc/argmax_rows.cpp returns the same indices (the first maximum; the first NaN in a row that has one) at
the speed of the max (docs/benchmarks.md, "The engine's own work"). It is built like the other kernels
(`build_cpp_extension`), once per machine, and torch's argmax runs wherever it cannot be.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch

from conveyor.model.paged_decode import build_cpp_extension

_SOURCE = Path(__file__).parent / "csrc" / "argmax_rows.cpp"
_DTYPES = (torch.float32, torch.bfloat16)

ArgmaxRows = Callable[[torch.Tensor], torch.Tensor]


@functools.cache
def load_argmax_kernel() -> tuple[ArgmaxRows | None, str]:
    """The compiled `argmax_rows` (built once per machine and source), or None and why it cannot be built."""
    module, why = build_cpp_extension("conveyor_argmax_rows", _SOURCE)
    return (None if module is None else module.argmax_rows), why


def torch_argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def argmax_for(device: torch.device, use_kernel: bool = True) -> ArgmaxRows:
    """The row argmax a sampler on `device` uses: the kernel on a CPU where it builds (any dtype it does not
    cover goes to torch), else torch's."""
    kernel = load_argmax_kernel()[0] if use_kernel and device.type == "cpu" else None
    if kernel is None:
        return torch_argmax

    def argmax(logits: torch.Tensor) -> torch.Tensor:
        if logits.device.type == "cpu" and logits.dtype in _DTYPES and logits.dim() == 2 and logits.shape[1] > 0:
            return kernel(logits if logits.stride(1) == 1 else logits.contiguous())
        return torch_argmax(logits)

    return argmax
