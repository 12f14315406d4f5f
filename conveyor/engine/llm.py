"""`LLM`: the offline API, shaped like vLLM's. Submit everything, step until done, return in order."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from conveyor.config import EngineConfig
from conveyor.engine.engine import LLMEngine
from conveyor.engine.parallel_sampling import ParentRequest, Prompt
from conveyor.outputs import RequestOutput
from conveyor.sampling_params import SamplingParams


class LLM:
    """`LLM(model=None)` loads the default model (Gemma 3 270M); engine knobs use vLLM's names."""

    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        llm = cls.__new__(cls)
        llm.engine, llm.tokenizer, llm._ids = engine, engine.tokenizer, itertools.count()
        return llm

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); one RequestOutput per prompt, in input order.

        A request with n > 1 is run as n sibling requests (seed + i when seeded) merged into one output
        (`conveyor.engine.parallel_sampling`).
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or self.engine.default_sampling_params()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} sampling params")
        parents = [ParentRequest(str(next(self._ids)), [prompt], params)
                   for prompt, params in zip(prompts, params_list)]
        children = [child for parent in parents for child in parent.children()]
        added: list[str] = []
        try:
            for child in children:
                self.engine.add_request(child.prompt, child.params, request_id=child.request_id)
                added.append(child.request_id)
        except ValueError:  # refuse the whole call: nothing of it stays queued
            for request_id in added:
                self.engine.abort_request(request_id)
            raise
        wanted = {child.request_id for child in children}
        finals: dict[str, RequestOutput] = {}
        show = use_tqdm if use_tqdm is not None else len(children) >= 8
        with tqdm(total=len(children), desc="generate", unit="req", disable=not show) as bar:
            while len(finals) < len(children):
                outputs, _ = self.engine.step()
                for output in outputs:
                    if output.finished and output.request_id in wanted:
                        finals[output.request_id] = output
                        bar.update(1)
        return [parent.merge(finals)[0] for parent in parents]
