"""`conveyor tune` end to end on tiny random-weight models: profile, search, config file, validation against
real servers; and the server-side hooks it relies on (`serve --config`, `serve --record-trace`)."""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conveyor.cli import main
from conveyor.config import EngineConfig
from conveyor.tune import profile as profile_module
from conveyor.tune.profile import CalibrationPlan, load_or_profile, profile_key, profile_path
from conveyor.workload_trace import read_trace
from tests.server_utils import running_server

TINY_PLAN = CalibrationPlan(batch_sizes=(1, 4), context_lens=(32, 128), chunk_sizes=(16, 64), mixed_decodes=(2,),
                            turn_prefixes=(96,), turn_chunks=(16,), turn_decodes=(2,), repeats=1)
# W1 prompts in the tiny vocabulary (ids 3..379 are ordinary tokens), short enough for a quick run.
TINY_W2 = ["--num-requests", "6", "--max-input", "60", "--min-output", "4", "--max-output", "12", "--token-id-range", "3", "380",
           "--bos-id", "1"]


def test_the_profile_is_measured_once_per_model_and_setting(tiny_model_dirs, tmp_path, monkeypatch) -> None:
    config = EngineConfig(model=str(tiny_model_dirs["gemma3"]), kv_cache_memory="64MiB")
    profile, path, measured = load_or_profile(config, TINY_PLAN, tmp_path)
    assert measured and path.exists() and profile.num_steps > 20
    assert profile.cost_model.shape.num_sliding_layers == 2 and profile.cost_model.shape.sliding_window == 8
    assert min(profile.cost_model.coefficients) >= 0 and profile.held_out_error["steps"] >= 4
    assert set(profile.held_out_error) == {"mean", "p50", "p90", "max", "steps", "repeat_noise"}
    assert profile.held_out_error["repeat_noise"] > 0
    # The server's overhead, measured against a real `conveyor serve`. The tiny model's ~10 ms steps are
    # coarsely profiled, so only its sanity is checked: a positive factor of sane size, never minus.
    overhead = profile.server_overhead
    assert overhead is not None and 0.2 < overhead.step_factor < 5 and overhead.request_seconds >= 0
    assert len(overhead.details["ttft_measured"]) >= 8 and len(profile.steps) == profile.num_steps
    assert overhead.details["served_steps"] >= 8  # read from the server's step stream while it served them
    # measured several times on one server (each run with prompts of its own), the median run kept (in
    # the history as one entry); each request's time outside the engine taken directly (client TTFT minus
    # engine TTFT), not as a TTFT residual
    assert overhead.details["runs"] == profile_module.FIRST_OVERHEAD_RUNS
    assert overhead.step_factor == sorted(overhead.details["run_step_factors"])[1]
    history = profile.overhead_history
    assert len(history) == 1 and history[0]["details"] is None and history[0]["step_factor"] == overhead.step_factor
    assert 0 < overhead.request_seconds < 1 and "request_seconds_by_residual" in overhead.details
    again, again_path, measured_again = load_or_profile(config, TINY_PLAN, tmp_path)
    assert (again_path, measured_again, again.cost_model) == (path, False, profile.cost_model)
    assert again.server_overhead == overhead and again.overhead_history == history
    other = load_or_profile(dataclasses.replace(config, num_threads=1), TINY_PLAN, tmp_path, server_overhead=False)
    assert other[1] != path and other[2] and other[0].server_overhead is None
    # Every family of calibration steps ran, a chat's next turn among them: a chunk after a cached prefix
    # of 96 - 16 tokens (the turn's last block is new), beside the two rows decoding at that context.
    turns = [rows for rows, _ in profile.steps if any(n > 1 and start == 80 for start, n, _ in rows)
             and sum(n == 1 for _, n, _ in rows) == 2]
    assert turns
    # A profile fit on other features (an older conveyor) is refit from its kept steps, none measured again.
    older = json.loads(path.read_text())
    older["key"]["cost_features"] -= 1
    (tmp_path / "older").mkdir()
    profile_path(older["key"], tmp_path / "older").write_text(json.dumps(older))
    monkeypatch.setattr(profile_module, "run_profile", lambda *args: pytest.fail("measured again"))
    refit, refit_path, refit_now = load_or_profile(config, TINY_PLAN, tmp_path / "older", server_overhead=False)
    assert refit_now and refit_path.exists() and refit.key == profile.key and refit.steps == older["steps"]
    assert refit.cost_model == profile.cost_model and refit.server_overhead is None


def test_the_profile_key_names_the_precision_run_and_the_kernels(tiny_model_dirs) -> None:
    """A profile taken on one kernel or precision must not be reused for another: the steps cost differently."""
    config = EngineConfig(model=str(tiny_model_dirs["gemma3"]))
    key = profile_key(config)
    assert key["dtype"] == config.precision()[0] != "auto"
    assert profile_key(dataclasses.replace(config, dtype="float32"))["dtype"] == "float32"
    for field, value in (("attention_kernel", "torch"), ("linear_kernel", "torch"), ("elementwise_kernel", "torch"),
                         ("dtype", "float32")):
        changed = profile_key(dataclasses.replace(config, **{field: value}))
        assert changed[field] == value and (changed != key or config.precision()[0] == "float32")


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared by the tune runs below: the first measures the tiny model's profile, the others reuse it."""
    return tmp_path_factory.mktemp("profiles")


