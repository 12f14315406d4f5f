"""Engine behaviour on a tiny model: batch invariance, continuous batching in the step trace, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from conveyor import LLM, EngineConfig, SamplingParams
from conveyor.engine.engine import LLMEngine

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
TARGET = [1] + [(11 * i) % 250 + 5 for i in range(30)]
OTHERS = [[1] + [(3 * i + k) % 250 + 5 for i in range(n)] for k, n in enumerate([5, 50, 12, 23])]


def _engine(path: Path, **kwargs: object) -> LLMEngine:
    settings: dict = dict(model=str(path), block_size=4, num_kv_blocks=256, dtype="float32")
    settings.update(kwargs)
    return LLMEngine(EngineConfig(**settings))


def _run(engine: LLMEngine, arrivals: dict[int, list[tuple[str, list[int]]]]) -> dict[str, list[int]]:
    """Add requests at the given step indices and step until all are done; returns tokens by id."""
    results: dict[str, list[int]] = {}
    step = 0
    while arrivals or engine.has_unfinished_requests():
        for request_id, prompt in arrivals.pop(step, []):
            engine.add_request(prompt, GREEDY, request_id=request_id)
        for output in engine.step()[0]:
            if output.finished:
                results[output.request_id] = output.outputs[0].token_ids
        step += 1
    return results


@pytest.fixture(scope="module")
def gemma_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["gemma3"]


def test_greedy_output_is_batch_invariant(gemma_dir: Path) -> None:
    alone = _run(_engine(gemma_dir), {0: [("target", TARGET)]})["target"]
    assert len(alone) == 16
    others = [(f"o{i}", p) for i, p in enumerate(OTHERS)]
    mixed = _run(_engine(gemma_dir), {0: [("target", TARGET)] + others})
    assert mixed["target"] == alone
    mid_flight = _run(_engine(gemma_dir), {0: others, 3: [("target", TARGET)]})
    assert mid_flight["target"] == alone
    chunked = _run(_engine(gemma_dir, max_num_batched_tokens=5), {0: others[:2] + [("target", TARGET)]})
    assert chunked["target"] == alone
    # 24 blocks of 4 tokens cannot hold all five requests: the newest get preempted and recomputed.
    tiny_pool = _engine(gemma_dir, num_kv_blocks=24)
    preempted = _run(tiny_pool, {0: others + [("target", TARGET)]})
    assert tiny_pool.scheduler.num_preemptions > 0
    assert preempted["target"] == alone
    for request_id, prompt in others:
        assert preempted[request_id] == _run(_engine(gemma_dir), {0: [(request_id, prompt)]})[request_id]



def test_an_output_keeps_its_logprobs_while_the_request_goes_on(gemma_dir: Path) -> None:
    # A server reads an output after the engine has run more steps (the engine loop and the event loop are
    # different threads): the logprobs it carries must still be the ones of its own tokens.
    engine = _engine(gemma_dir)
    engine.add_request(TARGET, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2),
                       request_id="r")
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()[0]
    assert len(outputs) == 6
    for output in outputs:
        completion = output.outputs[0]
        assert completion.logprobs is not None and len(completion.logprobs) == len(completion.token_ids)
        assert [next(iter(position)) for position in completion.logprobs] == completion.token_ids

def test_step_trace_shows_requests_joining_and_leaving(gemma_dir: Path) -> None:
    engine = _engine(gemma_dir)
    short = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    engine.add_request(OTHERS[0], GREEDY, request_id="long")
    engine.add_request(OTHERS[2], short, request_id="short")
    for _ in range(3):
        engine.step()
    engine.add_request(OTHERS[3], GREEDY, request_id="late")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.trace is not None
    steps = list(engine.trace)
    ran = [{e.request_id: e.kind for e in s.scheduled} for s in steps]
    # "late" joins at the very next step, while "long" is mid-generation (decoding) in that step.
    assert "late" in ran[3] and ran[3].get("long") == "decode"
    # "short" leaves the batch right after its last token; "long" goes on without it.
    last_short = max(i for i, r in enumerate(ran) if "short" in r)
    assert "long" in ran[last_short + 1] and "short" not in ran[last_short + 1]
    assert steps[last_short].finished == ["short"]
    assert steps[-1].kv_blocks_used == 0 and engine.scheduler.kv_cache.num_used_blocks == 0


def test_impossible_requests_are_refused_and_nothing_else_is_disturbed(gemma_dir: Path) -> None:
    engine = _engine(gemma_dir, max_model_len=64)
    engine.add_request(TARGET, GREEDY, request_id="ok")
    with pytest.raises(ValueError, match="64"):
        engine.add_request(TARGET, SamplingParams(max_tokens=60), request_id="too-long")
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request([1, 99999], GREEDY)
    results = _run(engine, {})
    assert list(results) == ["ok"] and len(results["ok"]) == 16


def test_llm_generate_text_prompts_stop_strings_and_n(gemma_dir: Path) -> None:
    llm = LLM(str(gemma_dir), block_size=4, num_kv_blocks=256, dtype="float32")
    [free] = llm.generate("hello world", SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    text = free.outputs[0].text
    assert free.outputs[0].finish_reason == "length" and len(free.outputs[0].token_ids) == 20
    assert text == llm.tokenizer.decode(free.outputs[0].token_ids)
    stop = text[5:8]
    [stopped] = llm.generate("hello world", SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                                           stop=[stop]))
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason == stop
    assert stopped.outputs[0].text == text[: text.index(stop)]
    [sampled] = llm.generate("hello", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8))
    assert [c.index for c in sampled.outputs] == [0, 1, 2]
    [again] = llm.generate("hello", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8))
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in sampled.outputs]


def test_llm_generate_refuses_the_whole_call_when_one_prompt_cannot_fit(gemma_dir: Path) -> None:
    llm = LLM(str(gemma_dir), block_size=4, num_kv_blocks=256, max_model_len=64, dtype="float32")
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([TARGET, [1] * 80], GREEDY)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.scheduler.kv_cache.num_used_blocks == 0
    [output] = llm.generate([TARGET], GREEDY)  # the engine is still fine
    assert len(output.outputs[0].token_ids) == 16


@pytest.mark.parametrize("own_thread", [True, False])
def test_async_llm_streams_the_same_tokens_from_either_thread(tiny_model_dirs: dict[str, Path],
                                                              own_thread: bool) -> None:
    """AsyncLLM's loop in a thread of its own, or in the caller's (as `conveyor serve` runs it)."""
    import asyncio
    import threading

    from conveyor.engine.async_engine import AsyncLLM

    path = tiny_model_dirs["llama"]
    expected = _run(_engine(path), {0: [(str(i), prompt) for i, prompt in enumerate(OTHERS)]})
    llm = AsyncLLM(_engine(path), start_thread=own_thread)

    async def client() -> dict[str, list[int]]:
        async def one(request_id: str, prompt: list[int]) -> list[int]:
            tokens: list[int] = []
            async for output in llm.generate(prompt, GREEDY, request_id):
                tokens += output.delta_token_ids
            return tokens

        results = await asyncio.gather(*(one(str(i), prompt) for i, prompt in enumerate(OTHERS)))
        return dict(zip((str(i) for i in range(len(OTHERS))), results))

    got: dict[str, dict[str, list[int]]] = {}

    def run_client() -> None:
        try:
            got["tokens"] = asyncio.run(client())
        finally:
            llm.shutdown()

    if own_thread:
        run_client()
    else:
        client_thread = threading.Thread(target=run_client)
        client_thread.start()
        llm.run()  # returns once the client has shut the loop down
        client_thread.join()
    assert got["tokens"] == expected and all(len(t) == GREEDY.max_tokens for t in expected.values())
    assert not llm.is_alive
