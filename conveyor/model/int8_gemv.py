"""Decode-sized steps (1-4 rows) in C++: the lm_head, the int8 mode's int8 layers, and bf16 linears.

One stream's decode step multiplies one row by every weight, so it costs what reading the weights costs.
At one row oneDNN's linears pay a fixed cost per call and the int8 mode's rounding of the activations a
chain of small torch ops; csrc/int8_gemv.cpp reads each weight once, packed at load into the layout it
streams (docs/benchmarks.md, "One stream: int8 weights read by a small C++ kernel"). Three uses:

- The int8 mode's int8 layers (`Int8Linear`): the same product (activations rounded per row, integer
  sums, the two scales), equal to the torch reference to the bit, for steps of up to 4 rows.
- The lm_head (the 262k x 640 tied embedding of the default model: 671 MB in fp32, 335 MB in bf16): kept
  as int8 with one scale per 32 inputs *only when that is lossless*, i.e. when every block of 32 weights
  is an int8 multiple of its scale, as a GGUF Q8_0 table dequantized to fp32 is. The table is then read
  as 168 MB of int8 plus 21 MB of scales and multiplied in fp32: in fp32 the same products as the fp32
  lm_head (only the summation order differs); in bf16 the weights are the exact ones rather than their
  bf16 roundings. Steps of more rows keep the usual lm_head (compute, not bytes, bounds them).
- bf16 linears (`Bf16Rows`): the bf16 mode's layers and the int8 mode's bf16 down_proj, as oneDNN's bf16
  linear computes them (input rounded to bf16, fp32 sums, output rounded to bf16; only the summation
  order differs), without oneDNN's fixed cost per call (docs/benchmarks.md, "A few-row bf16 kernel").

Like the other C++ kernels it is compiled once per machine (`build_cpp_extension`, -march=native: AVX-512
loops with VNNI and AVX512-BF16 where the CPU has them, plain vectorized loops otherwise). It runs with the oneDNN linear
kernel (`--linear-kernel auto` on a CPU); with `--linear-kernel torch`, or when it cannot be built, the
torch/oneDNN paths run at every row count, with a log line saying why.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from conveyor.model.paged_decode import build_cpp_extension

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "int8_gemv.cpp"
MAX_ROWS = 4  # the kernel's row limit (its MAX_ROWS)
LM_HEAD_GROUP = 32  # inputs per lm_head scale: a GGUF Q8_0 block
_BLOCK = 4  # output channels per packed block (the kernel's kBlock)
_CHECK_ROWS = 8192  # lm_head rows quantized and checked at a time (bounds the temporary memory)


@functools.cache
def load_int8_gemv() -> tuple[Any, str]:
    """The compiled module (weight_only, w8a8, isa), or None and why it cannot be built."""
    # -ffp-contract=off: w8a8 rounds its two scale products one at a time, as the torch reference does.
    return build_cpp_extension("conveyor_int8_gemv", _SOURCE, ("-ffp-contract=off",))


def pack(weight: torch.Tensor, step: int) -> torch.Tensor:
    """[N, K] (int8 or bf16) in the kernel's layout: blocks of 4 outputs (N padded with zero rows), each
    stored `step` inputs at a time for all 4: [ceil(N / 4), K / step, 4, step], flat."""
    n, k = weight.shape
    padded = torch.zeros(-(-n // _BLOCK) * _BLOCK, k, dtype=weight.dtype)
    padded[:n] = weight
    return padded.reshape(-1, _BLOCK, k // step, step).transpose(1, 2).contiguous().reshape(-1)


def lossless_groups(table: torch.Tensor, group: int = LM_HEAD_GROUP) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`table` (fp32 [N, K]) as int8 [N, K] and fp32 scales [N, K / group] (symmetric, max / 127 per group,
    as GGUF's Q8_0 rounds), or None unless int8 * scale gives back every weight exactly."""
    if table.dtype != torch.float32 or table.dim() != 2 or table.shape[1] % group:
        return None
    n, k = table.shape
    values = torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n, k // group)
    for start in range(0, n, _CHECK_ROWS):
        blocks = table[start:start + _CHECK_ROWS].reshape(-1, k // group, group)
        scale = blocks.abs().amax(dim=2).clamp_min(1e-12) / 127.0
        rounded = torch.round(blocks / scale[..., None])
        if not torch.equal(rounded * scale[..., None], blocks):
            return None
        values[start:start + _CHECK_ROWS] = rounded.reshape(-1, k).to(torch.int8)
        scales[start:start + _CHECK_ROWS] = scale
    return values, scales


class SmallRowLmHead:
    """The lm_head for steps of 1-4 rows: the lossless int8 table, fp32 logits [rows, vocab]. A plain
    object, not a module: it holds a second copy of the table, and `Module.to` must not cast it."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor, gemv: Any) -> None:
        self.out_features, self.in_features = values.shape
        self.packed = pack(values, gemv.WEIGHT_ONLY_STEP)
        self.scales = scales.contiguous()
        self.gemv = gemv

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.gemv.weight_only(hidden, self.packed, self.scales, self.out_features, LM_HEAD_GROUP)


class Bf16Rows:
    """A bf16 linear layer's weight in the kernel's layout, for steps of 1-4 rows: `self(rows)` is what
    oneDNN's bf16 linear gives for rows cast to bf16, in the rows' dtype (fp32 or bf16)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, gemv: Any) -> None:
        self.out_features = weight.shape[0]
        self.packed = pack(weight.detach().to(torch.bfloat16), gemv.BF16_STEP)
        self.bias = torch.empty(0) if bias is None else bias.detach().float().contiguous()
        self.gemv = gemv

    @staticmethod
    def fits(weight: torch.Tensor, gemv: Any) -> bool:
        """Whether the kernel takes this weight: a CPU bf16 weight whose inputs come 32 at a time."""
        return (gemv is not None and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
                and weight.dim() == 2 and weight.shape[1] % gemv.BF16_STEP == 0)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return self.gemv.bf16(rows, self.packed, self.bias, self.out_features)


def lm_head_table(model: nn.Module) -> torch.Tensor | None:
    """The model's lm_head weights (its own, or the tied embedding's) as they are now: call it before the
    model is cast, to keep the fp32 values."""
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None) if head is not None else model.embed_tokens.weight
    return weight.detach() if isinstance(weight, torch.Tensor) else None


def small_row_kernel(linear_kernel: str) -> tuple[Any, str]:
    """The compiled kernel for this linear kernel, or None; and why (for the log line)."""
    if linear_kernel != "onednn":
        return None, f"the linear kernel is {linear_kernel}"
    gemv, why = load_int8_gemv()
    return gemv, why if gemv is None else f"{gemv.isa()}, {why}"


def apply_small_row_lm_head(model: nn.Module, gemv: Any, head_table: torch.Tensor | None) -> str:
    """Give the model its few-row lm_head when `head_table` (`lm_head_table` before the cast) is lossless
    as int8 per 32 inputs; returns what was done, for the log line."""
    if gemv is None:
        return "lm_head kept"
    if head_table is None or head_table.shape[1] % gemv.WEIGHT_ONLY_STEP:
        return "lm_head kept (no fp32 table of a supported shape)"
    groups = lossless_groups(head_table)
    if groups is None:
        return f"lm_head kept (its weights are not int8 per {LM_HEAD_GROUP} inputs)"
    model.small_row_head = SmallRowLmHead(*groups, gemv)  # type: ignore[assignment]
    return f"lm_head int8 per {LM_HEAD_GROUP} inputs (lossless) at 1-{MAX_ROWS} rows"
