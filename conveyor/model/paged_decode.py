"""Which path runs decode attention: a small C++ kernel reading the paged KV cache in place, or torch.

The torch path (`PagedAttention._decode`, the reference) copies each decode row's blocks out of the pool
with `index_select` and then runs SDPA on the copy. The C++ kernel (csrc/paged_decode_attention.cpp)
reads every row's keys and values once, where they lie, with an exact two-pass softmax in fp32
(docs/benchmarks.md, "Decode attention read in place"). Torch has no paged attention on a CPU, so the
kernel is compiled with torch's own extension builder the first time it is needed (g++ and OpenMP,
about a minute) and cached in torch's extensions directory (`TORCH_EXTENSIONS_DIR`) after that.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conveyor.config import ATTENTION_KERNELS
from conveyor.model.attention import DecodeKernel, PagedAttention

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "paged_decode_attention.cpp"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def build_cpp_extension(stem: str, source: Path, extra_cflags: tuple[str, ...] = ()) -> tuple[Any, str]:
    """Compile (or load from torch's extensions cache) one C++ source of csrc/: (the module, how long it took),
    or (None, why it cannot be built)."""
    try:
        from torch.utils import cpp_extension

        started = time.perf_counter()
        # The build targets this CPU (-march=native), so the cache is keyed by the CPU's vector level too.
        name = f"{stem}_{torch.backends.cpu.get_cpu_capability().lower()}"
        module = cpp_extension.load(name=name, sources=[str(source)],
                                    extra_cflags=["-O3", "-march=native", "-fopenmp", *extra_cflags],
                                    extra_ldflags=["-fopenmp"])
        return module, f"compiled or loaded in {time.perf_counter() - started:.1f} s"
    except Exception as error:  # no compiler, no headers, a build error: the torch path still works
        return None, f"the C++ kernel could not be built ({type(error).__name__}: {str(error)[:200]})"


@functools.cache
def load_decode_kernel() -> tuple[DecodeKernel | None, str]:
    """The compiled kernel (built once per machine and source), or None and why it cannot be built."""
    module, why = build_cpp_extension("conveyor_paged_decode", _SOURCE)
    return (None if module is None else module.paged_decode_attention), why


def choose_attention_kernel(requested: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """The decode attention path ("cpp" or "torch") and why, for a request of "auto", "cpp" or "torch".

    "auto" takes the C++ kernel wherever it runs; "cpp" where it cannot is an error, not a silent fallback.
    """
    if requested not in ATTENTION_KERNELS:
        raise ValueError(f"unknown attention kernel {requested!r}; choose from {', '.join(ATTENTION_KERNELS)}")
    if requested == "torch":
        return "torch", "requested"
    reason = None
    if device.type != "cpu":
        reason = f"device {device.type} is not a CPU"
    elif dtype not in _DTYPES:
        reason = f"{dtype} is not covered"
    else:
        kernel, why = load_decode_kernel()
        if kernel is not None:
            return "cpp", why
        reason = why
    if requested == "cpp":
        raise ValueError(f"attention kernel cpp cannot run: {reason}")
    return "torch", reason


def apply_attention_kernel(model: nn.Module, requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Choose the decode attention path, give it to every `PagedAttention` of the model, log the choice;
    with the C++ path, prefill chunks take the C++ prefill kernel too where it runs (conveyor.model.paged_prefill)."""
    # Imported here: paged_prefill builds its kernel with this module's `build_cpp_extension`.
    from conveyor.model.paged_prefill import apply_prefill_kernel

    kernel, reason = choose_attention_kernel(requested, device, dtype)
    decode = load_decode_kernel()[0] if kernel == "cpp" else None
    for module in model.modules():
        if isinstance(module, PagedAttention):
            module.decode_kernel = decode
    logger.info("decode attention: %s (%s)", kernel, reason)
    apply_prefill_kernel(model, kernel == "cpp", device, dtype)
    return kernel
