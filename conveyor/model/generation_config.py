"""The model's own sampling defaults, as vLLM's `--generation-config auto` reads them.

A Hugging Face directory's `generation_config.json` (temperature, top_k, top_p, min_p, repetition_penalty,
max_new_tokens), or llama.cpp's `general.sampling.*` keys in a GGUF. The server applies them to the
fields a request leaves unset. Like vLLM, `do_sample` is not read: a request that wants greedy decoding
says temperature 0.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from conveyor.model.gguf_file import GGUFFile

logger = logging.getLogger(__name__)

GENERATION_CONFIG_CHOICES = ("auto", "vllm")  # or a directory holding a generation_config.json

# generation_config.json key -> SamplingParams field
_HF_KEYS = {"temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
            "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
# GGUF metadata key (llama.cpp's) -> SamplingParams field
_GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_k": "top_k",
              "general.sampling.top_p": "top_p", "general.sampling.min_p": "min_p",
              "general.sampling.penalty_repeat": "repetition_penalty"}


def read_sampling_defaults(model_path: str, source: str = "auto") -> dict[str, Any]:
    """SamplingParams field -> the model's default, from `source`: "auto" (the model's own files), "vllm"
    (none: the engine's neutral defaults) or a directory with a generation_config.json."""
    if source == "vllm":
        return {}
    path = Path(model_path if source == "auto" else source)
    if source != "auto" and not (path / "generation_config.json").is_file():
        raise ValueError(f"generation_config {source!r}: expected auto, vllm or a directory holding a "
                         "generation_config.json")
    if path.is_dir():
        file = path / "generation_config.json"
        values = json.loads(file.read_text()) if file.is_file() else {}
        keys = _HF_KEYS
    elif path.suffix == ".gguf":
        values, keys = GGUFFile(str(path)).metadata, _GGUF_KEYS
    else:
        return {}
    defaults = {field: values[key] for key, field in keys.items() if values.get(key) is not None}
    if defaults:
        logger.info("sampling defaults from %s (for fields a request leaves unset): %s", path, defaults)
    return defaults
