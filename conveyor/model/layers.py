"""Building blocks shared by the architectures: norms, rotary embeddings, linear layers, attention, MLP.

Everything here works on the flat token batch ([T, ...], no batch axis). Attention is the one place
tokens of different requests would mix; `conveyor.model.attention` keeps each request to its own keys
and values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from conveyor.model.attention import AttentionMetadata, PagedAttention


class RMSNorm(nn.Module):
    """RMS norm computed in fp32. Gemma scales by (1 + w); Llama-family models by w."""

    def __init__(self, dim: int, eps: float, gemma_style: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.gemma_style = gemma_style
        self.weight = nn.Parameter(torch.zeros(dim) if gemma_style else torch.ones(dim), requires_grad=False)
        # The fused C++ ops (conveyor.model.fused_ops) and this norm's fp32 scale for them, or None.
        self.fused_ops: Any = None
        self.fused_scale: torch.Tensor | None = None

    def set_fused_ops(self, ops: Any) -> None:
        """Run through the fused ops (None: the torch path); the weight must be final."""
        self.fused_ops = ops
        self.fused_scale = None if ops is None else self.scale().contiguous()

    def scale(self) -> torch.Tensor:
        """What the normalized rows are multiplied by, in fp32."""
        return (1.0 + self.weight.float()) if self.gemma_style else self.weight.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_ops is not None and x.dim() == 2 and x.is_contiguous():
            return self.fused_ops.rms_norm(x, self.fused_scale, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.scale()).to(dtype)


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.x frequency scaling: long wavelengths are stretched, short ones kept, a smooth blend between."""
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    original_len = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = original_len / low_freq_factor
    high_freq_wavelen = original_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


