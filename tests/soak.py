"""Soak test (`make soak`, not part of `make test`): mixed traffic with random disconnects against a real
`conveyor serve` on 127.0.0.1 for a bounded time, then the figures docs/reliability.md records: requests
served, outcomes by kind, server RSS at start and end, and what is left running or holding KV blocks.

    python -m tests.soak --minutes 10               # the default model
    python -m tests.soak --minutes 2 --tiny         # a tiny random-weight model (faster steps)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

from tests.server_utils import RunningServer, metric, running_server

WARM_UP_SECONDS = 30.0  # RSS "at start" is taken after this much of the same traffic: first-use growth
RSS_SAMPLE_SECONDS = 10.0
IDLE_WAIT_SECONDS = 300.0  # how long to wait, after the traffic, for the engine to be idle


def _pick_request(chooser: random.Random) -> tuple[str, str, dict[str, Any], str]:
    """(kind, path, body, how the client behaves): `finish`, `hang_up` (mid-way) or `bad` (expects 400)."""
    prompt = chooser.choice(["Tell me a story about a lighthouse.", "List some colors:", "1, 2, 3,"])
    max_tokens = chooser.choice([8, 32, 128])
    chat = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    roll = chooser.random()
    if roll < 0.25:
        return "completion", "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens}, "finish"
    if roll < 0.35:
        return "completion n=2 x 2 prompts", "/v1/completions", {
            "prompt": [prompt, "Why?"], "n": 2, "max_tokens": max_tokens}, "finish"
    if roll < 0.50:
        return "chat streamed", "/v1/chat/completions", {**chat, "stream": True}, "finish"
    if roll < 0.60:
        return "chat", "/v1/chat/completions", chat, "finish"
    if roll < 0.72:
        return "streamed, hung up mid-stream", "/v1/completions", {
            "prompt": prompt, "max_tokens": 256, "stream": True}, "hang_up"
    if roll < 0.84:
        return "non-streamed, hung up", "/v1/chat/completions", {**chat, "max_tokens": 256, "n": 2}, "hang_up"
    if roll < 0.92:
        bad = chooser.choice([{"prompt": "hi \ud800"}, {"prompt": "x", "temperature": -1},
                              {"prompt": [1, -5]}, {"prompt": "x", "n": 99}])
        return "bad input", "/v1/completions", bad, "bad"
    return "tokenize", "/tokenize", {"prompt": prompt}, "finish"


async def _one(http: httpx.AsyncClient, chooser: random.Random, outcomes: Counter[str]) -> None:
    kind, path, body, behaviour = _pick_request(chooser)
    content = json.dumps(body).encode()  # escapes lone surrogates, as a hostile client sends them
    headers = {"content-type": "application/json"}
    try:
        if behaviour == "hang_up":
            patience = chooser.uniform(0.05, 1.5)
            await asyncio.wait_for(_read_all(http, path, content, headers), timeout=patience)
            outcomes[f"{kind}: finished before the hang-up"] += 1
            return
        status = await _read_all(http, path, content, headers)
    except asyncio.TimeoutError:
        outcomes[f"{kind}: hung up"] += 1
        return
    except httpx.TimeoutException:  # the client's own 120 s patience ran out: one more hang-up
        outcomes[f"{kind}: client timed out"] += 1
        return
    except httpx.HTTPError as error:
        outcomes[f"{kind}: transport error {type(error).__name__}"] += 1
        return
    expected = 400 if behaviour == "bad" else 200
    outcomes[f"{kind}: {status}" + ("" if status in (expected, 429) else " (unexpected)")] += 1


async def _read_all(http: httpx.AsyncClient, path: str, content: bytes, headers: dict[str, str]) -> int:
    async with http.stream("POST", path, content=content, headers=headers) as response:
        async for _ in response.aiter_bytes():
            pass
        return response.status_code


async def _traffic(server: RunningServer, seconds: float, concurrency: int, outcomes: Counter[str]) -> None:
    deadline = time.monotonic() + seconds

    async def worker(seed: int) -> None:
        chooser = random.Random(seed)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as http:
            while (remaining := deadline - time.monotonic()) > 0:
                try:  # the soak ends on time: whatever is in flight then is hung up on, one more disconnect
                    await asyncio.wait_for(_one(http, chooser, outcomes), timeout=remaining)
                except asyncio.TimeoutError:
                    outcomes["in flight at the end: hung up"] += 1

    await asyncio.gather(*(worker(seed) for seed in range(concurrency)))


async def _soak(server: RunningServer, minutes: float, concurrency: int) -> dict[str, Any]:
    process = psutil.Process(server.process.pid)
    outcomes: Counter[str] = Counter()
    traffic = asyncio.ensure_future(_traffic(server, minutes * 60, concurrency, outcomes))
    await asyncio.sleep(min(WARM_UP_SECONDS, minutes * 30))
    rss_start = process.memory_info().rss
    rss_samples = [rss_start]
    while not traffic.done():
        await asyncio.wait([traffic], timeout=RSS_SAMPLE_SECONDS)
        rss_samples.append(process.memory_info().rss)
    await traffic
    stopped = time.monotonic()
    await asyncio.sleep(1.0)  # the targets: nothing running and no KV held one second after the traffic
    left_after_1s = _left(server)
    while any(_left(server).values()) and time.monotonic() - stopped < IDLE_WAIT_SECONDS:
        await asyncio.sleep(0.5)  # a step in progress finishes before the aborts it missed are handled
    seconds_until_idle = round(time.monotonic() - stopped, 1)
    rss_end = process.memory_info().rss
    served = sum(count for key, count in outcomes.items() if key.endswith(": 200"))
    return {
        "minutes": minutes, "concurrency": concurrency,
        "requests": sum(outcomes.values()), "served_200": served,
        "outcomes": dict(sorted(outcomes.items())),
        "unexpected": sum(c for k, c in outcomes.items() if "unexpected" in k or "transport error" in k),
        "rss_start_mib": round(rss_start / 2**20, 1), "rss_end_mib": round(rss_end / 2**20, 1),
        "rss_max_mib": round(max(rss_samples) / 2**20, 1),
        "rss_change_percent": round(100 * (rss_end - rss_start) / rss_start, 1),
        "left_1s_after_the_traffic": left_after_1s, "seconds_until_idle": seconds_until_idle,
        "left_at_the_end": _left(server), "server_alive": server.process.poll() is None,
    }


def _left(server: RunningServer) -> dict[str, float]:
    return {gauge: metric(server.base_url, f"conveyor:{gauge}")
            for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=24)
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny random-weight model instead of the default")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model_args: list[str] = ["--kv-cache-memory", "512MiB"]
        if args.tiny:
            from tests.tiny_models import make_tiny_model_dir

            model_args = ["--model", str(make_tiny_model_dir("gemma3", Path(scratch) / "tiny")),
                          "--max-model-len", "512", "--num-kv-blocks", "4096", "--block-size", "4"]
        with running_server(*model_args, "--max-queue-len", "64", log_path=str(Path(scratch) / "server.log"),
                            timeout=300) as server:
            figures = asyncio.run(_soak(server, args.minutes, args.concurrency))
    print(json.dumps(figures, indent=2))
    clean = (figures["unexpected"] == 0 and figures["server_alive"] and not any(figures["left_at_the_end"].values())
             and abs(figures["rss_change_percent"]) <= 5)
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
