"""Foundation: specs, migrations, tabular train → sync → search, change capture, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg import sql

from tests.pg_support import nearest_label_agreement
from vectorsync.sync.spec import SpecError, parse_config

DIGITS_SPEC = """
[[embeddings]]
name = "digits"
table = "digits"
key = "id"
modality = "tabular"
dim = 16
columns = [{columns}]
encoder = {{ type = "autoencoder", seed = 3, epochs = 25 }}
"""


def load_digits_table(conn: psycopg.Connection, rows: int = 900) -> list[str]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    columns = [f"p{i}" for i in range(digits.data.shape[1])]
    conn.execute(
        sql.SQL("CREATE TABLE digits (id integer PRIMARY KEY, label integer NOT NULL, note text, {})").format(
            sql.SQL(", ").join(sql.SQL("{} real").format(sql.Identifier(c)) for c in columns)
        )
    )
    with conn.cursor().copy(
        sql.SQL("COPY digits (id, label, {}) FROM STDIN").format(sql.SQL(", ").join(map(sql.Identifier, columns)))
    ) as copy:
        for i in range(rows):
            copy.write_row([i, int(digits.target[i]), *map(float, digits.data[i])])
    return columns


@pytest.fixture
def digits_project(conn, write_config, cli):
    columns = load_digits_table(conn)
    config = write_config(DIGITS_SPEC.format(columns=", ".join(f'"{c}"' for c in columns)))
    assert cli("migrate", config=config).code == 0
    result = cli("train", "digits", config=config)
    assert result.code == 0, result.err
    result = cli("sync", config=config)
    assert result.code == 0, result.err
    return config


def embedded_at(conn: psycopg.Connection) -> dict[int, object]:
    return dict(conn.execute("SELECT id, embedded_at FROM digits_embeddings").fetchall())


# --- specs -------------------------------------------------------------------------------------


def test_spec_error_names_embedding_and_field():
    raw = {
        "embeddings": [{"name": "items", "table": "t", "key": "id", "modality": "tabular", "dim": 0, "columns": ["a"]}]
    }
    with pytest.raises(SpecError, match=r"embedding 'items', field 'dim'"):
        parse_config(raw)


def test_spec_rejects_unknown_modality_and_encoder():
    with pytest.raises(SpecError, match="modality"):
        parse_config({"embeddings": [{"name": "x", "table": "t", "key": "id", "modality": "audio", "dim": 4}]})
    raw = {
        "embeddings": [
            {
                "name": "x",
                "table": "t",
                "key": "id",
                "modality": "tabular",
                "dim": 4,
                "columns": ["a"],
                "encoder": {"type": "nope"},
            }
        ]
    }
    with pytest.raises(SpecError, match=r"embedding 'x', field 'encoder.type': unknown encoder type 'nope'"):
        parse_config(raw)


def test_spec_rejects_duplicate_names_and_sql_like_names():
    entry = {"name": "x", "table": "t", "key": "id", "modality": "tabular", "dim": 4, "columns": ["a"]}
    with pytest.raises(SpecError, match="declared twice"):
        parse_config({"embeddings": [entry, entry]})
    with pytest.raises(SpecError, match=r"field 'name'"):
        parse_config({"embeddings": [{**entry, "name": "x; DROP TABLE t"}]})


def test_spec_defaults():
    config = parse_config(
        {"embeddings": [{"name": "x", "table": "s.t", "key": "id", "modality": "tabular", "dim": 4, "columns": ["a"]}]}
    )
    spec = config.embeddings[0]
    assert (spec.distance, spec.index.kind, spec.encoder_type) == ("cosine", "hnsw", "autoencoder")
    assert (spec.source_schema, spec.source_name, spec.target_name) == ("s", "t", "x_embeddings")


def test_relative_base_dir_is_relative_to_the_config_file(tmp_path, monkeypatch):
    from vectorsync.sync.spec import load_config

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "vectorsync.toml").write_text(
        '[[embeddings]]\nname = "pics"\ntable = "pics"\nkey = "id"\nmodality = "image"\ndim = 8\n'
        'path_column = "path"\nbase_dir = "images"\n'
    )
    monkeypatch.chdir(tmp_path)
    (spec,) = load_config(folder / "vectorsync.toml").embeddings
    assert spec.base_dir == str(folder / "images")


def test_missing_config_is_one_clear_line(cli, tmp_path):
    result = cli("sync", config=tmp_path / "absent.toml")
    assert result.code == 1
    assert "config file" in result.err and "not found" in result.err
    assert "Traceback" not in result.err


# --- migrations --------------------------------------------------------------------------------


def test_migrate_reports_unknown_table_and_column_before_changing_anything(conn, write_config, cli):
    conn.execute("CREATE TABLE items (id int PRIMARY KEY, price real)")
    config = write_config(
        """
        [[embeddings]]
        name = "items"
        table = "items"
        key = "id"
        modality = "tabular"
        dim = 4
        columns = ["price", "colour"]

        [[embeddings]]
        name = "ghost"
        table = "nowhere"
        key = "id"
        modality = "tabular"
        dim = 4
        columns = ["a"]
        """
    )
    result = cli("migrate", config=config)
    assert result.code == 1
    assert "column 'colour' not found in table 'items'" in result.err
    assert "table 'nowhere' does not exist" in result.err
    assert conn.execute("SELECT to_regnamespace('vectorsync')").fetchone()[0] is None


def test_migrate_twice_changes_nothing_and_downgrade_keeps_user_data(conn, write_config, cli):
    conn.execute("CREATE TABLE items (id int PRIMARY KEY, price real, kind text)")
    conn.execute("INSERT INTO items VALUES (1, 2.5, 'a'), (2, 3.5, 'b')")
    config = write_config(
        """
        [[embeddings]]
        name = "items"
        table = "items"
        key = "id"
        modality = "tabular"
        dim = 4
        columns = ["price", "kind"]
        """
    )
    assert cli("migrate", config=config).code == 0

    def snapshot():
        return conn.execute(
            "SELECT (SELECT xmin::text FROM vectorsync.embeddings), "
            "(SELECT array_agg(tgname::text || ':' || oid::text ORDER BY tgname) FROM pg_trigger "
            " WHERE tgrelid = 'items'::regclass), "
            "(SELECT array_agg(indexname::text ORDER BY indexname) FROM pg_indexes "
            " WHERE schemaname = 'vectorsync' AND tablename = 'items_g1'), "
            "(SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            " WHERE attrelid = 'vectorsync.items_g1'::regclass AND attname = 'embedding')"
        ).fetchone()

    first = snapshot()
    assert [t.split(":")[0] for t in first[1]] == [
        "vectorsync_items_delete",
        "vectorsync_items_insert",
        "vectorsync_items_truncate",
        "vectorsync_items_update",
    ]
    assert "items_g1_embedding_idx" in first[2]
    assert first[3] == "vector(4)"
    second_run = cli("migrate", config=config)
    assert second_run.code == 0 and "up to date" in second_run.err
    assert snapshot() == first

    assert cli("migrate", "--downgrade", config=config).code == 0
    assert conn.execute("SELECT to_regnamespace('vectorsync'), to_regclass('items_embeddings')").fetchone() == (
        None,
        None,
    )
    assert (
        conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'items'::regclass AND NOT tgisinternal"
        ).fetchone()[0]
        == 0
    )
    assert conn.execute("SELECT id, price, kind FROM items ORDER BY id").fetchall() == [(1, 2.5, "a"), (2, 3.5, "b")]


def test_changing_dim_starts_a_new_generation_and_the_old_one_keeps_serving(conn, write_config, cli):
    conn.execute("CREATE TABLE items (id int PRIMARY KEY, price real)")
    body = """
        [[embeddings]]
        name = "items"
        table = "items"
        key = "id"
        modality = "tabular"
        dim = {dim}
        columns = ["price"]
        """
    assert cli("migrate", config=write_config(body.format(dim=4))).code == 0
    config = write_config(body.format(dim=8))
    assert cli("migrate", config=config).code == 0
    assert cli("migrate", config=config).code == 0  # still one generation being built
    assert conn.execute(
        "SELECT generation, state, dim, format_type(a.atttypid, a.atttypmod) FROM vectorsync.generations g "
        "JOIN pg_attribute a ON a.attrelid = to_regclass(format('%I.%I', g.table_schema, g.table_name)) "
        "AND a.attname = 'embedding' ORDER BY generation"
    ).fetchall() == [(1, "serving", 4, "vector(4)"), (2, "building", 8, "vector(8)")]
    assert conn.execute("SELECT count(*) FROM items_embeddings").fetchone()[0] == 0  # the view reads generation 1


# --- train → sync → search ----------------------------------------------------------------------


def test_train_sync_search_agrees_with_labels(conn, digits_project, cli):
    labels = dict(conn.execute("SELECT id::text, label FROM digits").fetchall())
    assert conn.execute("SELECT count(*) FROM digits_embeddings").fetchone()[0] == len(labels)
    agreement = nearest_label_agreement(conn, "digits", labels, step=9)
    print(f"digits tabular autoencoder kNN(5) label agreement: {agreement:.3f} (chance 0.10)")
    assert agreement > 0.6

    result = cli("search", "digits", "7", "-k", "4", "--json", config=digits_project)
    assert result.code == 0, result.err
    found = json.loads(result.out)
    assert len(found) == 4 and "7" not in [f["key"] for f in found]
    assert [f["distance"] for f in found] == sorted(f["distance"] for f in found)


def test_model_metrics_and_version_are_recorded(conn, digits_project):
    version, metrics, encoder_type = conn.execute(
        "SELECT version, metrics, encoder_type FROM vectorsync.models WHERE embedding = 'digits'"
    ).fetchone()
    assert version == 1 and encoder_type == "autoencoder"
    assert 0 < metrics["holdout_reconstruction_mse"] < 2
    assert conn.execute("SELECT DISTINCT model_version FROM digits_embeddings").fetchall() == [(1,)]


def test_training_is_deterministic_for_a_seed(conn, digits_project, cli):
    before = dict(conn.execute("SELECT id, embedding::real[] FROM digits_embeddings").fetchall())
    assert cli("train", "digits", config=digits_project).code == 0
    assert cli("sync", config=digits_project).code == 0
    after = dict(conn.execute("SELECT id, embedding::real[] FROM digits_embeddings").fetchall())
    assert conn.execute("SELECT DISTINCT model_version FROM digits_embeddings").fetchall() == [(2,)]
    assert all(np.allclose(before[k], after[k], atol=1e-5) for k in before)


def test_second_sync_does_nothing(conn, digits_project, cli):
    stamps = embedded_at(conn)
    result = cli("sync", config=digits_project)
    assert result.code == 0
    assert "queued 0, embedded 0, failed 0, deleted 0" in result.err
    assert embedded_at(conn) == stamps


def test_updating_an_input_column_reembeds_only_that_row(conn, digits_project, cli):
    stamps = embedded_at(conn)
    conn.execute('UPDATE digits SET "p10" = "p10" + 5 WHERE id = 42')
    assert conn.execute("SELECT key FROM vectorsync.pending").fetchall() == [("42",)]
    assert cli("sync", config=digits_project).code == 0
    after = embedded_at(conn)
    assert [k for k in stamps if after[k] != stamps[k]] == [42]


def test_updating_other_columns_or_same_values_enqueues_nothing(conn, digits_project):
    stamps = embedded_at(conn)
    conn.execute("UPDATE digits SET note = 'seen', label = label WHERE id < 100")
    conn.execute('UPDATE digits SET "p5" = "p5" WHERE id < 100')
    assert conn.execute("SELECT count(*) FROM vectorsync.pending").fetchone()[0] == 0
    assert embedded_at(conn) == stamps


def test_delete_removes_the_embedding(conn, digits_project):
    conn.execute("DELETE FROM digits WHERE id IN (3, 4)")
    keys = {r[0] for r in conn.execute("SELECT id FROM digits_embeddings")}
    assert 3 not in keys and 4 not in keys and 5 in keys


def test_truncate_clears_embeddings(conn, digits_project):
    conn.execute("TRUNCATE digits")
    assert conn.execute("SELECT count(*) FROM digits_embeddings").fetchone()[0] == 0


def test_status_reports_counts(conn, digits_project, cli):
    conn.execute('UPDATE digits SET "p10" = "p10" + 1 WHERE id < 5')
    result = cli("status", "--json", config=digits_project)
    assert result.code == 0
    (row,) = json.loads(result.out)["embeddings"]
    assert (row["source_rows"], row["embedded"], row["pending"], row["failed"], row["model_version"]) == (
        900,
        900,
        5,
        0,
        1,
    )


# --- awkward names and bad input ----------------------------------------------------------------


def test_names_with_spaces_quotes_and_capitals_work_end_to_end(conn, write_config, cli):
    conn.execute('CREATE SCHEMA "My Schema"')
    conn.execute(
        'CREATE TABLE "My Schema"."Odd ""Table""" ("Key Col" text PRIMARY KEY, "Price $" real, "kind; DROP" text)'
    )
    rows = [(f"k'{i}", float(i % 7), ["red", "green", "blue"][i % 3]) for i in range(60)]
    with conn.cursor() as cur:
        cur.executemany('INSERT INTO "My Schema"."Odd ""Table""" VALUES (%s, %s, %s)', rows)
    config = write_config(
        '''
        [[embeddings]]
        name = "odd"
        table = '"My Schema"."Odd ""Table"""'
        key = "Key Col"
        modality = "tabular"
        dim = 3
        columns = ["Price $", "kind; DROP"]
        target = '"My Schema"."Vectors of ""odd"""'
        encoder = { epochs = 5 }
        '''
    )
    assert cli("migrate", config=config).code == 0
    assert cli("train", "odd", config=config).code == 0
    assert cli("sync", config=config).code == 0
    assert conn.execute('SELECT count(*) FROM "My Schema"."Vectors of ""odd"""').fetchone()[0] == 60
    conn.execute('UPDATE "My Schema"."Odd ""Table""" SET "Price $" = 100 WHERE "Key Col" = %s', ("k'5",))
    assert conn.execute("SELECT key FROM vectorsync.pending").fetchall() == [("k'5",)]
    result = cli("search", "odd", "k'5", "-k", "3", "--json", config=config)
    assert result.code == 0 and len(json.loads(result.out)) == 3


