"""conveyor on Ray Serve (conveyor.distributed): the same API from an ingress over two engine replicas of
the tiny model, prefix-aware routing, and a replica killed mid-stream. A local Ray instance is started
here and shut down after; the module takes well under a minute and a half."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from conveyor.engine.kv_cache import KVCacheManager, prefix_block_hashes
from conveyor.engine.request import Request
from conveyor.sampling_params import SamplingParams
from tests.server_utils import free_port
from tests.test_server import CHAT_TEMPLATE

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

BLOCK_SIZE = 4


def test_router_hashes_are_the_engines_own() -> None:
    tokens = list(range(5, 43))  # 38 tokens: 9 full blocks and a partial one
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE, enable_prefix_caching=True)
    request = Request("r", tokens, SamplingParams(max_tokens=1))
    assert prefix_block_hashes(tokens, BLOCK_SIZE) == manager.block_hashes(request, len(tokens) // BLOCK_SIZE)
    assert prefix_block_hashes(tokens[:3], BLOCK_SIZE) == []


def test_build_app_rejects_bad_settings() -> None:
    from conveyor.config import EngineConfig
    from conveyor.distributed.app import build_app

    with pytest.raises(ValueError, match="num_replicas"):
        build_app(EngineConfig(), num_replicas=0)
    with pytest.raises(ValueError, match="router must be one of"):
        build_app(EngineConfig(), router="round-robin")


def test_the_example_serve_config_builds() -> None:
    import yaml

    from conveyor.distributed.app import app_builder

    example = Path(__file__).resolve().parents[1] / "docs" / "examples" / "serve_config.yaml"
    application = yaml.safe_load(example.read_text())["applications"][0]
    assert application["import_path"] == "conveyor.distributed.app:app_builder"
    engines = app_builder(application["args"])._bound_deployment.init_args[0]  # the ingress's engine handle
    assert engines._bound_deployment.num_replicas == 2
    assert engines._bound_deployment._deployment_config.max_ongoing_requests == 64 + 64 + 4  # seats, queue, streams


@pytest.fixture(scope="module")
def base_url(tiny_model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from conveyor.config import EngineConfig
    from conveyor.distributed.app import build_app

    template = tmp_path_factory.mktemp("ray") / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    config = EngineConfig(model=str(tiny_model_dirs["gemma3"]), block_size=BLOCK_SIZE, num_kv_blocks=1024,
                          max_model_len=512, chat_template=str(template), num_threads=1)
    port = free_port()
    # The workers import conveyor from this checkout, as the test process does.
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [
                 str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config, num_replicas=2, routing_stats_period_s=0.3, health_check_period_s=1.0),
                  name="conveyor", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        _wait_for(lambda: httpx.get(f"{url}/health").json()["replicas"] == 2, 30, "two replicas")
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _wait_for(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.2)


def test_same_api_as_conveyor_serve(base_url: str) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", timeout=60)
    model = client.models.list().data[0].id
    args = dict(model=model, prompt="hello there", max_tokens=12, temperature=0.0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**args)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 12
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12
    # Outputs reach the ingress trimmed to each step's news and are rebuilt there: logprobs, echoed prompt
    # logprobs and stop strings come out whole.
    scored = client.completions.create(**args, logprobs=2, echo=True)
    assert len(scored.choices[0].logprobs.tokens) == scored.usage.prompt_tokens + 12
    assert scored.choices[0].text.endswith(whole.choices[0].text)
    streamed = [c for c in client.completions.create(**args, logprobs=2, stream=True) if c.choices]
    assert sum(len(c.choices[0].logprobs.tokens) for c in streamed) == 12
    sampled = {**args, "max_tokens": 40, "temperature": 1.0, "seed": 5}  # greedy, the tiny model says only <pad>
    text = client.completions.create(**sampled).choices[0].text
    stop = text[len(text) // 2]
    stopped = client.completions.create(**sampled, stop=[stop])
    assert stopped.choices[0].text == text[:text.find(stop)] and stopped.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          n=2, temperature=1.0, seed=3)
    assert len(chat.choices) == 2 and chat.usage.completion_tokens == 10
    with pytest.raises(openai.BadRequestError, match="max_model_len"):  # the engine's word, through a replica
        client.completions.create(model=model, prompt="hi", max_tokens=5000)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=1)
    assert httpx.post(f"{base_url}/v1/completions", content=b"{not json").status_code == 400
    paths = set(httpx.get(f"{base_url}/openapi.json").json()["paths"])
    assert paths == {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
                     "/reset_prefix_cache", "/tokenize", "/detokenize", "/v1/engine/config",
                     "/v1/engine/steps"}  # conveyor serve's


def test_health_and_metrics_per_replica(base_url: str) -> None:
    health = httpx.get(f"{base_url}/health").json()
    assert health["status"] == "ok" and health["replicas"] == 2 and len(health["replica"]) == 2
    httpx.post(f"{base_url}/v1/completions", json={"prompt": "metrics", "max_tokens": 2}, timeout=60)
    time.sleep(1.0)  # a report or two
    text = httpx.get(f"{base_url}/metrics").text
    assert "conveyor:replicas 2.0" in text
    for replica in health["replica"]:
        assert f'replica="{replica}"' in text


def test_the_dashboard_shows_each_replica_its_own_steps(base_url: str) -> None:
    config = httpx.get(f"{base_url}/v1/engine/config").json()
    replicas = config["replicas"]
    assert sorted(replicas) == sorted(httpx.get(f"{base_url}/health").json()["replica"])
    assert config["engine"]["max_num_seqs"] == 64 and config["engine"]["num_threads"] == 1  # one replica's
    assert "replica" in httpx.get(f"{base_url}/dashboard").text
    missing = httpx.get(f"{base_url}/v1/engine/steps", params={"replica": "nope"})
    assert missing.status_code == 404 and "no live replica" in missing.json()["error"]["message"]

    async def watch(http: httpx.AsyncClient, replica: str, finished: set[str]) -> None:
        async with http.stream("GET", "/v1/engine/steps", params={"replica": replica}) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    finished.update(r.rsplit("-", 2)[0] for r in json.loads(line[len("data: "):])["finished"])

    async def main() -> tuple[dict[str, set[str]], list[str]]:
        finished: dict[str, set[str]] = {replica: set() for replica in replicas}
        async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
            watchers = [asyncio.create_task(watch(http, r, finished[r])) for r in replicas]
            await asyncio.sleep(1.0)  # both streams polling: their replicas record steps from now on
            sent: list[str] = []
            for _ in range(4):  # distinct prompts: spread by load, so both replicas get some
                responses = await asyncio.gather(*(http.post("/v1/completions", json={
                    "prompt": [300 + len(sent) + i] * 9, "max_tokens": 6, "ignore_eos": True}) for i in range(6)))
                sent += [r.json()["id"] for r in responses]
                if all(finished.values()):
                    break
            await asyncio.sleep(1.0)  # the last steps reach the viewers
            for watcher in watchers:
                assert not watcher.done(), watcher  # a stream that ended early (or failed) would show here
                watcher.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
        await asyncio.sleep(2 * STEP_IDLE_PING_S)  # the replicas' streams notice the viewers left, and end
        return finished, sent

    from conveyor.distributed.replica import STEP_IDLE_PING_S

    finished, sent = asyncio.run(main())
    first, second = finished.values()
    assert first and second and not first & second, finished  # each replica shows its own requests only
    assert first | second == set(sent)


def _complete(base_url: str, prompt: list[int], max_tokens: int = 8) -> dict:
    response = httpx.post(f"{base_url}/v1/completions", timeout=60, json={
        "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True})
    assert response.status_code == 200, response.text
    return response.json()


def test_prefix_aware_routing_keeps_each_conversation_on_its_cache(base_url: str) -> None:
    """Six conversations of three turns, each turn its predecessor's prompt plus more: with random routing
    half the later turns would land on a replica that never saw the conversation."""
    httpx.post(f"{base_url}/reset_prefix_cache")
    conversations = [[100 + 7 * c + i % 5 for i in range(40)] for c in range(6)]
    previous_len = [0] * len(conversations)
    for turn in range(3):
        # A turn of every conversation at once: the first turns, matching nothing, are spread by load.
        with ThreadPoolExecutor(len(conversations)) as pool:
            usages = list(pool.map(lambda prompt: _complete(base_url, prompt)["usage"], conversations))
        for index, (prompt, usage) in enumerate(zip(conversations, usages)):
            # Everything before the previous turn's last partial block was cached on its replica.
            cached = usage["prompt_tokens_details"]["cached_tokens"]
            assert cached >= previous_len[index] - BLOCK_SIZE, (turn, index, cached)
            previous_len[index] = len(prompt)
            conversations[index] = prompt + [200 + turn + index] * 12
    assert sum(h["cached_blocks"] > 0 for h in httpx.get(f"{base_url}/health").json()["replica"].values()) == 2


@pytest.mark.slow  # waits for Serve to start a replacement replica
@pytest.mark.parametrize("process", ["pid", "engine_pid"])  # the replica actor, or its engine process
def test_a_killed_replica_is_replaced_and_the_others_keep_serving(base_url: str, process: str) -> None:
    httpx.post(f"{base_url}/reset_prefix_cache")
    prompt = [150 + i % 7 for i in range(40)]
    primed = time.time()
    _complete(base_url, prompt, max_tokens=1)  # caches the prompt on one replica: the stream below follows it

    def reported_since_primed() -> bool:  # a replacement replica reports None until its first report
        return all((h["reported_at"] or 0) > primed + 0.1 for h in httpx.get(f"{base_url}/health").json()["replica"].values())

    _wait_for(reported_since_primed, 10, "reports made after the prompt was cached")
    before = httpx.get(f"{base_url}/health").json()["replica"]
    holders = [replica for replica, h in before.items() if h["cached_blocks"]]
    assert len(holders) == 1, before
    victim = holders[0]
    events = []
    body = {"prompt": prompt + [9], "max_tokens": 460, "temperature": 0.0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        events.append(next(line for line in lines if line.startswith("data:")))
        os.kill(before[victim][process], signal.SIGKILL)
        events += [line for line in lines if line.startswith("data:")]
    assert events[-1] == "data: [DONE]", events[-3:]
    error = json.loads(events[-2][len("data: "):]).get("error")
    assert error is not None and error["code"] == 503 and "died" in error["message"], (len(events), events[-3:])
    # Requests sent now are served (one routed to the dead replica before the router learns is sent again).
    for index in range(4):
        assert _complete(base_url, [60 + index] * 10, max_tokens=4)["usage"]["completion_tokens"] == 4
    _wait_for(lambda: (lambda h: h["replicas"] == 2 and victim not in h["replica"])(
        httpx.get(f"{base_url}/health").json()), 60, "the dead replica's replacement")
    assert httpx.get(f"{base_url}/health").json()["status"] == "ok"


def test_cli_refuses_bad_ray_flags() -> None:
    from conveyor.cli import main

    with pytest.raises(SystemExit, match="--num-replicas must be at least 1"):
        main(["serve", "--ray", "--num-replicas", "0"])
    with pytest.raises(SystemExit, match="--record-trace is not available with --ray"):
        main(["serve", "--ray", "--record-trace", "trace.jsonl"])


def _hold_in_time_wait(port: int) -> None:
    """Leave a connection of a server on `port` in TIME_WAIT, as a server restarted on its port finds it."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen()
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = listener.accept()
    accepted.close()  # the server's side closes first, so its side waits
    time.sleep(0.05)
    client.close()
    listener.close()
    time.sleep(0.05)


