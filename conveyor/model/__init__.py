"""Model architectures and weight loading."""

from conveyor.model.loader import default_model_path, load_model_weights, resolve_model_path

__all__ = ["default_model_path", "load_model_weights", "resolve_model_path"]
