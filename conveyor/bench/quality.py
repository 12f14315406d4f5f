"""`conveyor bench quality`: what each precision mode costs in accuracy, against the exact fp32 model.

Teacher-forced on a real English text: the text is cut into windows that start with BOS, each window is
one prefill, and every position's next-token distribution of a mode is compared with the reference's
(fp32 on the torch linear path, the exact model): perplexity of the text, KL(reference || mode) per
position (mean and p99), and how often both put the same token on top.

The default text is the GNU GPL version 3 as the OS ships it (/usr/share/common-licenses/GPL-3 on
Debian and Ubuntu): plain English prose, the same bytes on every machine of a distribution.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from conveyor.config import EngineConfig, ModelConfig
from conveyor.engine.runner import ModelRunner
from conveyor.model.attention import SequenceSpan, build_attention_metadata
from conveyor.model.loader import load_model_weights, resolve_model_path
from conveyor.tokenizer import Tokenizer, load_tokenizer

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"
REFERENCE_MODE = "fp32-exact"
# Each mode as the engine knobs that make it; the reference is the exact model every mode is compared to.
MODES: dict[str, dict[str, str | bool]] = {
    REFERENCE_MODE: {"dtype": "float32", "linear_kernel": "torch"},
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "int8": {"dtype": "float32", "quantization": "int8"},
    "int8-torch": {"dtype": "float32", "quantization": "int8", "linear_kernel": "torch"},
    "int8-bf16": {"dtype": "bfloat16", "quantization": "int8"},
    "int8-bf16-head8": {"dtype": "bfloat16", "quantization": "int8", "int8_lm_head": True},  # lm_head int8 too
    "int8-fast": {"dtype": "float32", "quantization": "int8-fast"},
}


@dataclass
class ModeQuality:
    mode: str
    num_tokens: int  # predicted positions scored
    perplexity: float
    mean_kl: float  # KL(reference || mode), nats per position
    p99_kl: float
    top1_agreement: float  # fraction of positions where both argmaxes agree


def text_windows(token_ids: list[int], bos_id: int | None, window: int, max_tokens: int) -> Iterator[list[int]]:
    """Consecutive windows of the text's tokens, each led by BOS, at most `max_tokens` tokens in all."""
    body = [t for t in token_ids if t != bos_id]
    lead = [] if bos_id is None else [bos_id]
    step = window - len(lead)
    for start in range(0, min(len(body), max_tokens), step):
        chunk = body[start:min(start + step, max_tokens)]
        if len(lead) + len(chunk) >= 2:  # at least one prediction to score
            yield lead + chunk


@dataclass
class Windows:
    """Teacher-forced windows, each scored from position `score_from` on (its earlier tokens are context)."""
    windows: list[list[int]]
    score_from: int = 0


