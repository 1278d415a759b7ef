"""Extreme but finite values in a tabular input (1e308, -1e300, 1e200, 1e160) neither break training
nor vanish: every row is embedded, in training and afterwards, and the other rows keep their
structure."""

from __future__ import annotations

import numpy as np


def test_extreme_values_are_embedded_and_do_not_collapse_the_others(conn, write_config, cli):
    conn.execute("CREATE TABLE x (id int PRIMARY KEY, a double precision, b double precision, kind text)")
    conn.execute(
        "INSERT INTO x SELECT g, sin(g) * 10, (g % 17) / 3.0, 'k' || (g % 4) FROM generate_series(1, 2000) g"
    )
    extremes = {17: ("a", "1e308"), 18: ("a", "-1e300"), 19: ("b", "1e200"), 20: ("b", "1e160")}
    for key, (column, value) in extremes.items():
        conn.execute(f"UPDATE x SET {column} = {value} WHERE id = {key}")
    config = write_config(
        """
        [worker]
        max_attempts = 1

        [[embeddings]]
        name = "x"
        table = "x"
        key = "id"
        modality = "tabular"
        dim = 4
        index = "none"
        columns = ["a", "b", "kind"]
        encoder = { epochs = 5 }
        """
    )
    assert cli("migrate", config=config).code == 0
    trained = cli("train", "x", config=config)
    assert trained.code == 0, trained.err
    conn.execute("INSERT INTO x VALUES (5000, 1e308, -1e308, 'k1')")  # after training too
    assert cli("sync", config=config).code == 0

    assert conn.execute("SELECT count(*) FROM vectorsync.failed").fetchone()[0] == 0
    rows = dict(conn.execute("SELECT id, embedding::real[] FROM x_embeddings").fetchall())
    assert len(rows) == 2001
    vectors = np.array(list(rows.values()), dtype=np.float64)
    assert np.isfinite(vectors).all()
    # The outliers did not squash every ordinary row onto one point: rows differing only in `a`
    # (which cycles through sin) still get clearly different vectors.
    ordinary = np.array([rows[k] for k in range(100, 400)], dtype=np.float64)
    assert len({tuple(np.round(v, 4)) for v in ordinary}) > 250
    assert ordinary.std(axis=0).max() > 1e-2
