"""conveyor: a continuous-batching LLM inference engine and OpenAI-compatible server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from conveyor.config import EngineConfig
from conveyor.outputs import CompletionOutput, RequestOutput
from conveyor.sampling_params import SamplingParams, StructuredOutputsParams

if TYPE_CHECKING:
    from conveyor.engine.llm import LLM

__all__ = ["LLM", "EngineConfig", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # LLM pulls in torch and the model code; import it only when asked for.
    if name == "LLM":
        from conveyor.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'conveyor' has no attribute {name!r}")
