"""What ``vectorsync status`` reports, read from the database (so it sees every worker)."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from vectorsync.sync import generations
from vectorsync.sync.db import scalar
from vectorsync.sync.spec import Config

LIVE_SECONDS = 30


def status(conn: psycopg.Connection, config: Config) -> dict[str, Any]:
    """The counts of ``vectorsync.embedding_status()`` plus recent throughput, and the live workers
    (``workers`` is None when the role may not read them)."""
    if not scalar(conn, "SELECT to_regclass('vectorsync.embeddings') IS NOT NULL"):
        return {"migrated": False, "embeddings": [], "workers": []}
    declared = {s.name for s in config.embeddings}
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT s.*, e.target_schema, e.target_table FROM vectorsync.embedding_status() s "
            "JOIN vectorsync.embeddings e USING (name) ORDER BY s.name"
        ).fetchall()
    for row in rows:
        target = sql.Identifier(row.pop("target_schema"), row.pop("target_table"))
        recent = 0
        if scalar(conn, "SELECT to_regclass(%s) IS NOT NULL", (target.as_string(conn),)):
            recent = scalar(
                conn,
                sql.SQL("SELECT count(*) FROM {} WHERE embedded_at > now() - interval '60 seconds'").format(target),
            )
        row["in_config"] = row["name"] in declared
        row.update(_generations(conn, row["name"]))
        row["lag_seconds"] = round(float(row["lag_seconds"]), 3)
        row["per_second_1m"] = round(recent / 60.0, 2)
    return {"migrated": True, "embeddings": rows, "workers": _live_workers(conn)}


def _live_workers(conn: psycopg.Connection) -> list[dict[str, Any]] | None:
    """The workers that beat recently; None for a role that may not see them (a reader is granted
    the embeddings it may read, not the hosts and processes that serve them)."""
    if not scalar(conn, "SELECT has_table_privilege('vectorsync.workers', 'SELECT')"):
        return None
    return [
        {"id": r[0], "embeddings": r[1], "embedded": r[2], "failed": r[3], "heartbeat_age_s": float(r[4])}
        for r in conn.execute(
            "SELECT id, embeddings, embedded, failed, extract(epoch FROM now() - heartbeat_at) FROM vectorsync.workers "
            "WHERE status = 'running' AND heartbeat_at > now() - make_interval(secs => %s) ORDER BY id",
            (LIVE_SECONDS,),
        ).fetchall()
    ]


def _generations(conn: psycopg.Connection, name: str) -> dict[str, Any]:
    """The generation in service and the one being built: ``generation`` as ``N (model vM)``,
    ``building`` as ``N: 42% (~120 s left)``, and the details under ``generations``."""
    found = generations.progress(conn, name)
    serving = next((g for g in found if g["state"] == "serving"), None)
    building = next((g for g in found if g["state"] == "building"), None)
    shown = None
    if building is not None:
        if building["model_version"] is None:
            shown = f"{building['generation']}: waiting for `vectorsync train {name}`"
        else:
            left = "" if building["seconds_left"] is None else f" (~{building['seconds_left']:.0f} s left)"
            shown = f"{building['generation']}: {building['progress']:.0%}{left}"
    return {
        # the model queries see, not the newest trained one (that one may still be being built)
        **({"model_version": serving["model_version"]} if serving and serving["model_version"] else {}),
        "generation": f"{serving['generation']} (model v{serving['model_version']})" if serving else None,
        "building": shown,
        "generations": found,
    }
