"""Architecture name -> model class."""

from __future__ import annotations

from conveyor.config import ModelConfig
from conveyor.model.base import CausalLM
from conveyor.model.gemma3 import Gemma3ForCausalLM
from conveyor.model.llama import LlamaForCausalLM

_ARCHITECTURES: dict[str, type[CausalLM]] = {
    "gemma3": Gemma3ForCausalLM,
    "llama": LlamaForCausalLM,
}


def build_model(config: ModelConfig, max_positions: int) -> CausalLM:
    try:
        model_class = _ARCHITECTURES[config.architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {config.architecture!r}; "
                         f"conveyor supports {sorted(_ARCHITECTURES)}") from None
    return model_class(config, max_positions)
