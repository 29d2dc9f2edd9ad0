"""Prometheus metrics (`gemma4 serve --metrics`, GET /metrics): load, tokens and latency, in the
names vLLM and llama.cpp users already chart."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ...runtime.scheduler import Usage
from .served import ServedModel

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)


class Metrics:
    def __init__(self, served: ServedModel):
        self.registry = CollectorRegistry()
        gauge = lambda name, text, read: Gauge(name, text, registry=self.registry).set_function(read)  # noqa: E731
        scheduler = lambda: served.scheduler  # noqa: E731
        gauge("gemma4_requests_running", "Requests holding a slot (prefilling or decoding)", lambda: scheduler().running if scheduler() else 0)
        gauge("gemma4_requests_waiting", "Requests queued for a slot", lambda: scheduler().waiting if scheduler() else 0)
        gauge("gemma4_kv_cache_bytes", "K/V bytes the slots hold (prefix cache included)", lambda: scheduler().cache_bytes() if scheduler() else 0)
        gauge("gemma4_kv_cache_planned_bytes", "K/V bytes the memory plan allows", lambda: served.plan.get("kv_bytes", 0))
        self.prompt_tokens = Counter("gemma4_prompt_tokens", "Prompt tokens received", registry=self.registry)
        self.cached_tokens = Counter("gemma4_cached_prompt_tokens", "Prompt tokens taken from the prefix cache", registry=self.registry)
        self.generated_tokens = Counter("gemma4_generation_tokens", "Tokens generated", registry=self.registry)
        self.requests = Counter("gemma4_requests", "Finished requests by finish reason", ["finish_reason"], registry=self.registry)
        self.first_token = Histogram("gemma4_time_to_first_token_seconds", "From arrival to the first token", buckets=LATENCY_BUCKETS, registry=self.registry)
        self.per_token = Histogram("gemma4_time_per_output_token_seconds", "Mean time between tokens of a request", buckets=LATENCY_BUCKETS, registry=self.registry)

    def record(self, reason: str, usage: Usage) -> None:
        self.requests.labels(reason).inc()
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.cached_tokens.inc(usage.cached_tokens)
        self.generated_tokens.inc(usage.completion_tokens)
        if usage.completion_tokens:
            self.first_token.observe(usage.first_token_seconds)
        if usage.completion_tokens > 1:
            self.per_token.observe(usage.decode_seconds / (usage.completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
