"""Each bench command on a tiny workload: JSON written with its figures, pictures written and non-empty."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from conveyor.bench.throughput import run_continuous, run_static
from conveyor.bench.workloads import w1_requests
from conveyor.cli import main
from conveyor.config import EngineConfig
from conveyor.engine.engine import LLMEngine
from conveyor.engine.timeline import IDLE, timeline_matrix
from tests.server_utils import running_server

TINY_WORKLOAD = ["--num-requests", "6", "--min-input", "8", "--max-input", "40", "--min-output", "4",
                 "--max-output", "12", "--token-id-range", "5", "300", "--bos-id", "1"]


def test_w1_generator_matches_the_reference_recipe() -> None:
    rng = np.random.default_rng(1234)
    in_len, out_len = int(rng.integers(32, 513)), int(rng.integers(16, 257))
    first = w1_requests(seed=1234)[0]
    assert len(first.prompt_token_ids) == in_len and first.output_len == out_len
    assert first.prompt_token_ids[0] == 2


def test_throughput_bench_writes_figures_and_pictures(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "throughput.json"
    code = main(["bench", "throughput", "--model", str(tiny_model_dirs["llama"]), *TINY_WORKLOAD,
                 "--modes", "continuous", "continuous-int8", "continuous-bf16", "static", "hf", "hf-continuous",
                 "--static-batch-sizes", "4",
                 "--hf-batch-sizes", "4",
                 "--block-size", "4", "--num-kv-blocks", "512", "--dtype", "float32", "--output", str(output),
                 "--plots-dir", str(tmp_path)])
    assert code == 0
    report = json.loads(output.read_text())
    modes = [r["mode"] for r in report["results"]]
    assert modes == ["continuous", "continuous int8", "continuous bfloat16", "static (batch 4)",
                     "transformers static (batch 4)", "transformers continuous"]
    assert report["results"][1]["settings"]["quantization"] == "int8"
    assert report["results"][2]["settings"]["dtype"] == "bfloat16"
    assert all(r["median_decode_step_seconds"] > 0 for r in report["results"][:3])
    for result in report["results"]:
        assert result["output_tokens"] == sum(r.output_len for r in w1_requests(
            seed=1234, num_requests=6, min_input=8, max_input=40, min_output=4, max_output=12, bos_id=1,
            token_ids=(5, 300)))
        assert result["wall_seconds"] > 0 and result["output_tokens_per_second"] > 0
    assert report["peak_rss_bytes"] > 0
    for picture in ("timeline_continuous.png", "timeline_continuous_int8.png", "timeline_continuous_bfloat16.png",
                    "timeline_static_4.png",
                    "cache_continuous.png", "throughput.html"):
        assert (tmp_path / picture).stat().st_size > 500, picture


def test_static_baseline_pads_and_continuous_does_not(tiny_model_dirs: dict[str, Path]) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_model_dirs["gemma3"]), block_size=4, num_kv_blocks=512))
    requests = w1_requests(seed=5, num_requests=8, min_input=4, max_input=30, min_output=2, max_output=10,
                           bos_id=1, token_ids=(5, 300))
    continuous = run_continuous(engine, requests)
    static = run_static(engine, requests, batch_size=4)
    useful = {rid: r.output_len - 1 for rid, r in zip(static.request_ids, requests)}
    static_matrix, _ = timeline_matrix(static.steps, useful)
    useful = {rid: r.output_len - 1 for rid, r in zip(continuous.request_ids, requests)}
    continuous_matrix, _ = timeline_matrix(continuous.steps, useful)
    assert (static_matrix == IDLE.code).sum() > 0 and static.padding_tokens > 0  # idle slots and pad tokens
    assert (continuous_matrix == IDLE.code).sum() == 0 and continuous.padding_tokens == 0
    assert continuous.num_steps < static.num_steps


def test_serve_and_sweep_against_a_real_server(tiny_model_dirs: dict[str, Path], tmp_path: Path) -> None:
    with running_server("--model", str(tiny_model_dirs["qwen2"]), "--block-size", "4", "--num-kv-blocks", "1024",
                        log_path=str(tmp_path / "server.log")) as server:
        output = tmp_path / "serve.json"
        assert main(["bench", "serve", "--base-url", server.base_url, *TINY_WORKLOAD, "--request-rate", "20",
                     "--burstiness", "0.5", "--dashboard-viewers", "2", "--output", str(output)]) == 0
        summary = json.loads(output.read_text())
        assert summary["completed"] == 6 and summary["failed"] == 0
        assert len(summary["dashboard_viewer_bytes"]) == 2 and min(summary["dashboard_viewer_bytes"]) > 0
        for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            assert set(summary[metric]) == {"mean", "p50", "p90", "p99"} and summary[metric]["p99"] > 0
        assert summary["output_throughput"] > 0 and summary["goodput"] >= 0
        sweep = tmp_path / "sweep.json"
        assert main(["bench", "sweep", "--base-url", server.base_url, *TINY_WORKLOAD, "--concurrencies", "1", "4",
                     "--output", str(sweep), "--plots-dir", str(tmp_path)]) == 0
        points = json.loads(sweep.read_text())["points"]
        assert [p["x"] for p in points] == [1, 4] and all(p["completed"] == 6 for p in points)
        assert (tmp_path / "sweep.png").stat().st_size > 500


def test_serve_bench_says_clearly_when_the_server_lists_no_model(tmp_path: Path) -> None:
    """A server that is still loading (llama.cpp answers 503 then) or is not OpenAI-compatible."""
    class Loading(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            body = b'{"error": {"message": "Loading model", "code": 503}}'
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Loading)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(SystemExit, match="lists no model .*HTTP 503.*Loading model"):
            main(["bench", "serve", "--base-url", url, *TINY_WORKLOAD, "--output", str(tmp_path / "x.json")])
        assert not (tmp_path / "x.json").exists()
    finally:
        server.shutdown()


def test_chat_bench_ends_with_the_last_answer_not_a_think_time_later() -> None:
    """A think time after a conversation's last answer is idle time, not the workload: the run's duration
    (so its throughput) must not include it."""
    import asyncio

    from conveyor.bench.chat import run_chat_benchmark
    from conveyor.bench.serve import ServeSettings
    from conveyor.bench.workloads import Conversation

    class Chat(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            chunks = [{"choices": [{"delta": {"content": word}}]} for word in ("a", "b")]
            chunks.append({"choices": [], "usage": {"completion_tokens": 2, "prompt_tokens": 5}})
            body = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Chat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        conversation = Conversation(system_prompt_index=0, system_prompt="s", user_messages=["hi", "and?"],
                                    answer_lens=[2, 2], start_time=0.0, think_times=[0.2, 30.0])
        settings = ServeSettings(base_url=f"http://127.0.0.1:{server.server_address[1]}", model="m")
        summary = asyncio.run(run_chat_benchmark([conversation], settings))
    finally:
        server.shutdown()
    assert summary["completed"] == 2 and 0.2 <= summary["duration_s"] < 5.0
