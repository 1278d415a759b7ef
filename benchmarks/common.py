"""Shared pieces for benchmarks: a throw-away embedded database, timing, and result rows."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

#: The line ``sync`` and ``worker`` print about their first batch: (began encoding, written), in
#: seconds since the command started.
FIRST_BATCH = re.compile(r"first batch began encoding (\d+\.\d)s and was written (\d+\.\d)s")


@dataclass
class Figure:
    """One measured figure, compared with a baseline measured in the same run."""

    benchmark: str
    name: str
    value: float
    unit: str
    baseline_name: str | None = None
    baseline_value: float | None = None
    target: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.baseline_value in (None, 0):
            return None
        return self.value / self.baseline_value  # type: ignore[operator]

    def line(self) -> str:
        ratio = f"{self.ratio:.2f}" if self.ratio is not None else "-"
        baseline = f"{self.baseline_value:,.1f} ({self.baseline_name})" if self.baseline_value is not None else "-"
        # Small figures (a cosine, a change of agreement) need their digits; rates and times do not.
        digits = f"{self.value:,.1f}" if abs(self.value) >= 10 else f"{self.value:.4g}"
        value = f"{digits} {self.unit}".strip()
        return f"| {self.benchmark} | {self.name} | {value} | {baseline} | {ratio} | {self.target or '-'} |"


@contextmanager
def scratch_database(data_dir: Path) -> Iterator[str]:
    """A fresh database in the embedded server under ``data_dir``; dropped afterwards."""
    from vectorsync.sync import embedded

    base = embedded.start(data_dir)
    name = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    info = conninfo_to_dict(base)
    info["dbname"] = name
    try:
        yield make_conninfo(**info)
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@contextmanager
def timer() -> Iterator[list[float]]:
    """``with timer() as t: ...``; afterwards ``t[0]`` holds the seconds elapsed."""
    holder: list[float] = []
    started = time.perf_counter()
    try:
        yield holder
    finally:
        holder.append(time.perf_counter() - started)