def test_serve_ray_runs_serves_throughput_mode_with_the_ingress_on_the_port(monkeypatch: pytest.MonkeyPatch) -> None:
    from conveyor.distributed.cli import THROUGHPUT_ENV, _direct_ingress

    def clear() -> None:
        for name in (THROUGHPUT_ENV, "RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT",
                     "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"):
            monkeypatch.delenv(name, raising=False)

    clear()
    port = free_port()
    proxy_port = _direct_ingress("127.0.0.1", port)  # the default
    assert proxy_port not in (None, port) and os.environ[THROUGHPUT_ENV] == "1"
    assert (os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) \
        == (str(port), str(port + 1))  # the one port the ingress replica may take
    assert os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "1"  # no load balancer to wait for
    clear()
    monkeypatch.setenv(THROUGHPUT_ENV, "0")  # turned off: Serve's defaults, its proxy on the port
    assert _direct_ingress("127.0.0.1", port) is None and "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT" not in os.environ
    # A port left in TIME_WAIT: Serve's ingress replica could not bind it (no SO_REUSEADDR), its proxy can.
    clear()
    monkeypatch.setenv(THROUGHPUT_ENV, "1")
    _hold_in_time_wait(port)
    assert _direct_ingress("127.0.0.1", port) is None
    assert os.environ[THROUGHPUT_ENV] == "0" and "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT" not in os.environ
