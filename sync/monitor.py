"""What ``vectorsync status`` reports, read from the database (so it sees every worker)."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from sync.spec import Config

LIVE_SECONDS = 30


def status(conn: psycopg.Connection, config: Config) -> dict[str, Any]:
    if not conn.execute("SELECT to_regclass('vectorsync.embeddings') IS NOT NULL").fetchone()[0]:
        return {"migrated": False, "embeddings": [], "workers": []}
    rows = conn.execute(
        "SELECT name, source_schema, source_table, target_schema, target_table, current_version, last_sync "
        "FROM vectorsync.embeddings ORDER BY name"
    ).fetchall()
    declared = {s.name for s in config.embeddings}
    report: list[dict[str, Any]] = []
    for name, sschema, stable, tschema, ttable, version, last_sync in rows:
        source = sql.Identifier(sschema, stable)
        target = sql.Identifier(tschema, ttable)
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (source.as_string(conn),)).fetchone()[0]
        source_rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(source)).fetchone()[0] if exists else None
        embedded, current, recent, last = conn.execute(
            sql.SQL(
                "SELECT count(*), count(*) FILTER (WHERE model_version = %s), "
                "count(*) FILTER (WHERE embedded_at > now() - interval '60 seconds'), max(embedded_at) FROM {}"
            ).format(target),
            (version,),
        ).fetchone()
        pending, lag = conn.execute(
            "SELECT count(DISTINCT key), extract(epoch FROM now() - min(enqueued_at)) FROM vectorsync.queue "
            "WHERE embedding = %s",
            (name,),
        ).fetchone()
        failed = conn.execute("SELECT count(*) FROM vectorsync.failed WHERE embedding = %s", (name,)).fetchone()[0]
        report.append(
            {
                "name": name,
                "in_config": name in declared,
                "source_rows": source_rows,
                "embedded": embedded,
                "embedded_current_model": current,
                "pending": pending,
                "failed": failed,
                "model_version": version,
                "lag_seconds": round(float(lag), 3) if lag is not None else 0.0,
                "per_second_1m": round(recent / 60.0, 2),
                "last_embedded": last,
                "last_sync": last_sync,
            }
        )
    workers = [
        {"id": r[0], "embeddings": r[1], "embedded": r[2], "failed": r[3], "heartbeat_age_s": float(r[4])}
        for r in conn.execute(
            "SELECT id, embeddings, embedded, failed, extract(epoch FROM now() - heartbeat_at) FROM vectorsync.workers "
            "WHERE status = 'running' AND heartbeat_at > now() - make_interval(secs => %s) ORDER BY id",
            (LIVE_SECONDS,),
        ).fetchall()
    ]
    return {"migrated": True, "embeddings": report, "workers": workers}
