"""Prometheus metrics of the server (``GET /metrics``), one registry per app.

- ``s1kit_requests_total{endpoint, status}`` (counter): responses of ``/v1/chat/completions`` (``chat``) and
  ``/v1/completions`` (``completions``) by HTTP status
- ``s1kit_prompt_tokens_total``, ``s1kit_completion_tokens_total``, ``s1kit_thinking_tokens_total`` (counters): tokens
  of the requests answered (a prompt counts once, not per ``n``; completion tokens are thinking, answer opener, answer
  and end of turn)
- ``s1kit_finished_choices_total{finish_reason}`` (counter): choices answered, by ``stop`` / ``length``
- ``s1kit_requests_running``, ``s1kit_requests_waiting`` (gauges): requests producing tokens, and those with no token
  yet (queued for a place in the batch, or in their prefill)
- ``s1kit_time_to_first_token_seconds``, ``s1kit_request_latency_seconds`` (histograms): from a request's arrival to
  its first token (thinking counts) and to its last
"""

from __future__ import annotations

import time
from typing import Any, Callable

from ..engines.base import Completion

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0, 2560.0)
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}


class Metrics:
    """The server's metrics; ``worker()`` gives the engine worker (or None) when a gauge is read."""

    def __init__(self, worker: Callable[[], Any]) -> None:
        try:
            from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
        except ImportError as e:  # pragma: no cover - the serve extra installs it
            raise ImportError(f"the server's /metrics needs prometheus-client ({e}): pip install 's1kit[serve]'") from e
        self.registry = r = CollectorRegistry()
        self.content_type = CONTENT_TYPE_LATEST
        self.worker = worker
        self.requests = Counter("s1kit_requests", "HTTP requests to the generation endpoints, by status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("s1kit_prompt_tokens", "Prompt tokens of the requests answered", registry=r)
        self.completion_tokens = Counter("s1kit_completion_tokens", "Completion tokens (thinking, answer opener, "
                                         "answer, end of turn) of the requests answered", registry=r)
        self.thinking_tokens = Counter("s1kit_thinking_tokens", "Thinking tokens of the requests answered", registry=r)
        self.finished_choices = Counter("s1kit_finished_choices", "Choices answered, by finish reason",
                                        ["finish_reason"], registry=r)
        Gauge("s1kit_requests_running", "Requests producing tokens", registry=r).set_function(
            lambda: self._load()[0])
        Gauge("s1kit_requests_waiting", "Requests with no token yet (queued for a place, or in their prefill)",
              registry=r).set_function(lambda: self._load()[1])
        self.ttft = Histogram("s1kit_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.latency = Histogram("s1kit_request_latency_seconds", "From a request's arrival to its last token",
                                 buckets=LATENCY_BUCKETS, registry=r)

    def _load(self) -> tuple[int, int]:
        w = self.worker()
        if w is None:
            return 0, 0
        waiting = w.waiting
        return max(0, w.stats["running"] - (waiting - w.queued)), waiting

    def finished(self, job: Any, completions: list[Completion], endpoint: str) -> None:
        """A request was answered with ``completions``."""
        now = time.monotonic()
        self.prompt_tokens.inc(sum(c.prompt_tokens for c in completions if c.sample_index == 0))
        self.completion_tokens.inc(sum(len(c.token_ids) for c in completions))
        self.thinking_tokens.inc(sum(c.thinking_tokens for c in completions))
        for c in completions:
            self.finished_choices.labels("length" if c.finish_reason == "length" else "stop").inc()
        if job.first_token_at is not None:
            self.ttft.observe(job.first_token_at - job.created)
        self.latency.observe(now - job.created)

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class RequestCounter:
    """ASGI middleware: counts the generation endpoints' responses by status code (``s1kit_requests_total``)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        endpoint = ENDPOINTS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            return await self.app(scope, receive, send)

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
