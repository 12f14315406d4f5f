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
from pathlib import Path

import torch

from conveyor.model.attention import PrefillKernel
from conveyor.model.paged_decode import build_cpp_extension

_SOURCE = Path(__file__).parent / "csrc" / "paged_prefill_attention.cpp"
DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def load_prefill_kernel() -> tuple[PrefillKernel | None, str]:
    """The compiled kernel (built once per machine and source), or None and why it cannot be built."""
    module, why = build_cpp_extension("conveyor_paged_prefill", _SOURCE, ("-fno-trapping-math",))
    return (None if module is None else module.paged_prefill_attention), why
