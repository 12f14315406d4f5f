"""The step stream's hub on its own: what it records, when, and what a slow viewer loses."""

from __future__ import annotations

import asyncio
import json
import time

from conveyor.engine.stats import ScheduledEntry, StepStats
from conveyor.outputs import CompletionOutput, RequestMetrics, RequestOutput
from conveyor.server.step_stream import StepStream


def _step(index: int, finished: list[str] | None = None) -> StepStats:
    return StepStats(step_index=index, start_time=10.0 + index, duration=0.5, prepare_seconds=0.1,
                     forward_seconds=0.3, sample_seconds=0.05, scheduled=[ScheduledEntry("r", 1, "decode", 40, True)],
                     num_generation_tokens=1, num_running=1, num_waiting=2, kv_blocks_used=3, kv_blocks_total=8,
                     finished=finished or [])


def _output(generated: int, finished: bool) -> RequestOutput:
    metrics = RequestMetrics(arrival_time=9.0, first_scheduled_time=9.5, first_token_time=10.5,
                             finished_time=12.5 if finished else None)
    completion = CompletionOutput(0, "", list(range(generated)), finish_reason="length" if finished else None)
    return RequestOutput("r", None, [1, 2, 3], [completion], finished, metrics)


def _ids(events: list) -> list[int]:  # type: ignore[type-arg]
    return [event.step_index for event in events]


def test_nothing_is_recorded_while_nobody_watches_and_for_a_while_after() -> None:
    stream = StepStream(capacity=100, linger=0.2)
    stream.observe(_step(0), [])
    assert stream.events_after(None) == []
    with stream.viewer():
        stream.observe(_step(1), [])
    stream.observe(_step(2), [])  # the viewer just left: a reconnect would resume from here
    time.sleep(0.3)
    stream.observe(_step(3), [])
    assert _ids(stream.events_after(None)) == [1, 2]


def test_a_viewer_behind_the_ring_loses_the_oldest_steps_and_resumes_after_its_id() -> None:
    stream = StepStream(capacity=5)
    with stream.viewer():
        for index in range(12):
            stream.observe(_step(index), [])
    assert _ids(stream.events_after(2)) == [7, 8, 9, 10, 11]  # 3..6 were dropped
    assert _ids(stream.events_after(9)) == [10, 11]
    assert _ids(stream.events_after(11)) == []


def test_an_id_from_before_a_restart_starts_over() -> None:
    stream = StepStream(flush_interval=0.01)

    async def first_chunk() -> str:
        events = stream.stream(last_id=5000)  # the previous server run had reached step 5000
        pending = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.05)
        stream.observe(_step(0), [])
        chunk = await asyncio.wait_for(pending, timeout=2)
        await events.aclose()
        return chunk

    assert asyncio.run(first_chunk()).startswith("id: 0\n")


def test_an_event_is_the_step_and_its_requests() -> None:
    stream = StepStream()
    with stream.viewer():
        stream.observe(_step(4, finished=["r"]), [_output(3, finished=True)])
    text = stream.events_after(None)[0].text
    assert text.startswith("id: 4\ndata: ") and text.endswith("\n\n")
    payload = json.loads(text.split("data: ", 1)[1])
    assert payload["kv"] == {"used": 3, "cached": 0, "free": 5, "total": 8}
    assert payload["cells"] == [["r", 2]] and payload["finished"] == ["r"]
    assert payload["rows"] == [[40, 1, True]]  # the shape `conveyor tune` prices
    assert abs(payload["overhead"] - 0.15) < 1e-9 and payload["time"] == 14.5
    update = payload["updates"][0]
    assert (update["prompt_tokens"], update["generated_tokens"], update["finish_reason"]) == (3, 3, "length")
    assert (update["arrival"], update["first_token"], update["finished"]) == (9.0, 10.5, 12.5)


def test_a_viewer_gets_the_steps_since_it_connected_in_one_write_and_leaves_no_cost_behind() -> None:
    stream = StepStream(flush_interval=0.01, linger=0.0)

    async def main() -> str:
        events = stream.stream(last_id=None)
        stream.observe(_step(0), [])  # nobody watches yet
        first = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.05)  # now the viewer is registered and polling
        stream.observe(_step(1), [])
        stream.observe(_step(2), [])
        chunk = await asyncio.wait_for(first, timeout=2)
        await events.aclose()
        return chunk

    chunk = asyncio.run(main())
    assert [int(line[4:]) for line in chunk.splitlines() if line.startswith("id: ")] == [1, 2]
    stream.observe(_step(3), [])  # the viewer has gone and linger is 0
    assert _ids(stream.events_after(2)) == []
