"""conveyor: a continuous-batching LLM inference engine and OpenAI-compatible server."""

from conveyor.config import EngineConfig
from conveyor.engine.llm import LLM
from conveyor.outputs import CompletionOutput, RequestOutput
from conveyor.sampling_params import SamplingParams

__all__ = ["LLM", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
