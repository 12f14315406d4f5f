"""EngineProcess: the engine loop in a child process (its main thread) behind AsyncLLM's interface, on the
tiny model: the same tokens as AsyncLLM, the engine's errors across the pipe, aborts, and a child that dies
mid-request (requests fail with EngineDeadError, `is_alive` turns false, the host is told)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pickle
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from conveyor import EngineConfig, SamplingParams
from conveyor.engine.async_engine import AsyncLLM, EngineDeadError
from conveyor.engine.engine import LLMEngine
from conveyor.engine.engine_process import EngineProcess
from conveyor.outputs import CompletionOutput, OutputRebuilder, OutputTrimmer, RequestOutput

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = [[1, 5, 6, 7], [1, 9, 9, 2, 3, 4, 8], [1, 30, 31]]


def _config(path: Path) -> EngineConfig:
    return EngineConfig(model=str(path), block_size=4, num_kv_blocks=256, max_model_len=128, num_threads=1)


# Run in the child (pickled by reference: the child imports this module).
def _on_main_thread(engine: LLMEngine) -> tuple[bool, int]:
    return threading.current_thread() is threading.main_thread(), os.getpid()


def _raise(engine: LLMEngine) -> None:
    raise KeyError("injected")


@pytest.fixture
def exits() -> list[float]:
    return []


@pytest.fixture
def process(tiny_model_dirs: dict[str, Path], exits: list[float]) -> Iterator[EngineProcess]:
    engine_process = EngineProcess(_config(tiny_model_dirs["llama"]), on_exit=lambda: exits.append(time.time()))
    yield engine_process
    engine_process.shutdown()


async def _tokens(llm: EngineProcess | AsyncLLM, prompt: list[int], request_id: str,
                  params: SamplingParams = GREEDY) -> list[int]:
    tokens: list[int] = []
    async for output in llm.generate(prompt, params, request_id):
        tokens += output.delta_token_ids
    return tokens


def test_same_tokens_as_async_llm_from_the_childs_main_thread(process: EngineProcess,
                                                             tiny_model_dirs: dict[str, Path]) -> None:
    local = AsyncLLM(LLMEngine(_config(tiny_model_dirs["llama"])))

    async def main() -> tuple[list[list[int]], list[list[int]], tuple[bool, int]]:
        remote = await asyncio.gather(*(_tokens(process, p, str(i)) for i, p in enumerate(PROMPTS)))
        here = await asyncio.gather(*(_tokens(local, p, str(i)) for i, p in enumerate(PROMPTS)))
        return remote, here, await process.call(_on_main_thread)

    try:
        remote, here, (main_thread, pid) = asyncio.run(main())
    finally:
        local.shutdown()
    assert remote == here and all(len(tokens) == 12 for tokens in remote)
    assert main_thread and pid == process.pid != os.getpid()
    assert process.is_alive


async def _outputs(llm: EngineProcess | AsyncLLM, prompt: list[int], request_id: str,
                   params: SamplingParams) -> list[RequestOutput]:
    return [output async for output in llm.generate(prompt, params, request_id)]


def _comparable(output: RequestOutput) -> RequestOutput:
    return dataclasses.replace(output, metrics=None)  # times differ from one run to the other


def test_whole_outputs_cross_the_pipe_trimmed(process: EngineProcess, tiny_model_dirs: dict[str, Path]) -> None:
    """The pipe carries each step's news only (`OutputTrimmer`); the host rebuilds every output as the
    engine made it: text, token ids, logprobs, prompt logprobs, stop reasons, one step after another."""
    local = AsyncLLM(LLMEngine(_config(tiny_model_dirs["llama"])))
    cases = [(PROMPTS[0], GREEDY),
             (PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2,
                                         prompt_logprobs=1)),
             (PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=0))]

    async def main() -> tuple[list[list[RequestOutput]], list[list[RequestOutput]]]:
        remote = await asyncio.gather(*(_outputs(process, p, str(i), params) for i, (p, params) in enumerate(cases)))
        here = await asyncio.gather(*(_outputs(local, p, str(i), params) for i, (p, params) in enumerate(cases)))
        return remote, here

    try:
        remote, here = asyncio.run(main())
    finally:
        local.shutdown()
    assert [[_comparable(o) for o in outputs] for outputs in remote] == [
        [_comparable(o) for o in outputs] for outputs in here]
    with_logprobs = remote[1][-1]
    assert len(with_logprobs.outputs[0].logprobs or []) == 10 and len(with_logprobs.prompt_logprobs or []) == 7
    assert remote[0][-1].outputs[0].logprobs is None and remote[0][-1].prompt_logprobs is None


def test_a_trimmed_output_carries_only_the_steps_news() -> None:
    prompt = list(range(1000, 1300))
    trimmer, rebuilder = OutputTrimmer(), OutputRebuilder()
    whole = [RequestOutput("r", None, prompt, [CompletionOutput(0, "ab" * n, list(range(n)))], False,
                           delta_text="ab", delta_token_ids=[n - 1]) for n in range(1, 200)]
    trimmed = [trimmer.trim(output) for output in whole]
    assert trimmed[0].prompt_token_ids == prompt and all(not t.prompt_token_ids for t in trimmed[1:])
    assert all(not t.outputs[0].token_ids and not t.outputs[0].text for t in trimmed)
    assert len(pickle.dumps(trimmed[-1])) == len(pickle.dumps(trimmed[1])) < len(pickle.dumps(whole[-1])) / 5
    assert [rebuilder.rebuild(t) for t in trimmed] == whole


def test_a_sink_takes_each_steps_outputs_at_once_and_the_stream_only_the_last(process: EngineProcess) -> None:
    """What a Serve replica streams to the ingress: one batch a step for all the requests sharing a sink."""
    async def drain(outputs: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
        return [output async for output in outputs]

    async def main() -> tuple[list[list[RequestOutput]], list[list[RequestOutput]], list[list[int]]]:
        batches: list[list[RequestOutput]] = []
        added = [await process.add_request(p, GREEDY, f"s{i}", sink=batches.append) for i, p in enumerate(PROMPTS)]
        own = await asyncio.gather(*(drain(outputs) for outputs in added))
        alone = await asyncio.gather(*(_tokens(process, p, f"alone{i}") for i, p in enumerate(PROMPTS)))
        return batches, own, alone

    batches, own, alone = asyncio.run(main())
    assert all(len(outputs) == 1 and outputs[0].finished for outputs in own)  # the stream: only the last
    by_request: dict[str, list[int]] = {}
    for batch in batches:
        assert len({output.request_id for output in batch}) == len(batch)  # one step's: one output a request
        for output in batch:
            by_request.setdefault(output.request_id, []).extend(output.delta_token_ids)
    assert [by_request[f"s{i}"] for i in range(len(PROMPTS))] == alone  # every token, in order, via the sink
    assert max(len(batch) for batch in batches) == len(PROMPTS)  # decode steps shared by all three
    assert len(batches) < sum(len(tokens) for tokens in alone)


def test_errors_cross_the_pipe_and_the_engine_goes_on(process: EngineProcess) -> None:
    async def main() -> list[int]:
        with pytest.raises(ValueError, match="max_model_len"):  # the engine's own check, as a ValueError
            await process.add_request([1, 2], SamplingParams(max_tokens=500), "too-long")
        with pytest.raises(KeyError, match="injected"):
            await process.call(_raise)
        with pytest.raises((AttributeError, pickle.PicklingError)):  # plain pickle takes no lambda: said here
            await process.call(lambda engine: engine.queue_stats())
        return await _tokens(process, PROMPTS[0], "after")

    assert len(asyncio.run(main())) == 12


def test_an_abandoned_stream_aborts_its_request(process: EngineProcess) -> None:
    async def main() -> tuple[int, int]:
        long = SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True)
        outputs = await process.add_request(PROMPTS[1], long, "abandoned")
        async for _ in outputs:
            break
        await outputs.aclose()  # the client went away
        await asyncio.sleep(0.2)
        running = (await process.call(LLMEngine.queue_stats)).num_running
        return running, len(await _tokens(process, PROMPTS[0], "next"))

    assert asyncio.run(main()) == (0, 12)


def test_a_child_that_dies_fails_its_requests_and_says_so(process: EngineProcess, exits: list[float]) -> None:
    async def main() -> BaseException | None:
        long = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)
        outputs = await process.add_request(PROMPTS[2], long, "doomed")
        try:
            async for _ in outputs:
                os.kill(process.pid, signal.SIGKILL)
        except EngineDeadError as error:
            return error
        return None

    error = asyncio.run(main())
    assert error is not None and "died" in str(error)
    deadline = time.monotonic() + 5
    while not exits and time.monotonic() < deadline:  # told from the reader thread, after the requests
        time.sleep(0.05)
    assert not process.is_alive and len(exits) == 1
    with pytest.raises(EngineDeadError):
        asyncio.run(process.add_request(PROMPTS[0], GREEDY, "late"))


def test_the_child_exits_when_its_host_closes_the_pipe(process: EngineProcess) -> None:
    process._closed = True  # as if the host were gone: nothing to stop, nobody to tell
    # What the host's death does to the pipe (closing our end would not: the reader thread holds it open).
    socket.socket(fileno=os.dup(process._conn.fileno())).shutdown(socket.SHUT_RDWR)
    assert process.process.wait(timeout=10) == 0


def test_a_child_that_cannot_build_its_engine_raises_in_the_host(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="nowhere"):
        EngineProcess(EngineConfig(model=str(tmp_path / "nowhere"), num_threads=1))
