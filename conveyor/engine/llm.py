"""`LLM`: the offline API, shaped like vLLM's. Submit everything, step until done, return in order."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from conveyor.config import EngineConfig
from conveyor.engine.engine import LLMEngine
from conveyor.outputs import RequestOutput
from conveyor.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """`LLM(model=None)` loads the default model (Gemma 3 270M); engine knobs use vLLM's names."""

    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer

    @classmethod
    def from_engine(cls, engine: LLMEngine) -> LLM:
        llm = cls.__new__(cls)
        llm.engine, llm.tokenizer = engine, engine.tokenizer
        return llm

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); one RequestOutput per prompt, in input order.

        A request with n > 1 is run as n sibling requests (seed + i when seeded) merged into one output.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} sampling params")
        engine = self.engine
        children: dict[str, tuple[int, int]] = {}  # child request id -> (prompt index, sample index)
        added: list[str] = []
        try:
            for index, (prompt, params) in enumerate(zip(prompts, params_list)):
                for sample in range(params.n):
                    child = dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + sample)
                    request = engine.add_request(prompt, child)
                    children[request.request_id] = (index, sample)
                    added.append(request.request_id)
        except ValueError:  # refuse the whole call: nothing of it stays queued
            for request_id in added:
                engine.abort_request(request_id)
            raise
        finals: dict[str, RequestOutput] = {}
        show = use_tqdm if use_tqdm is not None else len(children) >= 8
        with tqdm(total=len(children), desc="generate", unit="req", disable=not show) as bar:
            while len(finals) < len(children):
                for output in engine.step():
                    if output.finished and output.request_id in children:
                        finals[output.request_id] = output
                        bar.update(1)
        return _merge(prompts, params_list, children, finals)


def _merge(prompts: list[Prompt], params_list: list[SamplingParams], children: dict[str, tuple[int, int]],
           finals: dict[str, RequestOutput]) -> list[RequestOutput]:
    merged: list[RequestOutput | None] = [None] * len(prompts)
    for request_id, (index, sample) in sorted(children.items(), key=lambda item: item[1]):
        output = finals[request_id]
        completion = dataclasses.replace(output.outputs[0], index=sample)
        if merged[index] is None:
            merged[index] = dataclasses.replace(output, request_id=str(index), outputs=[completion])
        else:
            merged[index].outputs.append(completion)  # type: ignore[union-attr]
    return [m for m in merged if m is not None]
