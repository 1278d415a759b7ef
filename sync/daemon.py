"""``vectorsync worker``: worker threads, signal handling, bounded shutdown, metrics, and the
scheduled re-run of graph embeddings."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence

from rich.console import Console

from vectorsync.sync import models
from vectorsync.sync.spec import Config, GraphEmbeddingSpec
from vectorsync.sync.worker import Worker, first_encode_seconds

log = logging.getLogger("vectorsync.daemon")


def run_workers(
    url: str,
    config: Config,
    names: Sequence[str] | None,
    *,
    concurrency: int = 1,
    batch_size: int | None = None,
    max_wait_ms: int | None = None,
    metrics_port: int | None = None,
    shutdown_timeout: float = 10.0,
    console: Console | None = None,
) -> None:
    specs = config.select(list(names) if names else None)
    metrics = None
    if metrics_port:
        from vectorsync.sync.metrics import WorkerMetrics  # prometheus_client: only with a metrics port

        metrics = WorkerMetrics()
        metrics.serve(metrics_port)
    models.share_threads(concurrency)
    # torch itself (seconds to import) is set up when a model that runs on it loads
    encoder_threads = models.encoder_threads()

    def first_batch(seconds: float) -> None:
        if console:
            began = first_encode_seconds() or seconds
            console.print(
                f"first batch began encoding {began:.1f}s and was written {seconds:.1f}s after the worker started"
            )

    workers = [
        Worker(
            url, config, names, batch_size=batch_size, max_wait_ms=max_wait_ms, thread_index=i, metrics=metrics,
            on_first_batch=first_batch if i == 0 else None,
        )
        for i in range(concurrency)
    ]
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        if console:
            console.print(
                f"received {signal.Signals(signum).name}, finishing the current batch "
                f"(or releasing it after {shutdown_timeout:g}s)"
            )
        stop.set()
        for w in workers:
            w.stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    threads = [threading.Thread(target=w.run, name=f"worker-{i}", daemon=True) for i, w in enumerate(workers)]
    for thread in threads:
        thread.start()
    graph_specs = [s for s in specs if isinstance(s, GraphEmbeddingSpec)]
    graphs = None
    if graph_specs:
        from vectorsync.sync.graph import GraphRunner  # scipy: imported only where graphs run

        graphs = GraphRunner(url, graph_specs)
    if console:
        console.print(
            f"worker running: {concurrency} thread(s) for {', '.join(s.name for s in specs) or 'no embeddings'}, "
            f"encoding uses {encoder_threads} thread(s)"
            + (f", metrics on :{metrics_port}" if metrics_port else "")
        )
    while not stop.is_set():
        if graphs is not None:
            graphs.tick()
        stop.wait(0.5)
    if graphs is not None:
        graphs.close()
    deadline = time.monotonic() + shutdown_timeout
    for w, thread in zip(workers, threads, strict=True):
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            w.cancel_current()  # roll the batch back: its items become claimable again
            thread.join(2.0)
    if console:
        console.print("worker stopped")

