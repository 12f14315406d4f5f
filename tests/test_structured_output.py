"""Structured output on a tiny random-weight model: random weights stress the constraint best, since the
model itself has no idea what JSON is. Every output must parse and validate."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from conveyor import LLM, SamplingParams
from conveyor.engine.sampler import Sampler, SamplingMetadata, SamplingRow
from conveyor.engine.structured_output import unpack_bitmasks
from conveyor.sampling_params import StructuredOutputsParams


@pytest.fixture(scope="module")
def llm(tiny_model_dirs: dict[str, Path]) -> LLM:
    return LLM(str(tiny_model_dirs["gemma3"]), block_size=4, num_kv_blocks=512, max_num_seqs=16)


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """A JSON schema whose every valid instance is short (bounded strings, arrays and integers), so a
    random model finishes it well within max_tokens."""
    kinds = ["string", "integer", "boolean", "enum", "null", "number"] + (["object", "array"] if depth < 2 else [])
    kind = rng.choice(kinds)
    if kind == "string":
        schema: dict[str, Any] = {"type": "string", "maxLength": rng.randint(0, 6)}
        if rng.random() < 0.3:
            schema["pattern"] = rng.choice(["^[a-z]+$", "^[0-9]{2,3}$", "^(yes|no)$"])
            schema.pop("maxLength")
        return schema
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 500)}
    if kind == "number":
        return {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.5}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, True, None, "a\"quote"], rng.randint(1, 4))}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": rng.randint(0, 1),
                "maxItems": rng.randint(1, 3)}
    if kind == "object":
        names = rng.sample(["id", "name", "tags", "ok", "size", "kind", "é"], rng.randint(1, 4))
        properties = {name: random_schema(rng, depth + 1) for name in names}
        return {"type": "object", "properties": properties,
                "required": [n for n in names if rng.random() < 0.7], "additionalProperties": False}
    return {"type": kind}


def test_random_schemas_always_parse_and_validate(llm: LLM) -> None:
    rng = random.Random(0)
    schemas = [random_schema(rng) for _ in range(24)]
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=200,
                             structured_outputs=StructuredOutputsParams(json=schema))
              for seed, schema in enumerate(schemas)]
    outputs = llm.generate(["Answer in JSON:"] * len(schemas), params)
    for schema, output in zip(schemas, outputs):
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", (schema, completion.text)
        jsonschema.validate(json.loads(completion.text), schema)


def test_json_object_choice_regex_and_grammar(llm: LLM) -> None:
    cases = [
        (StructuredOutputsParams(json_object=True), lambda text: isinstance(json.loads(text), dict)),
        (StructuredOutputsParams(choice=["positive", "negative", "n/a"]),
         lambda text: text in ("positive", "negative", "n/a")),
        (StructuredOutputsParams(regex=r"[0-9]{3}-[a-c]{2}"), lambda text: re.fullmatch(r"[0-9]{3}-[a-c]{2}", text)),
        (StructuredOutputsParams(grammar='start: "(" num ("+" num)* ")"\nnum: /[1-9]/'),
         lambda text: re.fullmatch(r"\([1-9](\+[1-9])*\)", text)),
    ]
    for seed in range(3):
        outputs = llm.generate(["x"] * len(cases), [SamplingParams(temperature=1.0, seed=seed, max_tokens=300,
                                                                   structured_outputs=spec) for spec, _ in cases])
        for (spec, check), output in zip(cases, outputs):
            completion = output.outputs[0]
            if spec.json_object and completion.finish_reason == "length":
                continue  # an unbounded object may outlast max_tokens; bounded ones must not
            assert completion.finish_reason == "stop" and check(completion.text), (spec, completion.text)


def test_unconstrained_neighbours_are_untouched_and_n_gets_a_matcher_each(llm: LLM) -> None:
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(["hello there"], plain)[0].outputs[0].token_ids
    spec = StructuredOutputsParams(choice=["alpha", "beta", "gamma delta"])
    mixed = llm.generate(["hello there", "pick one"],
                         [plain, SamplingParams(temperature=1.0, seed=3, n=6, structured_outputs=spec)])
    assert mixed[0].outputs[0].token_ids == alone
    assert len(mixed[1].outputs) == 6
    assert all(c.text in spec.choice for c in mixed[1].outputs)  # type: ignore[operator]


def test_preempted_requests_keep_their_grammar_state(tiny_model_dirs: dict[str, Path]) -> None:
    # 40 blocks of 4 tokens cannot hold eight requests of ~60 tokens: some are preempted and recompute.
    small = LLM(str(tiny_model_dirs["gemma3"]), block_size=4, num_kv_blocks=40, max_num_seqs=8)
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 12,
              "maxItems": 12}
    params = [SamplingParams(temperature=1.0, seed=seed, max_tokens=100,
                             structured_outputs=StructuredOutputsParams(json=schema)) for seed in range(8)]
    outputs = small.generate(["numbers please"] * 8, params)
    assert small.engine.scheduler.num_preemptions > 0
    for output in outputs:
        jsonschema.validate(json.loads(output.outputs[0].text), schema)


def test_bad_constraints_are_refused(llm: LLM) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json={"type": "object"}, regex="a")
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])
    for spec in [StructuredOutputsParams(regex="(unclosed"), StructuredOutputsParams(grammar="start: undefined_rule"),
                 StructuredOutputsParams(json={"type": "no-such-type"})]:
        with pytest.raises(ValueError, match="invalid"):
            llm.generate(["x"], SamplingParams(structured_outputs=spec))
    assert not llm.engine.has_unfinished_requests()


def test_sampler_masks_only_constrained_rows() -> None:
    vocab = 70
    logits = torch.randn(3, vocab)
    original = logits.clone()
    bitmask = torch.zeros(3, dtype=torch.int32)
    bitmask[1] = 1 << 5  # only token 37 allowed
    rows = [SamplingRow(SamplingParams(temperature=0.0), [1], 1),
            SamplingRow(SamplingParams(temperature=1.0, seed=1), [1], 1, token_bitmask=bitmask),
            SamplingRow(SamplingParams(temperature=0.0), [1], 1)]
    out = Sampler()(logits.clone(), SamplingMetadata(rows))
    assert out.token_ids[1] == 37
    assert out.token_ids[0] == int(original[0].argmax()) and out.token_ids[2] == int(original[2].argmax())
    allowed = unpack_bitmasks(torch.tensor([[-1, 3, 0]], dtype=torch.int32), 66)
    assert allowed[0, :32].all() and allowed[0, 32:34].all() and not allowed[0, 34:].any()
