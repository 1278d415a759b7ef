"""Prometheus metrics for workers (``vectorsync worker --metrics-port``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from vectorsync.sync.worker import BatchResult


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.embedded = Counter(
            "vectorsync_embedded", "Rows embedded and written.", ["embedding"], registry=self.registry
        )
        self.failed = Counter(
            "vectorsync_failed", "Items moved to vectorsync.failed.", ["embedding"], registry=self.registry
        )
        self.retried = Counter(
            "vectorsync_retried", "Item failures that will be retried.", ["embedding"], registry=self.registry
        )
        self.depth = Gauge("vectorsync_queue_depth", "Queued changes.", ["embedding"], registry=self.registry)
        self.latency = Histogram(
            "vectorsync_batch_seconds",
            "Time to claim, encode and write one batch.",
            ["embedding"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )

    def observe(self, embedding: str, result: BatchResult) -> None:
        self.embedded.labels(embedding).inc(result.embedded)
        self.failed.labels(embedding).inc(result.failed)
        self.retried.labels(embedding).inc(result.retried)
        self.latency.labels(embedding).observe(result.seconds)

    def queue(self, depths: dict[str, int]) -> None:
        for embedding, depth in depths.items():
            self.depth.labels(embedding).set(depth)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
