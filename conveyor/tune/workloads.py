"""The benchmark workloads as the simulator's requests: W2 (W1's requests at a request rate), W3 (chats
whose turns repeat the conversation so far) and a trace recorded by `conveyor serve --record-trace`.

Each is a `SimWorkload`: given a load level (W2 and traces: requests/s; W3: new conversations/s) it
returns the initial requests and, for chats, the follow-up rule that sends a turn after the previous
answer and a think time. Token ids are synthesized deterministically, sharing exactly the prefixes the
real traffic shares, so the real prefix cache hits where the server's would.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from conveyor.bench.serve import arrival_delays
from conveyor.bench.workloads import BenchRequest, Conversation
from conveyor.tune.simulator import FollowUp, SimRequest, SimResult
from conveyor.workload_trace import TraceRecord

Encode = Callable[[str], list[int]]
TURN_TEMPLATE_TOKENS = 6  # a chat template's tokens around each message (Gemma's: start/end of turn, role)
_TOKEN_RANGE = (1000, 200000)  # synthesized ids, as W1's prompts use


def word_tokens(text: str) -> list[int]:
    """A stand-in tokenizer when none is loaded: one deterministic id per word."""
    return [_TOKEN_RANGE[0] + hash(word) % (_TOKEN_RANGE[1] - _TOKEN_RANGE[0]) for word in text.split()]


@dataclass
class SimWorkload:
    """One workload at any load: `build(rate)` gives its initial requests and follow-up rule."""

    name: str
    build: Callable[[float], tuple[list[SimRequest], FollowUp | None]]
    rate_unit: str  # what `rate` counts: "req/s" or "conv/s"


def w2_workload(requests: list[BenchRequest], burstiness: float, seed: int) -> SimWorkload:
    """W2 as `conveyor bench serve` sends it: request i goes out after the first i arrival gaps."""

    def build(rate: float) -> tuple[list[SimRequest], FollowUp | None]:
        gaps = arrival_delays(len(requests), rate, burstiness, seed)
        arrivals = np.concatenate([[0.0], np.cumsum(gaps)[:-1]]) if requests else []
        return [SimRequest(str(i), float(t), list(r.prompt_token_ids), r.output_len)
                for i, (r, t) in enumerate(zip(requests, arrivals))], None

    return SimWorkload("W2", build, "req/s")


def w3_workload(make_conversations: Callable[[float], list[Conversation]], encode: Encode = word_tokens,
                seed: int = 0) -> SimWorkload:
    """W3 as `conveyor bench chat` sends it: turn k's prompt is the system prompt, the earlier messages and
    answers, and the new message; the next turn leaves `think_times[k]` after the answer ends."""

    def build(rate: float) -> tuple[list[SimRequest], FollowUp | None]:
        conversations = make_conversations(rate)
        rng = np.random.default_rng(seed)
        template = [int(t) for t in rng.integers(*_TOKEN_RANGE, size=TURN_TEMPLATE_TOKENS)]
        system = {c.system_prompt_index: template + encode(c.system_prompt) for c in conversations}
        answers = [[[int(t) for t in rng.integers(*_TOKEN_RANGE, size=n)] for n in c.answer_lens]
                   for c in conversations]
        ids = itertools.count()
        request_conversation: dict[str, int] = {}  # request id -> conversation (its turn is on the request)

        def turn(index: int, number: int, history: list[int], arrival: float) -> SimRequest:
            conversation = conversations[index]
            prompt = history + template + encode(conversation.user_messages[number])
            request = SimRequest(f"c{index}t{number}.{next(ids)}", arrival, prompt,
                                 conversation.answer_lens[number], answers[index][number], turn=number + 1)
            request_conversation[request.request_id] = index
            return request

        def follow_up(result: SimResult, clock: float) -> list[SimRequest]:
            index, number = request_conversation[result.request.request_id], (result.request.turn or 1) - 1
            conversation = conversations[index]
            if number + 1 >= len(conversation.user_messages):
                return []
            history = result.request.prompt_token_ids + answers[index][number]
            return [turn(index, number + 1, history, clock + conversation.think_times[number])]

        first_turns = [turn(i, 0, system[c.system_prompt_index], c.start_time) for i, c in enumerate(conversations)]
        return first_turns, follow_up

    return SimWorkload("W3", build, "conv/s")


def trace_requests(records: list[TraceRecord], seed: int = 0) -> list[SimRequest]:
    """A recorded trace as it was: each prompt starts with its `prefix_len` tokens shared with record
    `prefix_of`, the rest fresh ids."""
    rng = np.random.default_rng(seed)
    prompts: list[list[int]] = []
    for record in records:
        shared = prompts[record.prefix_of][:record.prefix_len] if record.prefix_of is not None else []
        fresh = rng.integers(*_TOKEN_RANGE, size=record.prompt_len - len(shared))
        prompts.append(shared + [int(t) for t in fresh])
    return [SimRequest(str(i), r.arrival, prompt, r.output_len)
            for i, (r, prompt) in enumerate(zip(records, prompts))]


def recorded_rate(records: list[TraceRecord]) -> float:
    """The trace's own mean request rate (requests/s)."""
    arrivals = [r.arrival for r in records]
    span = max(arrivals) - min(arrivals) if arrivals else 0.0
    return (len(arrivals) - 1) / span if span > 0 else float("inf")


def trace_workload(records: list[TraceRecord], seed: int = 0) -> SimWorkload:
    """The trace at `rate` requests/s: its arrival gaps scaled so that its mean rate is `rate`."""
    requests = trace_requests(records, seed)
    own_rate = recorded_rate(records)
    first = min((r.arrival_time for r in requests), default=0.0)

    def build(rate: float) -> tuple[list[SimRequest], FollowUp | None]:
        scale = own_rate / rate if own_rate != float("inf") else 0.0
        return [SimRequest(r.request_id, (r.arrival_time - first) * scale, r.prompt_token_ids, r.output_len)
                for r in requests], None

    return SimWorkload("trace", build, "req/s")