def llama_cpp_windows(path: str, bos_id: int | None) -> Windows:
    """The exact windows `llama-perplexity` scored when it wrote `--kl-divergence-base FILE`.

    That file starts with "_logits_", n_ctx (u32), n_vocab and n_chunk (i32) and the evaluated token ids
    (i32, n_ctx per chunk). llama-perplexity puts BOS in place of each chunk's first token and scores
    only the second half of a chunk (positions n_ctx/2 .. n_ctx-2, each predicting the next token), so
    conveyor's modes can be scored on the same tokens and positions as llama.cpp's own KL divergence.
    """
    with open(path, "rb") as file:
        if file.read(8) != b"_logits_":
            raise ValueError(f"{path} is not a llama-perplexity --kl-divergence-base file")
        n_ctx, _n_vocab, n_chunk = struct.unpack("<Iii", file.read(12))
        tokens = list(struct.unpack(f"<{n_ctx * n_chunk}i", file.read(4 * n_ctx * n_chunk)))
    windows = [tokens[i * n_ctx:(i + 1) * n_ctx] for i in range(n_chunk)]
    if bos_id is not None:
        windows = [[bos_id, *window[1:]] for window in windows]
    return Windows(windows, score_from=n_ctx // 2)


class _ModeModel:
    """One mode's model, run outside the engine: a window is one prefill into a private KV cache."""

    def __init__(self, base: EngineConfig, knobs: dict[str, str | bool], model_path: str, model_config: ModelConfig,
                 weights: dict[str, torch.Tensor], window: int, tokenizer: Tokenizer) -> None:
        config = dataclasses.replace(base, **knobs, num_kv_blocks=-(-window // base.block_size) + 1,
                                     max_model_len=window + 1).resolved(model_path, model_config)
        self.runner = ModelRunner(config, model_config, weights, tokenizer=tokenizer)
        self.sliding_window = model_config.sliding_window

    @torch.inference_mode()
    def logprobs(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab] fp32 log-probabilities of the token after each position."""
        runner = self.runner
        num_blocks = -(-len(ids) // runner.block_size)
        span = SequenceSpan(0, 0, len(ids), list(range(1, num_blocks + 1)))
        meta = build_attention_metadata([span], runner.block_size, self.sliding_window, runner.device)
        positions = torch.arange(len(ids), device=runner.device)
        with runner.denormals_flushed():
            logits = runner.model(torch.tensor(ids, device=runner.device), positions, runner.kv_caches, meta,
                                  positions)
        return torch.log_softmax(logits.float(), dim=-1)


def measure_quality(base: EngineConfig, modes: list[str], text: str | None = None, window: int = 256,
                    max_tokens: int = 2048, llama_cpp_base: str | None = None) -> list[ModeQuality]:
    """Every mode in `modes` against the exact fp32 model; the reference itself comes first.

    Scored on `text` cut into windows, or with `llama_cpp_base` on the windows and positions a
    llama-perplexity base file holds (see `llama_cpp_windows`).
    """
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise ValueError(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    model_path = resolve_model_path(base.model)
    model_config, weights = load_model_weights(model_path)
    tokenizer = load_tokenizer(base.tokenizer or model_path)
    names = [REFERENCE_MODE] + [m for m in modes if m != REFERENCE_MODE]
    bos_token = tokenizer.special_tokens.get("bos_token")
    bos_id = tokenizer.token_to_id(bos_token) if bos_token else model_config.bos_token_id
    if llama_cpp_base is not None:
        scored = llama_cpp_windows(llama_cpp_base, bos_id)
    elif text is not None:
        scored = Windows(list(text_windows(tokenizer.encode(text), bos_id, window, max_tokens)))
    else:
        raise ValueError("give a text or a llama-perplexity base file")
    longest = max(len(ids) for ids in scored.windows)
    models = {name: _ModeModel(base, MODES[name], model_path, model_config, weights, longest, tokenizer)
              for name in names}
    nll: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    kl: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    agree: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    first = scored.score_from
    for ids in scored.windows:
        targets = torch.tensor(ids[first + 1:])
        reference = models[REFERENCE_MODE].logprobs(ids)[first:-1]
        for name in names:
            ours = reference if name == REFERENCE_MODE else models[name].logprobs(ids)[first:-1]
            nll[name].append(-ours.gather(1, targets[:, None]).squeeze(1))
            # clamp: a KL of identical distributions can round to a hair below zero
            kl[name].append((reference.exp() * (reference - ours)).sum(dim=1).clamp_min(0.0))
            agree[name].append(ours.argmax(dim=1) == reference.argmax(dim=1))
    results = []
    for name in names:
        divergences = torch.cat(kl[name]).double()
        results.append(ModeQuality(
            mode=name, num_tokens=divergences.numel(), perplexity=math.exp(float(torch.cat(nll[name]).double().mean())),
            mean_kl=float(divergences.mean()), p99_kl=float(divergences.quantile(0.99)),
            top1_agreement=float(torch.cat(agree[name]).float().mean())))
    return results


def read_text(path: str) -> str:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"no text at {path}; give one with --text")
    return file.read_text(encoding="utf-8")
