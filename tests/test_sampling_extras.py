"""Engine side of the API's extra fields: logit_bias in the batched sampler, prompt logprobs (echo), best_of,
and the model's sampling defaults (generation_config.json / GGUF)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conveyor import LLM, EngineConfig, SamplingParams
from conveyor.engine.engine import LLMEngine
from conveyor.engine.sampler import Sampler, SamplingMetadata, SamplingRow, apply_logit_bias
from conveyor.model.generation_config import read_sampling_defaults
from tests.tiny_models import load_hf_model

PROMPT = [1] + [(7 * i) % 250 + 5 for i in range(40)]


def _row(**params: object) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), [3, 4, 5], 3)


def test_logit_bias_applies_per_row_and_rows_without_it_take_the_fast_path() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    unbiased = SamplingMetadata([_row(temperature=0.0), _row(temperature=0.0), _row(temperature=0.0)])
    assert apply_logit_bias(logits, unbiased) is logits  # no copy, no work
    metadata = SamplingMetadata([_row(temperature=0.0, logit_bias={7: 100.0}), _row(temperature=0.0),
                                 _row(temperature=0.0, logit_bias={int(logits[2].argmax()): -100.0, 9: 0.5})])
    biased = apply_logit_bias(logits.clone(), metadata)
    assert torch.equal(biased[1], logits[1])
    assert biased[0, 7] == logits[0, 7] + 100.0 and biased[2, 9] == logits[2, 9] + 0.5
    tokens = Sampler()(logits.clone(), metadata).token_ids
    assert tokens[0] == 7 and tokens[1] == int(logits[1].argmax())
    assert tokens[2] != int(logits[2].argmax())


def test_sampling_params_refuse_bad_biases_and_best_of_below_n() -> None:
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={3: 101.0})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={-1: 1.0})
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams(n=3, best_of=2)


@pytest.fixture(scope="module")
def gemma_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["gemma3"]


def _engine(path: Path, **kwargs: object) -> LLMEngine:
    settings: dict = dict(model=str(path), block_size=4, num_kv_blocks=256, dtype="float32")
    settings.update(kwargs)
    return LLMEngine(EngineConfig(**settings))


def _hf_prompt_logprobs(path: Path, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = load_hf_model(path)(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.mark.parametrize("settings", [dict(), dict(max_num_batched_tokens=7), dict(num_kv_blocks=14)],
                         ids=["one step", "chunked", "preempted"])
def test_prompt_logprobs_match_transformers_however_the_prompt_is_computed(gemma_dir: Path, settings: dict) -> None:
    engine = _engine(gemma_dir, **settings)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, prompt_logprobs=3)
    others = [[1] + [(5 * i + k) % 250 + 5 for i in range(20)] for k in range(3)]
    llm = LLM.from_engine(engine)
    # The same prompt, already in the prefix cache, must still be scored in full.
    llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=2))
    outputs = llm.generate([PROMPT, *others], [params] + [SamplingParams(temperature=0.0, max_tokens=12,
                                                                         ignore_eos=True)] * 3)
    if "num_kv_blocks" in settings:
        assert engine.scheduler.num_preemptions > 0
    scored = outputs[0].prompt_logprobs
    assert scored is not None and len(scored) == len(PROMPT) and scored[0] is None
    reference = _hf_prompt_logprobs(gemma_dir, PROMPT)
    for position, token in enumerate(PROMPT[1:], start=1):
        entry = scored[position]
        assert entry is not None and token in entry
        assert abs(entry[token].logprob - float(reference[position - 1, token])) < 1e-3
        top = reference[position - 1].topk(3).indices.tolist()
        assert all(alternative in entry for alternative in top)
        assert entry[token].rank == int((reference[position - 1] > reference[position - 1, token]).sum()) + 1
    assert outputs[1].prompt_logprobs is None


def test_best_of_keeps_the_n_samples_of_highest_cumulative_logprob(gemma_dir: Path) -> None:
    llm = LLM.from_engine(_engine(gemma_dir))
    args = dict(temperature=1.0, max_tokens=6, ignore_eos=True, seed=11)
    every = llm.generate([PROMPT], SamplingParams(n=5, logprobs=0, **args))[0].outputs
    ranked = sorted(every, key=lambda c: c.cumulative_logprob, reverse=True)
    best = llm.generate([PROMPT], SamplingParams(n=2, best_of=5, **args))[0].outputs
    assert [c.token_ids for c in best] == [c.token_ids for c in ranked[:2]]
    assert all(c.logprobs is None and c.cumulative_logprob is None for c in best)  # not asked for


def test_generation_config_defaults_apply_unless_vllm_is_asked(gemma_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(gemma_dir, model)
    (model / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": 1, "top_p": 0.9,
                                                              "max_new_tokens": 5}))
    assert read_sampling_defaults(str(model)) == {"top_k": 1, "top_p": 0.9, "max_tokens": 5}
    assert read_sampling_defaults(str(model), "vllm") == {}
    with pytest.raises(ValueError, match="generation_config"):
        read_sampling_defaults(str(model), str(tmp_path / "nowhere"))
    engine = _engine(model)
    llm = LLM.from_engine(engine)
    greedy = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    defaulted = llm.generate([PROMPT])[0]  # top_k 1 from the file: greedy whatever the temperature
    assert defaulted.outputs[0].token_ids[:len(defaulted.outputs[0].token_ids)] == \
        greedy.outputs[0].token_ids[:len(defaulted.outputs[0].token_ids)]
    assert len(defaulted.outputs[0].token_ids) <= 5
    assert engine.default_sampling_params(top_k=-1).top_k == -1
    assert _engine(model, generation_config="vllm").sampling_defaults == {}
