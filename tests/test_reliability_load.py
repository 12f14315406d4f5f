"""Clients that hang up, pile up, crawl, or meet a broken engine, against a real `conveyor serve` (tiny
model): nothing abandoned keeps running, no limit gives way, and a dead engine loop ends the process."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server_utils import RunningServer, metric, running_server

pytestmark = pytest.mark.reliability

MAX_NUM_SEQS = 8


def _serve(model_dir: Path, directory: Path, *extra: str, **kwargs: Any):  # type: ignore[no-untyped-def]
    (directory / "template.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    return running_server("--model", str(model_dir), "--block-size", "4", "--num-kv-blocks", "2048",
                          "--chat-template", str(directory / "template.jinja"), "--max-model-len", "512",
                          "--max-num-seqs", str(MAX_NUM_SEQS), *extra, log_path=str(directory / "server.log"),
                          **kwargs)


@pytest.fixture(scope="module")
def server(tiny_model_dirs: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with _serve(tiny_model_dirs["gemma3"], tmp_path_factory.mktemp("load_server")) as running:
        yield running


def _request(path: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


LONG = {"max_tokens": 480, "ignore_eos": True}  # seconds of work on the tiny model: far past the checks
# Each kind of request, and where in its life the client hangs up.
HANGUPS: dict[str, tuple[bytes, str]] = {
    "before the request head is complete": (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n", "sent"),
    "after the head, mid-body": (_request("/v1/completions", {"prompt": [1, 5], **LONG})[:-10], "sent"),
    "non-streamed completion": (_request("/v1/completions", {"prompt": [1, 5], **LONG}), "running"),
    "non-streamed, n=3 over a list of prompts": (
        _request("/v1/completions", {"prompt": [[1, 5], [1, 6]], "n": 3, **LONG}), "running"),
    "non-streamed chat without max_tokens": (
        _request("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                          "ignore_eos": True}), "running"),
    "non-streamed chat, n=2": (_request("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "n": 2, **LONG}), "running"),
    "mid-stream completion, n=2 over a list of prompts": (
        _request("/v1/completions", {"prompt": [[1, 7], [1, 8]], "n": 2, "stream": True, **LONG}),
        "streaming"),
    "mid-stream chat": (_request("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "stream": True, **LONG}), "streaming"),
}


def _hang_up_after(server: RunningServer, request: bytes, until: str) -> None:
    """Send `request`, wait until it is `sent`, `running` in the engine or `streaming` its answer, then
    close the connection without a word."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        connection.sendall(request)
        if until == "streaming":
            assert connection.recv(4096).startswith(b"HTTP/1.1 200"), "no stream started"
            assert b"data:" in connection.recv(65536) or b"data:" in connection.recv(65536)
        elif until == "running":
            deadline = time.monotonic() + 20
            while metric(server.base_url, "conveyor:num_requests_running") == 0:
                assert time.monotonic() < deadline, "the request never started running"
                time.sleep(0.05)


def _assert_nothing_left(server: RunningServer) -> None:
    """One second after the last hang-up: nothing running or waiting, no KV block held, no token made."""
    time.sleep(1.0)
    assert metric(server.base_url, "conveyor:num_requests_running") == 0
    assert metric(server.base_url, "conveyor:num_requests_waiting") == 0
    assert metric(server.base_url, "conveyor:kv_cache_usage_perc") == 0
    generated = metric(server.base_url, "conveyor:generation_tokens_total")
    time.sleep(0.5)
    assert metric(server.base_url, "conveyor:generation_tokens_total") == generated, "an orphan is generating"


@pytest.mark.parametrize("kind", list(HANGUPS))
def test_a_client_that_hangs_up_leaves_nothing_running(server: RunningServer, kind: str) -> None:
    request, until = HANGUPS[kind]
    _hang_up_after(server, request, until)
    _assert_nothing_left(server)


def test_a_random_mix_of_hang_ups_beside_clients_that_stay(server: RunningServer) -> None:
    chooser = random.Random(14)
    kinds = [chooser.choice(list(HANGUPS)) for _ in range(24)]  # more than the batch's seats: some wait

    async def stays(http: httpx.AsyncClient, i: int) -> int:
        response = await http.post("/v1/completions", json={"prompt": [1, 30 + i], "max_tokens": 16,
                                                            "ignore_eos": True})
        return response.json()["usage"]["completion_tokens"]

    async def main() -> list[int]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as http:
            hang_ups = [asyncio.to_thread(_hang_up_after, server, HANGUPS[kind][0], HANGUPS[kind][1])
                        for kind in kinds]
            results = await asyncio.gather(*hang_ups, *(stays(http, i) for i in range(6)))
            return results[len(kinds):]

    assert asyncio.run(main()) == [16] * 6
    _assert_nothing_left(server)


