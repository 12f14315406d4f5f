"""AsyncLLM under injected faults: a request that breaks the engine fails alone, the loop goes on."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conveyor import EngineConfig, SamplingParams
from conveyor.engine.async_engine import AsyncLLM, EngineDeadError, StepFailedError
from conveyor.engine.engine import LLMEngine

pytestmark = pytest.mark.reliability

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture
def queue_seen() -> list[tuple[int, int]]:
    """(running, KV blocks used) as the loop reports them to its queue observer after adds and aborts."""
    return []


@pytest.fixture
def llm(tiny_model_dirs: dict[str, Path], queue_seen: list[tuple[int, int]]) -> Iterator[AsyncLLM]:
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dirs["llama"]), block_size=4, num_kv_blocks=256))
    running = AsyncLLM(engine, queue_observer=lambda queue: queue_seen.append(
        (queue.num_running, queue.kv_blocks_used)))
    yield running
    running.shutdown()


async def _tokens(llm: AsyncLLM, prompt: list[int], request_id: str) -> list[int]:
    tokens: list[int] = []
    async for output in llm.generate(prompt, GREEDY, request_id):
        tokens += output.delta_token_ids
    return tokens


def test_an_add_that_raises_fails_that_request_alone(llm: AsyncLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = llm.engine
    original = engine.add_request

    def add_request(prompt: list[int], params: SamplingParams, request_id: str, arrival_time: float) -> object:
        if request_id == "poison":
            raise TypeError("injected: the tokenizer choked")
        return original(prompt, params, request_id=request_id, arrival_time=arrival_time)

    monkeypatch.setattr(engine, "add_request", add_request)

    async def main() -> tuple[list[int], BaseException | None, list[int]]:
        before = await _tokens(llm, [1, 5, 6], "before")
        try:
            await _tokens(llm, [1, 7], "poison")
            failure = None
        except TypeError as error:
            failure = error
        return before, failure, await _tokens(llm, [1, 5, 6], "after")

    before, failure, after = asyncio.run(main())
    assert isinstance(failure, TypeError) and len(before) == 8 and after == before
    assert llm.is_alive and not engine.has_unfinished_requests()


def test_a_step_that_raises_fails_the_requests_in_flight_and_the_loop_goes_on(
        llm: AsyncLLM, queue_seen: list[tuple[int, int]], monkeypatch: pytest.MonkeyPatch) -> None:
    engine = llm.engine
    original = engine.step
    calls = itertools.count()

    def step() -> tuple:  # type: ignore[type-arg]
        if next(calls) == 3:
            raise RuntimeError("injected: a kernel failed")
        return original()

    monkeypatch.setattr(engine, "step", step)

    async def main() -> tuple[list[BaseException | list[int]], list[int]]:
        in_flight = await asyncio.gather(*(_tokens(llm, [1, 10 + i], f"r{i}") for i in range(3)),
                                         return_exceptions=True)
        return in_flight, await _tokens(llm, [1, 5, 6], "later")

    in_flight, later = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert all(isinstance(result, StepFailedError) for result in in_flight)
    assert (0, 0) in queue_seen  # the gauges were told at once that the failed requests are gone
    assert len(later) == 8 and llm.is_alive
    assert engine.scheduler.kv_cache.num_used_blocks == 0 and not engine.has_unfinished_requests()


def test_a_failing_loop_tells_every_stream_and_refuses_new_work(llm: AsyncLLM,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    engine = llm.engine

    def broken() -> bool:
        raise SystemError("injected: the loop itself broke")

    async def main() -> BaseException:
        stream = await llm.add_request([1, 5], GREEDY, "doomed")
        monkeypatch.setattr(engine, "has_unfinished_requests", broken)
        try:
            async for _ in stream:
                pass
        except EngineDeadError as error:
            return error
        raise AssertionError("the stream ended normally")

    error = asyncio.run(main())
    assert "injected" in str(error) and not llm.is_alive and isinstance(llm.error, SystemError)
    with pytest.raises(EngineDeadError):
        asyncio.run(_tokens(llm, [1, 5], "too late"))
    llm.abort("doomed")  # a no-op now, not an error: it runs in cleanups


def test_a_requests_arrival_is_when_it_was_sent_not_when_the_engine_took_it(llm: AsyncLLM) -> None:
    # The engine thread is busy (a 0.3 s call, as a long step would be) when the request is sent: that
    # wait is part of its TTFT, so its arrival is stamped on the caller's side.
    async def main() -> tuple[float, float, float]:
        busy = asyncio.ensure_future(llm.call(lambda engine: time.sleep(0.3)))
        await asyncio.sleep(0.05)  # the call is under way
        sent = time.monotonic()
        last = None
        async for output in llm.generate([1, 5, 6], GREEDY, "late"):
            last = output
        await busy
        assert last is not None and last.metrics is not None
        return sent, last.metrics.arrival_time, last.metrics.first_token_time

    sent, arrival, first_token = asyncio.run(main())
    assert sent <= arrival < sent + 0.05
    assert first_token - arrival >= 0.2  # the engine was busy for the rest of the 0.3 s
