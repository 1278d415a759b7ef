"""Defaults that use the machine: a worker or a ``sync`` gives torch every core the process may use
(CPU affinity and cgroup quota respected), ``worker -n N`` divides them, and
``VECTORSYNC_TORCH_THREADS`` overrides."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from tests.worker_support import WorkerProcess, create_items, items_spec, prepare, wait_until
from vectorsync.encoders.base import THREADS_ENV, usable_cores
from vectorsync.sync import models


@contextmanager
def affinity(cpus: set[int]) -> Iterator[None]:
    """Run children started inside on ``cpus`` only (they inherit this process's affinity)."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def worker_threads(db_url: str, tmp_path, *args: str) -> int:
    config = items_spec(tmp_path / "vectorsync.toml")
    log = tmp_path / f"worker-{len(list(tmp_path.glob('worker-*.log')))}.log"
    with WorkerProcess(db_url, config, log, *args) as worker:
        banner = wait_until(lambda: re.search(r"encoding uses (\d+) thread", worker.output()), 120, "worker banner")
        worker.terminate()
    return int(banner.group(1))


@pytest.fixture
def items_project(conn, db_url, tmp_path, monkeypatch):
    create_items(conn, 300)
    prepare(db_url, items_spec(tmp_path / "vectorsync.toml"))
    monkeypatch.delenv(THREADS_ENV)
    return tmp_path


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")
def test_a_worker_uses_the_cores_it_may_use_and_divides_them_among_its_threads(db_url, items_project):
    cores = usable_cores()
    assert worker_threads(db_url, items_project) == cores
    assert worker_threads(db_url, items_project, "-n", "2") == max(1, cores // 2)
    with affinity({min(os.sched_getaffinity(0))}):
        assert worker_threads(db_url, items_project) == 1


def test_the_environment_overrides_the_thread_count(db_url, items_project, monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "3")
    assert worker_threads(db_url, items_project) == 3


@pytest.fixture
def fresh_thread_setting() -> Iterator[None]:
    models.share_threads(1)  # forget this process's earlier choice
    yield
    models.share_threads(1)
    torch.set_num_threads(1)


def test_sync_uses_every_usable_core(items_project, cli, fresh_thread_setting):
    assert cli("sync", config=items_project / "vectorsync.toml").code == 0
    assert torch.get_num_threads() == usable_cores()
