"""n > 1 and lists of prompts, in one place: one caller request fans out into engine requests of n = 1
and their outputs merge back (as vLLM's `ParentRequest`). `LLM.generate` and the server both use it.

Child `i` of prompt `p` gets the id `{request_id}-{p}-{i}` and, when seeded, the seed `seed + i`, so a
seeded request with n samples gives n different but reproducible completions. A child's choice index
(OpenAI's `choices[k].index`) is `p * n + i`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from conveyor.outputs import RequestOutput
from conveyor.sampling_params import SamplingParams

Prompt = str | list[int]


@dataclass(frozen=True)
class ChildRequest:
    request_id: str
    prompt: Prompt
    params: SamplingParams
    prompt_index: int
    sample_index: int
    choice_index: int


@dataclass(frozen=True)
class ParentRequest:
    request_id: str
    prompts: list[Prompt]
    params: SamplingParams

    def children(self) -> list[ChildRequest]:
        n = self.params.n
        return [ChildRequest(f"{self.request_id}-{p}-{i}", prompt, self._child_params(i), p, i, p * n + i)
                for p, prompt in enumerate(self.prompts) for i in range(n)]

    def _child_params(self, sample_index: int) -> SamplingParams:
        seed = self.params.seed
        return dataclasses.replace(self.params, n=1, seed=None if seed is None else seed + sample_index)

    def merge(self, finals: dict[str, RequestOutput]) -> list[RequestOutput]:
        """One output per prompt, its completions in sample order (`index` = sample index), from the
        children's final outputs keyed by child request id."""
        merged: list[RequestOutput] = []
        for child in self.children():
            final = finals[child.request_id]
            completion = dataclasses.replace(final.outputs[0], index=child.sample_index)
            if child.sample_index == 0:
                merged.append(dataclasses.replace(final, request_id=f"{self.request_id}-{child.prompt_index}",
                                                  outputs=[completion]))
            else:
                merged[-1].outputs.append(completion)
        return merged