def test_non_finite_values_fail_with_row_and_column(conn, write_config, cli):
    conn.execute("CREATE TABLE m (id int PRIMARY KEY, a double precision, b double precision)")
    conn.execute("INSERT INTO m SELECT g, g, g % 5 FROM generate_series(1, 50) g")
    conn.execute("UPDATE m SET a = NULL WHERE id = 2")
    config = write_config(
        """
        [worker]
        max_attempts = 1

        [[embeddings]]
        name = "m"
        table = "m"
        key = "id"
        modality = "tabular"
        dim = 2
        columns = ["a", "b"]
        encoder = { epochs = 3 }
        """
    )
    assert cli("migrate", config=config).code == 0
    assert cli("train", "m", config=config).code == 0
    conn.execute("UPDATE m SET b = 'NaN' WHERE id = 7")
    conn.execute("UPDATE m SET a = 'Infinity' WHERE id = 9")
    assert cli("sync", config=config).code == 1  # rows failed: the exit status says so
    failed = conn.execute("SELECT key, column_name, error FROM vectorsync.failed ORDER BY key").fetchall()
    assert [(k, c) for k, c, _ in failed] == [("7", "b"), ("9", "a")]
    assert all("not finite" in e for _, _, e in failed)
    assert conn.execute("SELECT count(*) FROM m_embeddings").fetchone()[0] == 48  # NULL in row 2 is imputed