def test_a_burst_beyond_the_queue_limit_gets_429_and_the_limit_holds(
        tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    queue_len = 8
    with _serve(tiny_model_dirs["qwen2"], tmp_path, "--max-queue-len", str(queue_len)) as limited:
        async def one(http: httpx.AsyncClient, i: int) -> int:
            body = {"prompt": [[1, 20 + i % 90]] * (1 + i % 2), "n": 1 + i % 3, "max_tokens": 24,
                    "ignore_eos": True}
            response = await http.post("/v1/completions", json=body)
            if response.status_code == 200:
                indices = [choice["index"] for choice in response.json()["choices"]]
                assert indices == list(range(len(body["prompt"]) * body["n"]))
            else:
                assert response.status_code == 429 and response.headers["retry-after"] == "1", response.text
            return response.status_code

        async def watch_waiting(stop: asyncio.Event) -> float:
            most = 0.0
            async with httpx.AsyncClient(base_url=limited.base_url, timeout=30) as http:
                while not stop.is_set():
                    text = (await http.get("/metrics")).text
                    gauge = "conveyor:num_requests_waiting{"
                    line = next(x for x in text.splitlines() if x.startswith(gauge))
                    most = max(most, float(line.rsplit(" ", 1)[1]))
                    await asyncio.sleep(0.005)
            return most

        async def main() -> tuple[list[int], float]:
            limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
            async with httpx.AsyncClient(base_url=limited.base_url, timeout=120, limits=limits) as http:
                stop = asyncio.Event()
                watcher = asyncio.ensure_future(watch_waiting(stop))
                statuses = await asyncio.gather(*(one(http, i) for i in range(200)))
                stop.set()
                return statuses, await watcher

        statuses, most_waiting = asyncio.run(asyncio.wait_for(main(), timeout=240))
        assert statuses.count(429) > 100 and statuses.count(200) > 0
        # Beyond the limit by at most one step's worth: seats freed by a step are refilled before the next.
        assert most_waiting <= queue_len + MAX_NUM_SEQS, most_waiting
        too_many = httpx.post(f"{limited.base_url}/v1/completions", json={"prompt": ["x", "y"], "n": 16,
                                                                         "max_tokens": 2})
        assert too_many.status_code == 400 and "never be admitted" in too_many.json()["error"]["message"]
        small = httpx.post(f"{limited.base_url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert small.status_code == 200


def test_slow_clients_are_cut_off_and_others_are_served_meanwhile(
        tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    with _serve(tiny_model_dirs["llama"], tmp_path, "--header-timeout", "1", "--body-timeout", "1") as slow:
        trickling = [socket.create_connection(("127.0.0.1", slow.port), timeout=10) for _ in range(20)]
        started = time.monotonic()
        head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: a\r\n" * 100
        closed = [False] * len(trickling)
        sent = 0
        while not all(closed) and time.monotonic() - started < 6:
            for i, connection in enumerate(trickling):  # a byte per connection every 0.1 s: never a full head
                if not closed[i]:
                    try:
                        connection.sendall(head[sent:sent + 1])
                    except OSError:
                        closed[i] = True
            sent += 1
            served = httpx.get(f"{slow.base_url}/v1/models", timeout=5)
            assert served.status_code == 200
            time.sleep(0.1)
        for connection in trickling:
            connection.settimeout(1)
            try:
                assert connection.recv(1) == b""
            except OSError:
                pass  # reset: closed all the same
            connection.close()
        assert time.monotonic() - started < 4, "slow-header connections were held open"

        with socket.create_connection(("127.0.0.1", slow.port), timeout=10) as stalled:
            stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
            waited = time.monotonic()
            answer = b""
            while chunk := stalled.recv(4096):  # the server closes the connection after its answer
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b'"code": 408' in answer
        assert 0.9 < time.monotonic() - waited < 3


FAULTY_LAUNCHER = """
import sys
from conveyor.cli import main
from conveyor.engine.engine import LLMEngine

original = LLMEngine.has_unfinished_requests

def broken(self):  # the first request in breaks the loop itself, outside any request's handling
    if self.scheduler.num_waiting:
        raise SystemError("injected: the engine loop broke")
    return original(self)

LLMEngine.has_unfinished_requests = broken
sys.exit(main(sys.argv[1:]))
"""


def test_a_dead_engine_loop_ends_the_process_at_once_with_an_error(
        tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    with _serve(tiny_model_dirs["qwen3"], tmp_path, launcher=("-c", FAULTY_LAUNCHER)) as doomed:
        started = time.monotonic()
        try:
            response = httpx.post(f"{doomed.base_url}/v1/completions", json={"prompt": "x", "max_tokens": 4},
                                  timeout=10)
            assert response.status_code in (500, 503) and "error" in response.json(), response.text
        except httpx.TransportError:
            pass  # the process was already gone: as good
        assert doomed.process.wait(timeout=10) == 1
        assert time.monotonic() - started < 10  # not the 30 s graceful timeout
        assert "the engine loop failed" in doomed.log()
