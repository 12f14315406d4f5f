"""Workloads for the simulator: a recorded trace replays to the same requests; chats share their prefixes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conveyor.bench.serve import ServeSettings
from conveyor.bench.workloads import w3_conversations
from conveyor.config import EngineConfig
from conveyor.outputs import CompletionOutput, RequestMetrics, RequestOutput
from conveyor.tune.search import summarize_run
from conveyor.tune.simulator import SimRequest, simulate
from conveyor.tune.workloads import trace_requests, trace_workload, w3_workload
from conveyor.workload_trace import TraceRecorder, read_trace


def _finished(request_id: str, prompt: list[int], num_output: int, arrival: float) -> RequestOutput:
    return RequestOutput(request_id, None, prompt, [CompletionOutput(0, "", list(range(num_output)), "length")],
                         finished=True, metrics=RequestMetrics(arrival_time=arrival))


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_a_recorded_trace_replays_to_the_same_request_set(tmp_path) -> None:
    system = list(range(500, 540))  # 40 tokens: two full blocks of 16 shared
    served = [("a", system + [1, 2, 3], 5, 0.5), ("b", list(range(900, 930)), 3, 0.75),
              ("c", system + [7] * 20, 8, 1.25), ("d", system + [7] * 20 + [9], 2, 2.0)]
    path = tmp_path / "trace.jsonl"
    recorder = TraceRecorder(path)
    started = recorder.started
    recorder.observe(None, [_finished("x", [1, 2], 1, started)][:0])  # an empty step records nothing
    for request_id, prompt, num_output, offset in served:
        running = RequestOutput(request_id, None, prompt, [CompletionOutput(0, "", [])], finished=False)
        recorder.observe(None, [running, _finished(request_id, prompt, num_output, started + offset)])
    text = path.read_text()
    assert "500" not in text and len(text.splitlines()) == 4  # lengths and indices only, never tokens
    records = read_trace(path)
    assert [(r.arrival, r.prompt_len, r.output_len) for r in records] == [
        (0.5, 43, 5), (0.75, 30, 3), (1.25, 60, 8), (2.0, 61, 2)]
    assert [(r.prefix_of, r.prefix_len) for r in records] == [(None, 0), (None, 0), (0, 32), (2, 48)]
    replayed = trace_requests(records)
    assert [(r.arrival_time, len(r.prompt_token_ids), r.output_len) for r in replayed] == [
        (0.5, 43, 5), (0.75, 30, 3), (1.25, 60, 8), (2.0, 61, 2)]
    for i, (_, prompt_i, _, _) in enumerate(served):
        for j, (_, prompt_j, _, _) in enumerate(served[:i]):
            served_blocks = _common_prefix(prompt_i, prompt_j) // 16
            assert _common_prefix(replayed[i].prompt_token_ids, replayed[j].prompt_token_ids) // 16 == served_blocks
    doubled, _ = trace_workload(records).build(2 * 3 / 1.5)
    assert [r.arrival_time for r in doubled] == pytest.approx([0.0, 0.125, 0.375, 0.75])


def test_a_malformed_trace_names_its_line(tmp_path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text(json.dumps({"arrival": 0.0, "prompt_len": 3, "output_len": 1}) + "\n" +
                    json.dumps({"arrival": 1.0, "prompt_len": 3, "output_len": 1, "prefix_of": 5, "prefix_len": 16}))
    with pytest.raises(ValueError, match="trace.jsonl:2: prefix_of 5"):
        read_trace(path)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_chat_turns_repeat_the_conversation_and_hit_the_prefix_cache(prefix_caching: bool) -> None:
    workload = w3_workload(lambda rate: w3_conversations(num_conversations=3, conversation_rate=rate,
                                                         system_words=64))
    requests, follow_up = workload.build(1.0)
    assert follow_up is not None and len(requests) == 3
    config = EngineConfig(num_kv_blocks=2048, max_model_len=8192, max_num_batched_tokens=512,
                          enable_prefix_caching=prefix_caching)
    run = simulate(config, lambda rows: 0.01 + 1e-4 * sum(r.num_new for r in rows), requests, follow_up)
    # Later turns repeat all earlier ones: most prompt tokens come from the cache, or none without it.
    assert run.cached_ratio > 0.5 if prefix_caching else run.cached_ratio == 0.0
    conversations = w3_conversations(num_conversations=3, conversation_rate=1.0, system_words=64)
    assert len(run.results) == sum(len(c.user_messages) for c in conversations)
    by_turn = {r.request.request_id.split(".")[0]: r.request for r in run.results}
    first, second = by_turn["c0t0"], by_turn["c0t1"]
    repeated = first.prompt_token_ids + (first.output_token_ids or [])
    assert second.prompt_token_ids[:len(repeated)] == repeated
    assert second.arrival_time > first.arrival_time + conversations[0].think_times[0]
    assert (first.turn, second.turn) == (1, 2)


def test_a_simulated_chat_reports_ttft_per_turn_as_the_chat_bench_does() -> None:
    workload = w3_workload(lambda rate: w3_conversations(num_conversations=4, conversation_rate=rate,
                                                         system_words=64))
    requests, follow_up = workload.build(2.0)
    config = EngineConfig(num_kv_blocks=2048, max_model_len=8192, max_num_batched_tokens=512)
    run = simulate(config, lambda rows: 0.01 + 1e-4 * sum(r.num_new for r in rows), requests, follow_up)
    summary = summarize_run(run, ServeSettings(base_url="simulated"), "W3")
    firsts = [r.ttft for r in run.results if r.request.turn == 1]
    assert len(firsts) == 4 and summary["ttft_by_turn_s"]["1"]["p50"] == pytest.approx(float(np.median(firsts)))
    later = [r.ttft for r in run.results if r.request.turn >= 2]
    assert later and summary["later_turns_ttft_s"]["mean"] == pytest.approx(float(np.mean(later)))
    # requests without turns (W2, traces) report none
    plain = simulate(config, lambda rows: 0.01, [SimRequest("0", 0.0, [5] * 40, 4)])
    assert "ttft_by_turn_s" not in summarize_run(plain, ServeSettings(base_url="simulated"), "W2")
