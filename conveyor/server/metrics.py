"""Prometheus metrics, named as vLLM names them but with the `conveyor:` prefix (e.g. vLLM's
`vllm:time_to_first_token_seconds` is `conveyor:time_to_first_token_seconds`), so dashboards carry over."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from conveyor.engine.stats import QueueStats, StepStats
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
        self.preemptions = counter("num_preemptions", "Preemptions (recompute)")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens computed (recomputes included)")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.step_batch_size = Histogram("conveyor:step_batch_size", "Requests in each engine step", labels,
                                         buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                                         registry=self.registry).labels(model_name)
        self.requests_finished = Counter("conveyor:request_success", "Finished requests by reason",
                                         ["model_name", "finished_reason"], registry=self.registry)
        self.model_name = model_name
        self._last_token_time: dict[str, float] = {}

    def observe_queue(self, queue: QueueStats | StepStats) -> None:
        """Called by the engine thread after every step and after adds and aborts, so an aborted request
        leaves the gauges at once rather than at the next step (which may never come when it was the last)."""
        self.num_running.set(queue.num_running)
        self.num_waiting.set(queue.num_waiting)
        self.kv_cache_usage.set(queue.kv_cache_usage)

    def observe_step(self, stats: StepStats, outputs: list[RequestOutput]) -> None:
        """Called by the engine thread after every step that ran."""
        now = time.monotonic()
        self.observe_queue(stats)
        self.preemptions.inc(len(stats.preempted))
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        self.prefix_cache_queries.inc(stats.prefix_cache_queries)
        self.prefix_cache_hits.inc(stats.prefix_cache_hits)
        self.step_batch_size.observe(len(stats.scheduled))
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
