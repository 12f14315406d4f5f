"""The Hugging Face reference model built from conveyor's ModelConfig and tensors (see conveyor.bench)."""

from conveyor.bench.hf_baseline import hf_config_from_model_config, hf_model_from_tensors

__all__ = ["hf_config_from_model_config", "hf_model_from_tensors"]
