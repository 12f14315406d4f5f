"""What structured output costs a step: decode steps of a full batch with no constrained request, one, and
all of them constrained, read from `StepStats` (the grammar masks are built with the batch, in
`prepare_seconds`; the sampler applies them, in `sample_seconds`)."""

from __future__ import annotations

import random
import statistics
from typing import Any

from conveyor.engine.engine import LLMEngine
from conveyor.sampling_params import SamplingParams, StructuredOutputsParams

# Two kinds of constraint: long free text inside a JSON string (most of the vocabulary allowed: the
# biggest masks) and a long list of small integers (a handful of tokens allowed).
CONSTRAINTS: dict[str, StructuredOutputsParams] = {
    "json-string": StructuredOutputsParams(json={
        "type": "object", "properties": {"text": {"type": "string", "minLength": 2000}}, "required": ["text"]}),
    "json-integers": StructuredOutputsParams(json={
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 1000}),
}


def measure(engine: LLMEngine, batch_size: int, num_constrained: int, constraint: StructuredOutputsParams,
            steps: int, warmup: int, seed: int = 0) -> dict[str, Any]:
    """Median step, prepare and sample seconds over `steps` decode steps of `batch_size` requests (after
    `warmup` such steps), the first `num_constrained` of them constrained."""
    rng = random.Random(seed)
    for index in range(batch_size):
        prompt = [2] + [rng.randrange(1000, 200000) for _ in range(31)]
        params = SamplingParams(temperature=0.0, max_tokens=warmup + steps + 2, ignore_eos=True,
                                structured_outputs=constraint if index < num_constrained else None)
        engine.add_request(prompt, params, request_id=f"bench-{num_constrained}-{seed}-{index}")
    full_decode_steps = []
    while engine.has_unfinished_requests():
        _, stats = engine.step()
        if stats is not None and len(stats.scheduled) == batch_size and all(
                entry.kind == "decode" for entry in stats.scheduled):
            full_decode_steps.append(stats)
    measured = full_decode_steps[warmup:warmup + steps]
    if len(measured) < steps:
        raise RuntimeError(f"only {len(measured)} full decode steps: a constrained request ended early")
    return {"batch_size": batch_size, "num_constrained": num_constrained, "steps": len(measured),
            "step_ms": 1e3 * statistics.median(s.duration for s in measured),
            "prepare_ms": 1e3 * statistics.median(s.prepare_seconds for s in measured),
            "forward_ms": 1e3 * statistics.median(s.forward_seconds for s in measured),
            "sample_ms": 1e3 * statistics.median(s.sample_seconds for s in measured)}


def run(engine: LLMEngine, batch_size: int, steps: int, warmup: int,
        constraints: list[str]) -> list[dict[str, Any]]:
    """Each constraint kind with 0, 1 and `batch_size` constrained requests; compiled first, as the server
    compiles before a request reaches the engine."""
    results = []
    for name in constraints:
        engine.grammar.compile(CONSTRAINTS[name])
        for num_constrained in (0, 1, batch_size):
            row = measure(engine, batch_size, num_constrained, CONSTRAINTS[name], steps, warmup)
            results.append({"constraint": name, **row})
            print(f"{name:14s} {num_constrained:3d}/{batch_size} constrained: step {row['step_ms']:7.2f} ms  "
                  f"(prepare {row['prepare_ms']:6.2f}, forward {row['forward_ms']:7.2f}, "
                  f"sample {row['sample_ms']:6.2f})")
    return results
