"""`conveyor serve --ray` as a user starts it: a local Ray instance in Serve's throughput mode, the ingress
replica serving the port itself (no Serve proxy in the token path), the same API, and a clean stop. Its own
module: it starts its own Ray instance, after test_ray_serve's has gone."""

from __future__ import annotations

import os
from pathlib import Path

import openai
import psutil
import pytest

from tests.server_utils import running_server

pytest.importorskip("ray.serve")


def test_conveyor_serve_ray_serves_from_the_ingress_replica(tiny_model_dirs: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_CONTROL_LOOP_INTERVAL_S"):
        monkeypatch.delenv(name, raising=False)
    # Ray's workers inherit the server's environment: they import conveyor from this checkout.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                                   os.environ.get("PYTHONPATH")])))
    with running_server("--ray", "--num-replicas", "1", "--num-threads", "1", "--model", str(tiny_model_dirs["gemma3"]),
                        "--block-size", "4", "--num-kv-blocks", "256", "--max-model-len", "256",
                        timeout=180, log_path=str(tmp_path / "server.log")) as server:
        listeners = [c.pid for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port]
        assert listeners, "nothing listens on the port"
        holder = " ".join(psutil.Process(listeners[0]).cmdline())
        assert "ConveyorIngress" in holder, f"the port is served by {holder!r}, not the ingress replica"
        controller = next(p for p in psutil.process_iter(["cmdline"]) if "ServeController" in " ".join(p.info["cmdline"] or []))
        settings = controller.environ()  # what the local instance's processes inherited from the CLI
        assert (settings["RAY_SERVE_THROUGHPUT_OPTIMIZED"], settings["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"]) == ("1", "0.5")
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", timeout=60)
        model = client.models.list().data[0].id
        completion = client.completions.create(model=model, prompt="hello there", max_tokens=8, temperature=0.0,
                                               extra_body={"ignore_eos": True})
        assert completion.usage.completion_tokens == 8 and completion.choices[0].finish_reason == "length"
        streamed = client.completions.create(model=model, prompt="hello there", max_tokens=8, temperature=0.0,
                                             stream=True, extra_body={"ignore_eos": True})
        assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == completion.choices[0].text
        process = server.process
    assert process.returncode == 0, server.log()
