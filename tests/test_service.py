"""The service layer (``vectorsync.sync.service``) as a script or a web application calls it: a URL,
a Config and an embedding name in; plain progress callbacks; small dataclasses out."""

from __future__ import annotations

import psycopg
import pytest

from vectorsync.errors import InputError
from vectorsync.sync import catalog, models, service
from vectorsync.sync.spec import Config, parse_config

ROWS = 300


@pytest.fixture
def points(conn: psycopg.Connection) -> Config:
    conn.execute("CREATE TABLE points (id integer PRIMARY KEY, x real, y real, z real)")
    conn.execute(
        "INSERT INTO points SELECT i, sin(i), cos(i), (i %% 7)::real FROM generate_series(1, %s) AS i", (ROWS,)
    )
    entry = {
        "name": "points",
        "table": "points",
        "key": "id",
        "modality": "tabular",
        "dim": 2,
        "columns": ["x", "y", "z"],
        "encoder": {"type": "autoencoder", "seed": 1, "epochs": 3},
    }
    return parse_config({"embeddings": [entry]})


def test_sync_trains_a_missing_model_then_embeds_every_row_reporting_progress(
    conn: psycopg.Connection, db_url: str, points: Config
) -> None:
    report = service.migrate(db_url, points)
    assert report.embeddings == ["points"]
    calls: list[tuple[int, int | None, str]] = []

    def progress(done: int, total: int | None, message: str) -> None:
        calls.append((done, total, message))

    result = service.sync(db_url, points, "points", progress=progress)

    assert result.trained is not None and result.trained.version == 1
    assert (result.path, result.embedded, result.failed, result.deleted) == ("queue", ROWS, 0, 0)
    assert list(result.counts()) == ["queued", "embedded", "failed", "deleted"]
    assert calls and calls[-1][0] == ROWS and calls[-1][1] == ROWS
    assert conn.execute("SELECT count(*) FROM points_embeddings").fetchone()[0] == ROWS
    assert conn.execute(
        "SELECT kind, embedded, finished_at IS NOT NULL FROM vectorsync.runs WHERE embedding = 'points'"
    ).fetchall() == [("sync", ROWS, True)]


def test_a_second_sync_does_nothing_and_changes_are_picked_up(
    conn: psycopg.Connection, db_url: str, points: Config
) -> None:
    service.migrate(db_url, points)
    service.sync(db_url, points, "points")
    again = service.sync(db_url, points, "points")
    assert (again.trained, again.queued, again.embedded) == (None, 0, 0)

    conn.execute("UPDATE points SET x = x + 1 WHERE id <= 5")
    conn.execute("DELETE FROM points WHERE id = 6")
    changed = service.sync(db_url, points, "points")
    assert changed.embedded == 5
    assert conn.execute("SELECT count(*) FROM points_embeddings").fetchone()[0] == ROWS - 1


def test_train_returns_the_new_version_and_nearest_uses_it(db_url: str, points: Config) -> None:
    service.migrate(db_url, points)
    trained = service.train(db_url, points, "points")
    assert trained.version == 1 and trained.rows == ROWS and "train_reconstruction_mse" in trained.metrics
    service.sync(db_url, points, "points")

    neighbours = service.nearest(db_url, "points", "1", k=3)
    assert len(neighbours) == 3 and "1" not in {n.key for n in neighbours}
    assert [n.distance for n in neighbours] == sorted(n.distance for n in neighbours)
    with pytest.raises(InputError, match="key 'abc'"):
        service.nearest(db_url, "points", "abc")


def test_retry_moves_failed_items_back_to_the_queue(conn: psycopg.Connection, db_url: str, points: Config) -> None:
    service.migrate(db_url, points)
    conn.execute(
        "INSERT INTO vectorsync.failed (embedding, key, column_name, error, attempts) "
        "VALUES ('points', '7', 'x', 'not finite', 3)"
    )
    assert service.retry(db_url, points, ["points"]) == 1
    assert ("points", "7") in conn.execute("SELECT embedding, key FROM vectorsync.pending").fetchall()
    assert conn.execute("SELECT count(*) FROM vectorsync.failed").fetchone()[0] == 0


def test_metrics_without_a_number_are_recorded_as_null(conn: psycopg.Connection, db_url: str, points: Config) -> None:
    # a metric over an empty holdout (a tiny table) is NaN, which JSON cannot carry
    service.migrate(db_url, points)
    service.sync(db_url, points, "points")
    emb = catalog.load(conn, points.embeddings[0])
    version = models.register_version(
        conn, emb, encoder_type="autoencoder", weights=b"w", params={},
        metrics={"holdout_loss": float("nan"), "train_loss": 0.5}, history=[{"epoch": 1, "loss": float("inf")}],
    )
    assert conn.execute(
        "SELECT metrics, history FROM vectorsync.models WHERE embedding = 'points' AND version = %s", (version,)
    ).fetchone() == ({"holdout_loss": None, "train_loss": 0.5}, [{"epoch": 1, "loss": None}])
