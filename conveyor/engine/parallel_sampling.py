"""n > 1 and lists of prompts, in one place: one caller request fans out into engine requests of n = 1
and their outputs merge back (as vLLM's `ParentRequest`). `LLM.generate` and the server both use it.

Child `i` of prompt `p` gets the id `{request_id}-{p}-{i}` and, when seeded, the seed `seed + i`, so a
seeded request with n samples gives n different but reproducible completions. A child's choice index
(OpenAI's `choices[k].index`) is `p * n + i`.

With `best_of` > n, each prompt gets `best_of` children (computing their log-probabilities even if the
caller did not ask for them) and `best` keeps the n of highest cumulative log-probability.
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

    @property
    def samples_per_prompt(self) -> int:
        return self.params.best_of or self.params.n

    def children(self) -> list[ChildRequest]:
        count = self.samples_per_prompt
        return [ChildRequest(f"{self.request_id}-{p}-{i}", prompt, self._child_params(i), p, i, p * count + i)
                for p, prompt in enumerate(self.prompts) for i in range(count)]

    def _child_params(self, sample_index: int) -> SamplingParams:
        seed, logprobs = self.params.seed, self.params.logprobs
        if self.samples_per_prompt > self.params.n and logprobs is None:
            logprobs = 0  # the ranking needs each child's cumulative log-probability
        return dataclasses.replace(self.params, n=1, best_of=None, logprobs=logprobs,
                                   seed=None if seed is None else seed + sample_index)

    def best(self, finals: list[RequestOutput]) -> list[RequestOutput]:
        """The n outputs kept per prompt, in choice order, from every child's final output in child order:
        all of them, or with best_of > n the n of highest cumulative log-probability (best first)."""
        n, count = self.params.n, self.samples_per_prompt
        if count == n:
            return finals
        kept: list[RequestOutput] = []
        for first in range(0, len(finals), count):
            ranked = sorted(finals[first:first + count], reverse=True,
                            key=lambda final: final.outputs[0].cumulative_logprob or 0.0)
            for final in ranked[:n]:
                if self.params.logprobs is None:  # computed for the ranking only
                    completion = dataclasses.replace(final.outputs[0], logprobs=None, cumulative_logprob=None)
                    final = dataclasses.replace(final, outputs=[completion])
                kept.append(final)
        return kept

    def merge(self, finals: dict[str, RequestOutput]) -> list[RequestOutput]:
        """One output per prompt, its n completions in choice order (`index` = sample index), from the
        children's final outputs keyed by child request id."""
        n = self.params.n
        kept = self.best([finals[child.request_id] for child in self.children()])
        merged: list[RequestOutput] = []
        for index, final in enumerate(kept):
            completion = dataclasses.replace(final.outputs[0], index=index % n)
            if index % n == 0:
                merged.append(dataclasses.replace(final, request_id=f"{self.request_id}-{index // n}",
                                                  outputs=[completion]))
            else:
                merged[-1].outputs.append(completion)
        return merged
