"""Architecture name -> model class."""

from __future__ import annotations

import torch

from conveyor.config import ModelConfig
from conveyor.model.base import CausalLM
from conveyor.model.gemma3 import Gemma3ForCausalLM
from conveyor.model.llama import LlamaForCausalLM

_ARCHITECTURES: dict[str, type[CausalLM]] = {
    "gemma3": Gemma3ForCausalLM,
    "llama": LlamaForCausalLM,
}


def build_model(config: ModelConfig, max_positions: int, weights: dict[str, torch.Tensor]) -> CausalLM:
    """The model for `config`, holding `weights` (named as Hugging Face names them)."""
    try:
        model_class = _ARCHITECTURES[config.architecture]
    except KeyError:
        raise ValueError(f"unsupported architecture {config.architecture!r}; "
                         f"conveyor supports {sorted(_ARCHITECTURES)}") from None
    # NOTE: built on the meta device, so no time goes into random initialisation of weights we replace.
    with torch.device("meta"):
        model = model_class(config, max_positions)
    model.load_weights(weights)
    return model
