"""Prometheus metrics, named as vLLM names them but with the `conveyor:` prefix (e.g. vLLM's
`vllm:time_to_first_token_seconds` is `conveyor:time_to_first_token_seconds`), so dashboards carry over."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from conveyor.engine.engine import LLMEngine
from conveyor.outputs import RequestOutput

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(f"conveyor:{name}", doc, labels, buckets=_LATENCY_BUCKETS,
                             registry=self.registry).labels(model_name)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"conveyor:{name}", doc, labels, registry=self.registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"conveyor:{name}", doc, labels, registry=self.registry).labels(model_name)

        self.time_to_first_token = histogram("time_to_first_token_seconds", "Time to first token")
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Time between output tokens")
        self.e2e_latency = histogram("e2e_request_latency_seconds", "End-to-end request latency")
        self.queue_time = histogram("request_queue_time_seconds", "Time from arrival to first scheduling")
        self.num_running = gauge("num_requests_running", "Requests in the running batch")
        self.num_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_cache_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)")
        self.preemptions = counter("num_preemptions", "Preemptions (recompute) so far")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens computed (recomputes included)")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.step_batch_size = Histogram("conveyor:step_batch_size", "Requests in each engine step", labels,
                                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                                         registry=self.registry).labels(model_name)
        self.requests_finished = Counter("conveyor:request_success", "Finished requests by reason",
                                         ["model_name", "finished_reason"], registry=self.registry)
        self.model_name = model_name
        self._last_token_time: dict[str, float] = {}
        self._seen = (0, 0, 0)

    def observe_queue(self, engine: LLMEngine) -> None:
        """Called by the engine thread after every step and after adds and aborts, so an aborted request
        leaves the gauges at once rather than at the next step (which may never come when it was the last)."""
        scheduler = engine.scheduler
        self.num_running.set(scheduler.num_running)
        self.num_waiting.set(scheduler.num_waiting)
        self.kv_cache_usage.set(scheduler.kv_cache.usage)

    def observe_step(self, engine: LLMEngine, outputs: list[RequestOutput], step_seconds: float) -> None:
        """Called by the engine thread after every step."""
        now = time.monotonic()
        scheduler = engine.scheduler
        self.observe_queue(engine)
        totals = (scheduler.num_preemptions, engine.num_prompt_tokens_total, engine.num_generation_tokens_total)
        for metric, new, old in zip((self.preemptions, self.prompt_tokens, self.generation_tokens), totals,
                                    self._seen):
            if new > old:
                metric.inc(new - old)
        self._seen = totals
        self.step_batch_size.observe(engine.last_step_num_requests)
        for output in outputs:
            self._observe_request(output, now)

    def _observe_request(self, output: RequestOutput, now: float) -> None:
        metrics = output.metrics
        if metrics is None:
            return
        previous = self._last_token_time.get(output.request_id)
        if output.delta_token_ids:
            if previous is None and metrics.first_token_time is not None:
                self.time_to_first_token.observe(metrics.first_token_time - metrics.arrival_time)
                if metrics.first_scheduled_time is not None:
                    self.queue_time.observe(metrics.first_scheduled_time - metrics.arrival_time)
            elif previous is not None:
                self.inter_token_latency.observe(now - previous)
            self._last_token_time[output.request_id] = now
        if output.finished:
            self._last_token_time.pop(output.request_id, None)
            self.e2e_latency.observe(now - metrics.arrival_time)
            reason = output.outputs[0].finish_reason or "unknown"
            self.requests_finished.labels(self.model_name, reason).inc()