def _tune(model_dir: Path, out_dir: Path, profile_dir: Path, *extra: str) -> dict:
    status = main(["--log-level", "WARNING", "tune", "w2", "--model", str(model_dir), "--quick-profile",
                   "--profile-dir", str(profile_dir), "--output-dir", str(out_dir), *TINY_W2,
                   "--seqs-grid", "2", "8", "--tokens-grid", "32", "128", "--chunk-shares", "1", "4",
                   "--kv-sizes", "64MiB", "--prefix-caching", "on", "--refine-top", "1", "--slo-ttft", "5",
                   "--slo-itl", "2", *extra])
    assert status == 0
    return json.loads((out_dir / "tune.json").read_text())


def test_tune_searches_and_writes_a_config_that_serve_and_llm_accept(tiny_model_dirs, profile_dir, tmp_path,
                                                                     capsys) -> None:
    result = _tune(tiny_model_dirs["llama"], tmp_path / "out", profile_dir)
    printed = capsys.readouterr().out
    assert "<- the default" in printed and "conveyor serve --config" in printed
    # The grid (4 points and the default) plus the chunk-share variations of the best.
    assert len(result["candidates"]) >= 5
    assert all(c["max_rate"] > 0 for c in result["candidates"])
    config = EngineConfig.from_file(tmp_path / "out" / "tuned.json")
    assert config.model == str(tiny_model_dirs["llama"])
    assert dataclasses.asdict(config) | result["recommended"] == dataclasses.asdict(config)
    assert (tmp_path / "out" / "grid.png").exists() and (tmp_path / "out" / "pareto.png").exists()


def test_tune_validates_against_real_servers(tiny_model_dirs, profile_dir, tmp_path, capsys) -> None:
    result = _tune(tiny_model_dirs["llama"], tmp_path / "out", profile_dir, "--rate", "4",
                   "--validate", "--validate-top", "1")
    printed = capsys.readouterr().out
    assert "predicted" in printed and "measured" in printed and "ranking (SLO met, then goodput)" in printed
    rows = result["validation"]["rows"]
    assert len(rows) == 2 and all(row["measured"]["completed"] == 6 for row in rows)
    assert "SLO met" in printed and all(isinstance(row["measured_meets_slo"], bool) for row in rows)
    # the servers' own steps were read during each run, and the prediction re-made at their speed
    assert "at run speed" in printed and all(row["run_step_factor"] > 0 for row in rows)
    # and each request's TTFT inside the engine, which the client's (HTTP, hand-off, delivery) exceeds
    assert "measured TTFT inside the engine" in printed
    # and the engine loop's time between busy steps, which each step's served time now counts
    assert "between busy steps" in printed and all(row["measured"]["step_gap_s"]["p50"] >= 0 for row in rows)
    assert all(0 < row["measured"]["engine_ttft_s"]["p50"] < row["measured"]["ttft_s"]["p50"] for row in rows)
    assert result["validation"]["recommended"] == result["recommended"]
    # the overhead measured again before validating joined the profile's history, and the prediction used
    # the median of the history, not the newest measurement alone
    history = result["profile"]["overhead_history"]
    now = result["profile"]["server_overhead_now"]  # None when this command measured the profile itself
    # a new profile's, the one measured before validating, and one per validated run (two here)
    assert len(history) == 1 + (now is not None) + len(rows)
    assert [e["step_factor"] for e in history[-2:]] == [pytest.approx(row["run_step_factor"]) for row in rows]
    before = history[:-len(rows)]  # what this command's predictions were made with
    assert f"the median of {len(before)} measurements" in printed
    assert result["profile"]["server_overhead_predicted_with"]["step_factor"] == \
        pytest.approx(statistics.median(e["step_factor"] for e in before))


@pytest.mark.parametrize("margin", ["-0.1", "1"])
def test_tune_refuses_a_margin_outside_zero_to_one(tiny_model_dirs, tmp_path, margin: str) -> None:
    with pytest.raises(SystemExit, match="--slo-margin must be in"):
        main(["tune", "w2", "--model", str(tiny_model_dirs["llama"]), "--slo-margin", margin,
              "--profile-dir", str(tmp_path), "--output-dir", str(tmp_path / "out")])
    assert not any(tmp_path.iterdir())  # refused before profiling or writing anything


def test_serve_refuses_a_bad_config_file_naming_the_key(tmp_path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"max_num_seqs": 8, "max_batch": 4}))
    done = subprocess.run([sys.executable, "-m", "conveyor.cli", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "unknown key 'max_batch'" in done.stderr


def test_serve_records_a_trace_without_text(tiny_model_dirs, tmp_path) -> None:
    trace = tmp_path / "trace.jsonl"
    with running_server("--model", str(tiny_model_dirs["llama"]), "--record-trace", str(trace),
                        log_path=str(tmp_path / "server.log")) as server:
        for prompt, max_tokens in (("hello there, a shared start of a prompt!", 3),
                                   ("hello there, a shared start of a prompt? yes", 5), ("other", 2)):
            response = httpx.post(f"{server.base_url}/v1/completions", timeout=60,
                                  json={"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True})
            assert response.status_code == 200
    records = read_trace(trace)
    assert [(r.output_len, r.prefix_of) for r in records] == [(3, None), (5, 0), (2, None)]
    assert records[1].prefix_len == 32 and records[0].arrival < records[1].arrival < records[2].arrival
    assert "hello" not in trace.read_text()
