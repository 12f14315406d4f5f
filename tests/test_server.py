"""The real HTTP server (a `conveyor serve` process) on a tiny model, driven by the official openai client."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.server_utils import RunningServer, running_server

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPT_IDS = [1, 40, 41, 42, 43]


def _serve(tiny_dir: Path, tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    template = tmp_path / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    return running_server("--model", str(tiny_dir), "--block-size", "4", "--num-kv-blocks", "2048",
                          "--chat-template", str(template), "--max-model-len", "256", *extra,
                          log_path=str(tmp_path / "server.log"))


@pytest.fixture(scope="module")
def server(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with _serve(tiny_model_dirs["gemma3"], tmp_path_factory.mktemp("server")) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def _metric(server: RunningServer, name: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    values = [float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    return sum(values)


def test_completions_streamed_equals_non_streamed_and_usage_is_right(client: openai.OpenAI, model: str) -> None:
    args = dict(model=model, prompt="hello there", max_tokens=12, temperature=0.0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**args)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens == len("hello there") + 1
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_completions_token_ids_echo_logprobs_n_and_stop(client: openai.OpenAI, model: str) -> None:
    result = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=5, temperature=0.0, logprobs=3,
                                       echo=True, extra_body={"ignore_eos": True})
    choice = result.choices[0]
    # echo with logprobs: the prompt's tokens first (the very first unscored), then the 5 generated
    assert len(choice.logprobs.tokens) == len(PROMPT_IDS) + 5 and len(choice.logprobs.top_logprobs[1]) == 3
    assert choice.logprobs.token_logprobs[0] is None and all(lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
    offsets = choice.logprobs.text_offset
    assert offsets[:len(PROMPT_IDS) + 1] == [0, 0, 1, 2, 3, 4]  # <bos> is not echoed; "FGHI", then the output
    plain = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=5, temperature=0.0,
                                      extra_body={"ignore_eos": True})
    assert choice.text.endswith(plain.choices[0].text) and len(choice.text) > len(plain.choices[0].text)
    several = client.completions.create(model=model, prompt=["a", "b"], n=2, max_tokens=3, temperature=1.0, seed=3)
    assert sorted(c.index for c in several.choices) == [0, 1, 2, 3]
    stop = plain.choices[0].text[2:4]
    stopped = client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=5, temperature=0.0, stop=[stop],
                                        extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text


def test_chat_streamed_and_not(client: openai.OpenAI, model: str) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0.0,
                                           logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].finish_reason == "length"
    assert len(whole.choices[0].logprobs.content) == 8
    assert len(whole.choices[0].logprobs.content[0].top_logprobs) == 2
    stream = list(client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0.0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == whole.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == "length"


def test_tokenize_detokenize_models_health(server: RunningServer, model: str) -> None:
    tokens = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "hi"}).json()
    assert tokens["count"] == 3 and tokens["tokens"][0] == 1  # BOS + one byte token per character
    text = httpx.post(f"{server.base_url}/detokenize", json={"tokens": tokens["tokens"][1:]}).json()["prompt"]
    assert text == "hi"
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.get(f"{server.base_url}/v1/models").json()["data"][0]["id"] == model


def _metric_bucket(server: RunningServer, name: str, le: str) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    match = re.search(rf'^{re.escape(name)}{{[^}}]*le="{re.escape(le)}"[^}}]*}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


async def _stream_count(client: openai.AsyncOpenAI, model: str, prompt: list[int], max_tokens: int) -> int:
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
    assert usage is not None
    return usage.completion_tokens


def test_32_concurrent_streams_get_exact_counts_and_share_steps(server: RunningServer, model: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    multi_before = (_metric(server, "conveyor:step_batch_size_count")
                    - _metric_bucket(server, "conveyor:step_batch_size_bucket", "1.0"))

    async def main() -> list[int]:
        return await asyncio.gather(*(_stream_count(client, model, [1, 50 + i, 60 + i % 7], 5 + i)
                                      for i in range(32)))

    assert asyncio.run(main()) == [5 + i for i in range(32)]
    multi_after = (_metric(server, "conveyor:step_batch_size_count")
                   - _metric_bucket(server, "conveyor:step_batch_size_bucket", "1.0"))
    assert multi_after - multi_before >= 10, "the requests did not share steps"
    assert _metric_bucket(server, "conveyor:step_batch_size_bucket", "16.0") < _metric(
        server, "conveyor:step_batch_size_count"), "no step ever held more than 16 requests"


def test_cancelled_streams_are_aborted_and_the_rest_complete(server: RunningServer, model: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)

    async def cancelled(i: int) -> None:
        stream = await client.completions.create(model=model, prompt=[1, 70 + i], max_tokens=200, temperature=0.0,
                                                 stream=True, extra_body={"ignore_eos": True})
        received = 0
        async for _ in stream:
            received += 1
            if received == 3:
                break
        await stream.close()  # hang up mid-stream

    async def main() -> list[int | None]:
        tasks = [_stream_count(client, model, [1, 90 + i % 50], 4 + i % 13) if i % 10 else cancelled(i)
                 for i in range(100)]
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert [r for i, r in enumerate(results) if i % 10] == [4 + i % 13 for i in range(100) if i % 10]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (_metric(server, "conveyor:num_requests_running")
                                           or _metric(server, "conveyor:kv_cache_usage_perc")):
        time.sleep(0.2)
    assert _metric(server, "conveyor:num_requests_running") == 0
    assert _metric(server, "conveyor:kv_cache_usage_perc") == 0
    assert _metric(server, "conveyor:num_requests_waiting") == 0
    assert _metric(server, "conveyor:request_success_total") >= 100


ERROR_CASES = [
    ("too long", {"prompt": [1] * 200, "max_tokens": 100}, 400, "300"),
    ("temperature out of range", {"prompt": "x", "temperature": 5}, 400, "temperature"),
    ("wrong type", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("empty prompt", {"prompt": ""}, 400, "empty"),
    ("token id outside the vocabulary", {"prompt": [1, 10**6]}, 400, "token ids"),
    ("zero max_tokens", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("unknown model", {"prompt": "x", "model": "nope"}, 404, "nope"),
]


@pytest.mark.parametrize(("case", "body", "status", "needle"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_requests_get_clear_errors(server: RunningServer, model: str, case: str, body: dict, status: int,
                                       needle: str) -> None:
    response = httpx.post(f"{server.base_url}/v1/completions", json={"model": model, **body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["code"] == status
    assert httpx.get(f"{server.base_url}/health").status_code == 200  # nothing else disturbed


def test_malformed_json_and_oversized_bodies(server: RunningServer) -> None:
    bad = httpx.post(f"{server.base_url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "error" in bad.json()
    huge = httpx.post(f"{server.base_url}/v1/completions", content=b"x" * (5 * 1024 * 1024),
                      headers={"content-type": "application/json"})
    assert huge.status_code == 413


def test_api_key_is_required_when_set(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    with _serve(tiny_model_dirs["llama"], tmp_path, "--api-key", "sekrit") as server:
        assert httpx.get(f"{server.base_url}/v1/models").status_code == 401
        wrong = httpx.get(f"{server.base_url}/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == 401
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="sekrit")
        assert client.models.list().data


def test_bursts_beyond_the_queue_limit_get_429_and_the_server_stays_healthy(
        tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    with _serve(tiny_model_dirs["qwen2"], tmp_path, "--max-queue-len", "4", "--max-num-seqs", "4") as server:
        async def one(http: httpx.AsyncClient, i: int) -> tuple[int, int]:
            response = await http.post("/v1/completions", json={"prompt": [1, 20 + i % 90], "max_tokens": 8,
                                                                "temperature": 0, "ignore_eos": True})
            if response.status_code == 200:
                return 200, response.json()["usage"]["completion_tokens"]
            assert response.status_code == 429 and response.headers["retry-after"] == "1"
            return 429, 0

        async def main() -> list[tuple[int, int]]:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
                results = []
                for burst in range(5):  # 5 bursts of 60 requests, a pause between
                    results += await asyncio.gather(*(one(http, burst * 60 + i) for i in range(60)))
                    await asyncio.sleep(0.3)
                return results

        results = asyncio.run(asyncio.wait_for(main(), timeout=240))
        assert len(results) == 300
        assert all(tokens == 8 for status, tokens in results if status == 200)
        assert {status for status, _ in results} == {200, 429}
        assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_sigterm_lets_in_flight_requests_finish_then_exits_zero(
        tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    with _serve(tiny_model_dirs["qwen3"], tmp_path) as server:
        async def main() -> int:
            async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
                request = asyncio.ensure_future(http.post("/v1/completions", json={
                    "prompt": [1, 5], "max_tokens": 150, "temperature": 0, "ignore_eos": True}))
                await asyncio.sleep(0.5)
                server.process.send_signal(signal.SIGTERM)
                response = await request
                return json.loads(response.text)["usage"]["completion_tokens"]

        assert asyncio.run(main()) == 150
        assert server.process.wait(timeout=30) == 0


def test_repeated_prefixes_report_cached_tokens_and_reset_forgets_them(
        server: RunningServer, client: openai.OpenAI, model: str) -> None:
    system = {"role": "system", "content": "you are a careful assistant " * 3}
    args = dict(model=model, max_tokens=4, temperature=0.0, extra_body={"ignore_eos": True})
    assert httpx.post(f"{server.base_url}/reset_prefix_cache").status_code == 200  # earlier tests' prefixes
    first = client.chat.completions.create(messages=[system, {"role": "user", "content": "one"}], **args)
    again = client.chat.completions.create(messages=[system, {"role": "user", "content": "two"}], **args)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < again.usage.prompt_tokens and cached % 4 == 0  # whole blocks of 4 tokens
    chunks = list(client.chat.completions.create(messages=[system, {"role": "user", "content": "three"}],
                                                 stream=True, stream_options={"include_usage": True}, **args))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= cached  # the final streamed usage
    hits = _metric(server, "conveyor:prefix_cache_hits_total")
    assert hits >= 2 * cached and _metric(server, "conveyor:prefix_cache_queries_total") > hits
    reset = httpx.post(f"{server.base_url}/reset_prefix_cache")
    assert reset.status_code == 200 and reset.json()["num_blocks_forgotten"] > 0
    after = client.chat.completions.create(messages=[system, {"role": "user", "content": "four"}], **args)
    assert after.usage.prompt_tokens_details.cached_tokens == 0
    completion = client.completions.create(model=model, prompt=PROMPT_IDS * 4, max_tokens=2, n=2, temperature=0.0)
    # n = 2: the second sample waits one step and takes the first's full prompt blocks from the cache.
    assert completion.usage.prompt_tokens == len(PROMPT_IDS) * 4


def test_chat_benchmark_w3_against_the_server(server: RunningServer, tmp_path: Path) -> None:
    from conveyor.cli import main

    output = tmp_path / "chat.json"
    code = main(["bench", "chat", "--base-url", server.base_url, "--num-conversations", "3", "--system-words", "6",
                 "--user-words", "2", "4", "--answer-tokens", "3", "6", "--min-turns", "2", "--max-turns", "2",
                 "--conversation-rate", "5", "--think-time", "0.05", "--output", str(output)])
    report = json.loads(output.read_text())
    assert code == 0 and report["failed"] == 0 and report["num_conversations"] == 3
    assert set(report["ttft_by_turn_s"]) == {"1", "2"}
    assert report["later_turns_cached_ratio"] > 0.3  # each turn re-sends the conversation so far
