"""The chat benchmark (W3) against any OpenAI-compatible `/v1/chat/completions` server.

Each conversation sends its turns one after another: the messages so far (system prompt, earlier user
messages and the answers as the server streamed them) plus a new user message, streamed, greedy, with
`max_tokens` = the turn's answer length and `ignore_eos`; the next turn follows after a think time (none
after the last: the run ends with its last answer). Conversations overlap. Reported: TTFT by turn
index, TPOT, ITL, E2E, the share of prompt tokens the server found in its prefix cache (from
`usage.prompt_tokens_details.cached_tokens`, where the server reports it), throughput and goodput.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx

from conveyor.bench.serve import (
    RequestResult,
    ServeSettings,
    benchmark_client,
    first_model,
    stream_request,
    summarize,
)
from conveyor.bench.workloads import Conversation


@dataclass
class TurnResult:
    conversation: int
    turn: int  # 1 = the first user message
    result: RequestResult


async def _conversation(client: httpx.AsyncClient, model: str, index: int, conversation: Conversation,
                        started: float) -> list[TurnResult]:
    await asyncio.sleep(max(0.0, conversation.start_time - (time.perf_counter() - started)))
    messages = [{"role": "system", "content": conversation.system_prompt}]
    results = []
    for turn, (message, answer_len, think) in enumerate(zip(conversation.user_messages, conversation.answer_lens,
                                                            conversation.think_times), 1):
        messages.append({"role": "user", "content": message})
        body = {"model": model, "messages": messages, "max_tokens": answer_len, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        result = await stream_request(client, "/v1/chat/completions", body,
                                      RequestResult(0, answer_len, success=False))
        result.prompt_len = result.prompt_tokens
        results.append(TurnResult(index, turn, result))
        if not result.success:
            break  # the conversation cannot go on without its answer
        messages.append({"role": "assistant", "content": result.text})
        if turn < len(conversation.user_messages):  # after the last answer nothing follows: no idle tail
            await asyncio.sleep(think)
    return results


async def run_chat_benchmark(conversations: list[Conversation], settings: ServeSettings) -> dict:
    async with benchmark_client(settings) as client:
        model = settings.model or await first_model(client)
        started = time.perf_counter()
        per_conversation = await asyncio.gather(*(_conversation(client, model, i, c, started)
                                                  for i, c in enumerate(conversations)))
        duration = time.perf_counter() - started
    turns = [t for results in per_conversation for t in results]
    summary = summarize([t.result for t in turns], duration, settings, model)
    summary["workload"] = "W3"
    summary["num_conversations"] = len(conversations)
    summary["ttft_by_turn_s"] = {
        str(turn): summarize([t.result for t in turns if t.turn == turn], duration, settings, model)["ttft_s"]
        for turn in sorted({t.turn for t in turns})}
    later = [t.result for t in turns if t.turn >= 2 and t.result.success]
    summary["later_turns_ttft_s"] = summarize(later, duration, settings, model)["ttft_s"]
    later_prompt = sum(r.prompt_tokens for r in later)
    summary["later_turns_cached_ratio"] = sum(r.cached_tokens for r in later) / later_prompt if later_prompt else 0.0
    all_prompt = sum(t.result.prompt_tokens for t in turns if t.result.success)
    summary["cached_ratio"] = (sum(t.result.cached_tokens for t in turns if t.result.success) / all_prompt
                               if all_prompt else 0.0)
    return summary


def format_chat_summary(summary: dict) -> str:
    lines = [f"W3: {summary['num_conversations']} conversations, {summary['completed']}/{summary['num_requests']} "
             f"turns completed in {summary['duration_s']:.1f} s; {summary['request_throughput']:.2f} turns/s, "
             f"output {summary['output_throughput']:.1f} tok/s, goodput {summary['goodput']:.2f} turns/s",
             f"  prompt tokens from the prefix cache: {100 * summary['cached_ratio']:.1f}% overall, "
             f"{100 * summary['later_turns_cached_ratio']:.1f}% on turns >= 2"]
    for name, key in (("TTFT", "ttft_s"), ("TTFT turns>=2", "later_turns_ttft_s"), ("TPOT", "tpot_s"),
                      ("ITL", "itl_s"), ("E2E", "e2e_s")):
        values = summary[key]
        lines.append(f"  {name:<13} p50 {values['p50'] * 1000:8.1f}  p90 {values['p90'] * 1000:8.1f}  "
                     f"p99 {values['p99'] * 1000:8.1f} ms")
    for turn, values in summary["ttft_by_turn_s"].items():
        lines.append(f"  TTFT turn {turn}: p50 {values['p50'] * 1000:8.1f}  p99 {values['p99'] * 1000:8.1f} ms")
    return "\n".join(lines)