def test_unreachable_server_is_one_clear_line(cli, write_config, monkeypatch):
    config = write_config("")
    monkeypatch.setenv("VECTORSYNC_DATABASE_URL", "postgresql://nobody:wrong@127.0.0.1:9/none")
    result = cli("status", config=config)
    assert result.code == 1
    assert "cannot connect to the database" in result.err and "***" in result.err
    assert "Traceback" not in result.err and len(result.err.strip().splitlines()) <= 2


@pytest.fixture(scope="module")
def server_without_pgvector():
    """A real PostgreSQL built from pgserver's binaries minus pgvector's files."""
    import pgserver

    root = Path(tempfile.mkdtemp(prefix="vs-novector-"))
    package = Path(pgserver.__file__).parent
    install = root / "pgserver" / "pginstall"  # the binaries find libpq at $ORIGIN/../../../pgserver.libs
    shutil.copytree(package / "pginstall", install, ignore=shutil.ignore_patterns("vector*"))
    shutil.copytree(package.parent / "pgserver.libs", root / "pgserver.libs")
    data = root / "data"
    # PostgreSQL refuses to run as root; pgserver runs it as its own 'pgserver' user, so do we.
    user = ["runuser", "-u", "pgserver", "--"] if os.geteuid() == 0 else []
    root.chmod(0o755)
    if user:
        shutil.chown(root, "pgserver")
    port = "54329"

    def pg(*args: str) -> None:
        subprocess.run([*user, *args], check=True, capture_output=True, cwd=root)

    pg(str(install / "bin" / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres")
    pg(
        str(install / "bin" / "pg_ctl"),
        "-D",
        str(data),
        "-w",
        "-l",
        str(root / "log"),
        "-o",
        f"-p {port} -k {root} -h 127.0.0.1",
        "start",
    )
    yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    pg(str(install / "bin" / "pg_ctl"), "-D", str(data), "-w", "stop")
    shutil.rmtree(root, ignore_errors=True)


def test_server_without_pgvector_gives_clear_error(server_without_pgvector, write_config, cli, monkeypatch):
    monkeypatch.setenv("VECTORSYNC_DATABASE_URL", server_without_pgvector)
    result = cli("migrate", config=write_config(""))
    assert result.code == 1
    assert "no 'vector' extension available" in result.err and "install pgvector" in result.err
    assert "Traceback" not in result.err


# --- Alembic in the user's project --------------------------------------------------------------


def test_alembic_autogenerate_sees_no_spurious_diff_for_vector_columns(db_url, conn, digits_project):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from pgvector.sqlalchemy import Vector
    from sqlalchemy import Column, Integer, MetaData, Table, Text

    from vectorsync.migrations.autogenerate import include_object
    from vectorsync.sync.schema import engine_for

    metadata = MetaData()
    Table(
        "documents",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("body", Text),
        Column("embedding", Vector(3)),
    )
    engine = engine_for(db_url)
    metadata.create_all(engine)
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"include_schemas": True, "include_object": include_object, "compare_type": True}
        )
        diff = compare_metadata(context, metadata)
    engine.dispose()
    # The user's own tables (digits) are not in this metadata, so only they may show up as removals.
    unexpected = [d for d in diff if not (d[0] == "remove_table" and d[1].name == "digits")]
    assert unexpected == []


# --- the main job -------------------------------------------------------------------------------


def test_demo_runs_and_runs_again(conn, cli, tmp_path):
    first = cli("demo", "-k", "3", config=tmp_path / "none.toml")
    assert first.code == 0, first.err
    assert "neighbours sharing the cultivar" in first.out
    agreement = float(first.out.split("neighbours sharing the cultivar: ")[1].split("%")[0])
    assert agreement > 80  # chance is about 34 %
    second = cli("demo", "-k", "3", config=tmp_path / "none.toml")
    assert second.code == 0, second.err
    assert conn.execute("SELECT max(version) FROM vectorsync.models WHERE embedding = 'demo_wine'").fetchone()[0] == 2
    assert conn.execute("SELECT count(*) FROM demo_wine_embeddings WHERE model_version = 2").fetchone()[0] == 178