# Up to this many rows (decode-sized steps), a linear layer runs as weight @ x.T (docs/benchmarks.md).
FEW_ROWS = 32


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x [S, in], with a faster path for decode-sized steps (<= 32 rows).

    NOTE: with few rows, MKL's fp32 `x @ weight.T` (and the matrix-vector path torch takes for one row)
    streams the weight well below the memory bandwidth that `weight @ x.T` reaches; with many rows the
    usual way is faster (measured in docs/benchmarks.md, "Small decode steps"). One row is doubled,
    because two columns take the faster matrix-matrix path.
    """
    num_rows = x.shape[0]
    if x.dim() != 2 or not 1 <= num_rows <= FEW_ROWS or weight.device.type != "cpu":
        return F.linear(x, weight, bias)
    # NOTE: a real copy (torch.cat), not expand(): a zero-stride operand sends MKL back to the slow path.
    columns = x if num_rows > 1 else torch.cat([x, x])
    out = torch.mm(weight, columns.t())[:, :num_rows].t().contiguous()
    return out if bias is None else out.add_(bias)


class Linear(nn.Linear):
    """nn.Linear whose forward takes the few-rows path of `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def swap_linears(model: nn.Module, make: Callable[[torch.Tensor, torch.Tensor | None], nn.Module]) -> int:
    """Replace every nn.Linear in `model` by `make(weight, bias)`, in place; returns how many were replaced.

    A model whose lm_head is tied to the embedding gets its own lm_head made from the embedding's table:
    the embedding keeps its plain table for lookups.
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make(child.weight, child.bias))
                swapped += 1
    embed = getattr(model, "embed_tokens", None)
    if getattr(model, "lm_head", "absent") is None and isinstance(embed, nn.Embedding):
        model.lm_head = make(embed.weight, None)  # type: ignore[assignment]
        swapped += 1
    return swapped


class RotaryEmbedding(nn.Module):
    """Rotary position embedding in the rotate-half layout, with a precomputed cos/sin table."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None = None) -> None:
        super().__init__()
        # Explicit CPU tensors: the model may be built on the meta device (weights arrive later).
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "llama3":
                inv_freq = _llama3_inv_freq(inv_freq, scaling)
            elif kind == "linear":
                inv_freq = inv_freq / scaling["factor"]
            elif kind not in (None, "default"):
                raise ValueError(f"unsupported rope scaling {kind!r}")
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float64, device="cpu"), inv_freq)
        table = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", table.cos().float(), persistent=False)
        self.register_buffer("sin", table.sin().float(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hk, D]; returns both rotated."""
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class SelfAttention(nn.Module):
    """Fused QKV projection, optional per-head q/k norm, rotary, paged attention, output projection."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 rotary: RotaryEmbedding, bias: bool = False, qk_norm_eps: float | None = None,
                 gemma_norms: bool = False, sliding_window: int | None = None) -> None:
        super().__init__()
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.qkv_proj = Linear(hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = Linear(self.q_size, hidden_size, bias=False)
        self.q_norm = self.k_norm = None
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps, gemma_norms)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps, gemma_norms)
        self.rotary = rotary
        self.attn = PagedAttention(num_heads, num_kv_heads, head_dim, scale, sliding_window)
        self.fused_ops: Any = None  # the fused C++ ops (conveyor.model.fused_ops), or None for torch's

    def forward(self, x: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        if self.fused_ops is not None and qkv.dim() == 2 and qkv.stride(1) == 1:
            # q/k norm and rotary in one pass, reading q and k straight out of the fused projection.
            q_scale = k_scale = None
            eps = 0.0
            if self.q_norm is not None and self.k_norm is not None:
                q_scale, k_scale, eps = self.q_norm.fused_scale, self.k_norm.fused_scale, self.q_norm.eps
            q, k = self.fused_ops.qk_norm_rope(qkv, positions, self.rotary.cos, self.rotary.sin, q_scale, k_scale, eps,
                                               self.num_heads, self.num_kv_heads, self.head_dim)
            v = qkv[:, self.q_size + self.kv_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
            return self.o_proj(self.attn(q, k, v, k_cache, v_cache, meta))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, k_cache, v_cache, meta))


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        self.fused_ops: Any = None  # the fused C++ ops (conveyor.model.fused_ops), or None for torch's
        # The activations the fused ops cover, by the name they take.
        self.fused_activation = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}.get(activation)
        if activation == "silu":
            self.act = F.silu
        elif activation in ("gelu_pytorch_tanh", "gelu_tanh"):
            self.act = lambda t: F.gelu(t, approximate="tanh")
        elif activation == "gelu":
            self.act = F.gelu
        else:
            raise ValueError(f"unsupported activation {activation!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.fused_ops is not None and self.fused_activation is not None and gate_up.dim() == 2:
            return self.down_proj(self.fused_ops.act_mul(gate_up.contiguous(), self.fused_activation))
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(self.act(gate) * up)


# Hugging Face keeps q/k/v and gate/up as separate matrices; conveyor fuses them: (fused name, shard index).
_FUSED_SHARDS = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0), "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2), "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def load_hf_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put Hugging Face-named tensors into conveyor's modules, fusing q/k/v and gate/up as it goes.

    Parameters are replaced, not copied into, so a model built on the meta device costs no
    initialisation and unfused weights are used in place.
    """
    params = dict(model.named_parameters())
    fused: dict[str, list[tuple[int, torch.Tensor]]] = {}
    direct: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        for hf_part, (ours, shard) in _FUSED_SHARDS.items():
            if f".{hf_part}." in name:
                fused.setdefault(name.replace(hf_part, ours), []).append((shard, tensor))
                break
        else:
            direct[name] = tensor
    for target, shards in fused.items():
        direct[target] = torch.cat([t for _, t in sorted(shards, key=lambda s: s[0])], dim=0)
    for name, tensor in direct.items():
        if name not in params:
            raise KeyError(f"unexpected weight {name!r} for {type(model).__name__}")
        if params[name].shape != tensor.shape:
            raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)}, "
                             f"model {tuple(params[name].shape)}")
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))
    missing = sorted(set(params) - set(direct))
    if missing:
        raise KeyError(f"weights missing from the checkpoint: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
