"""Owns the model, its KV-cache tensors and its own per-request state; runs one step: update that state
from the scheduler's deltas, build the flat batch, forward, sample."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from conveyor.cache import atomic_write_path, cache_dir, file_fingerprint
from conveyor.config import EngineConfig, ModelConfig
from conveyor.engine.batch import (
    CachedRequestState,
    PromptLogprobsSpan,
    apply_scheduler_output,
    build_model_input,
)
from conveyor.engine.sampler import Sampler, position_logprobs
from conveyor.engine.scheduler_output import SchedulerOutput
from conveyor.engine.structured_output import GrammarCompiler
from conveyor.model.argmax import argmax_for
from conveyor.model.fused_ops import apply_elementwise_kernel
from conveyor.model.int8_gemv import lm_head_table
from conveyor.model.kernels import apply_linear_kernel
from conveyor.model.paged_decode import apply_attention_kernel
from conveyor.model.quantization import activation_maxima
from conveyor.model.registry import build_model
from conveyor.outputs import Logprob
from conveyor.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# The int8 method's calibration text: plain English the OS (Debian, Ubuntu) or Python itself ships, never the
# text `conveyor bench quality` scores (the GPL-3), cut into windows of 512 tokens, 1024 tokens in all.
CALIBRATION_TEXTS = ("/usr/share/common-licenses/Apache-2.0", str(Path(os.__file__).parent / "LICENSE.txt"))
_CALIBRATION_TOKENS, _CALIBRATION_WINDOW = 1024, 512
_CALIBRATION_FORMAT = 1  # bump when the cached maxima's meaning changes


def calibration_windows(tokenizer: Tokenizer, bos_id: int | None, max_len: int = _CALIBRATION_WINDOW
                        ) -> tuple[str, list[list[int]]]:
    """The first calibration text found, as token windows (of at most `max_len`) each led by BOS: (its path,
    the windows)."""
    path = next((p for p in CALIBRATION_TEXTS if Path(p).is_file()), None)
    if path is None:
        raise ValueError(f"quantization int8 calibrates on one of {', '.join(CALIBRATION_TEXTS)}; none is "
                         "here: use --quantization int8-fast, or --dtype float32 or bfloat16")
    body = [t for t in tokenizer.encode(Path(path).read_text(encoding="utf-8")) if t != bos_id]
    body = body[:_CALIBRATION_TOKENS]
    lead = [] if bos_id is None else [bos_id]
    step = min(_CALIBRATION_WINDOW, max_len) - len(lead)
    return path, [lead + body[start:start + step] for start in range(0, len(body), step)]


# Prompt rows projected to the vocabulary at once when scoring prompt tokens: bounds the logits' memory.
_PROMPT_LOGPROBS_ROWS = 64


@dataclass
class RunnerOutput:
    sampled_token_ids: dict[str, int]
    logprobs: dict[str, dict[int, Logprob]] = field(default_factory=dict)
    grammar_completed: set[str] = field(default_factory=set)  # structured output complete: they must stop
    # request id -> (first prompt position, its logprobs and the next ones'): position i scores token i + 1
    prompt_logprobs: dict[str, tuple[int, list[dict[int, Logprob]]]] = field(default_factory=dict)
    prepare_seconds: float = 0.0
    forward_seconds: float = 0.0
    sample_seconds: float = 0.0


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, weights: dict[str, torch.Tensor],
                 grammar: GrammarCompiler | None = None, tokenizer: Tokenizer | None = None) -> None:
        """`config` is resolved (`EngineConfig.resolved`): threads, context limit and pool size are set.
        `grammar` gives structured-output requests their matchers; `tokenizer` reads the int8 method's
        calibration text (needed with quantization int8)."""
        assert config.model and config.num_threads and config.max_model_len and config.num_kv_blocks, "the config is not resolved"
        torch.set_num_threads(config.num_threads)
        self.num_threads = torch.get_num_threads()
        self.device = torch.device(config.device)
        self.dtype = _DTYPES[config.dtype]
        self.block_size = config.block_size
        self.model = build_model(model_config, config.max_model_len, weights)
        head_table = lm_head_table(self.model)  # fp32, for the few-row lm_head (apply_linear_kernel)
        self.model.to(device=self.device, dtype=self.dtype).eval()
        apply_attention_kernel(self.model, config.attention_kernel, self.device, self.dtype)
        # Rotary tables stay fp32 whatever the weight dtype (positions need the precision).
        for module in self.model.modules():
            if hasattr(module, "cos"):
                module.cos, module.sin = module.cos.float(), module.sin.float()
        maxima = None
        self.flush_denormals = False
        if config.quantization == "int8":
            if tokenizer is None:
                raise ValueError("quantization int8 needs the tokenizer for its calibration pass")
            # NOTE: this mode's forward makes denormal floats (values below ~1e-38), which the CPU computes
            # with microcode: a 512-token prefill took 17 s instead of 0.4 s until they are flushed to
            # zero (it changes no value above 1e-38; docs/benchmarks.md). Only inside the model's work:
            # the flag is the thread's floating-point state, which the rest of the process must keep.
            self.flush_denormals = True
            with self.denormals_flushed():
                maxima = self._calibrate(tokenizer, model_config.bos_token_id, config.max_model_len, config.model)
        apply_linear_kernel(self.model, config.linear_kernel, config.quantization, self.device, self.dtype, maxima,
                            head_table if self.device.type == "cpu" else None, config.int8_lm_head)
        del head_table
        elementwise = apply_elementwise_kernel(self.model, config.elementwise_kernel, self.device, self.dtype)
        self.num_kv_blocks = config.num_kv_blocks
        self.kv_caches = self.model.allocate_kv_cache(self.num_kv_blocks, self.block_size, self.dtype, self.device)
        self.sliding_window = model_config.sliding_window
        # Greedy rows' argmax in C++ with the other CPU kernels (the same index as torch's, ~10x faster).
        self.sampler = Sampler(argmax_for(self.device, use_kernel=elementwise == "cpp"))
        self.grammar = grammar
        self.requests: dict[str, CachedRequestState] = {}  # every request the scheduler has sent, until it ends
        pool_bytes = sum(k.nbytes + v.nbytes for k, v in self.kv_caches)
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB, %d tokens)", self.num_kv_blocks, self.block_size,
                    pool_bytes / 2**30, self.num_kv_blocks * self.block_size)

    def _calibrate(self, tokenizer: Tokenizer, bos_id: int | None, max_len: int,
                   model_path: str) -> dict[str, torch.Tensor]:
        """The unquantized model's per-channel activation maxima over the calibration text (int8's smoothing),
        cached on disk by the model's fingerprint and the calibration tokens (the pass takes seconds)."""
        started = time.perf_counter()
        path, windows = calibration_windows(tokenizer, bos_id, max_len)
        digest = hashlib.sha256(f"{_CALIBRATION_FORMAT} {self.dtype} {windows}".encode())
        model = Path(model_path)
        for file in [model] if model.is_file() else sorted(model.glob("*")):
            digest.update(file_fingerprint(file).encode() if file.is_file() else b"")
        cached = cache_dir() / "calibration" / f"{digest.hexdigest()[:32]}.safetensors"
        if cached.exists():
            maxima = load_file(str(cached))
            logger.info("int8 calibration: cached maxima of %s (%s)", path, cached)
            return maxima
        maxima = activation_maxima(self.model, windows, self.block_size)
        partial = atomic_write_path(cached)
        save_file(maxima, str(partial))
        partial.replace(cached)
        logger.info("int8 calibration: %d tokens of %s in %.1f s (cached)", sum(map(len, windows)), path,
                    time.perf_counter() - started)
        return maxima

    def update_states(self, output: SchedulerOutput) -> None:
        """Apply a step's deltas to the runner's own request states. `execute` does this first; the engine
        calls it alone for a step with nothing to run, so finished requests still leave."""
        apply_scheduler_output(self.requests, output, self.grammar)

    @torch.inference_mode()
    @contextmanager
    def denormals_flushed(self) -> Iterator[None]:
        """Denormal floats flushed to zero inside, in the modes that need it (`flush_denormals`)."""
        if not self.flush_denormals:
            yield
            return
        torch.set_flush_denormal(True)
        try:
            yield
        finally:
            torch.set_flush_denormal(False)

    def execute(self, output: SchedulerOutput) -> RunnerOutput:
        with self.denormals_flushed():
            return self._execute(output)

    def _execute(self, output: SchedulerOutput) -> RunnerOutput:
        started = time.perf_counter()
        self.update_states(output)
        model_input = build_model_input(output, self.requests, self.block_size, self.sliding_window, self.device)
        prepared = time.perf_counter()
        result = RunnerOutput(sampled_token_ids={})
        if model_input.prompt_logprobs:
            hidden = self.model.hidden_states(model_input.input_ids, model_input.positions, self.kv_caches,
                                              model_input.attention)
            logits = self.model.compute_logits(hidden[model_input.logits_indices], upcast=False)
            result.prompt_logprobs = self._prompt_logprobs(hidden, model_input.prompt_logprobs)
        else:
            logits = self.model(model_input.input_ids, model_input.positions, self.kv_caches,
                                model_input.attention, model_input.logits_indices, upcast_logits=False)
        forwarded = time.perf_counter()
        if model_input.sampling_request_ids:
            sampled = self.sampler(logits, model_input.sampling)
            for row, request_id in enumerate(model_input.sampling_request_ids):
                token = sampled.token_ids[row]
                if self.requests[request_id].append_token(token):
                    result.grammar_completed.add(request_id)
                result.sampled_token_ids[request_id] = token
                if sampled.logprobs is not None and sampled.logprobs[row] is not None:
                    result.logprobs[request_id] = sampled.logprobs[row]
        result.prepare_seconds = prepared - started
        result.forward_seconds = forwarded - prepared
        result.sample_seconds = time.perf_counter() - forwarded
        return result

    def _prompt_logprobs(self, hidden: torch.Tensor, spans: list[PromptLogprobsSpan]
                         ) -> dict[str, tuple[int, list[dict[int, Logprob]]]]:
        """Each span's prompt positions scored against the prompt token that follows, a slice of rows at a time."""
        rows = [span.first_row + offset for span in spans for offset in range(span.count)]
        targets = [token for span in spans for token in span.target_ids]
        counts: list[int | None] = [span.num_top for span in spans for _ in range(span.count)]
        positions: list[dict[int, Logprob] | None] = []
        for first in range(0, len(rows), _PROMPT_LOGPROBS_ROWS):
            chosen = slice(first, first + _PROMPT_LOGPROBS_ROWS)
            logprobs = torch.log_softmax(self.model.compute_logits(hidden[torch.tensor(rows[chosen], device=hidden.device)]), dim=-1)
            positions += position_logprobs(logprobs, torch.tensor(targets[chosen], device=logprobs.device),
                                           counts[chosen])
        result, first_row = {}, 0
        for span in spans:
            scored = [p for p in positions[first_row:first_row + span.count] if p is not None]
            result[span.request_id] = (span.start, scored)
            first_row += span.count
        return result
