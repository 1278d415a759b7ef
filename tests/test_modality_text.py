"""Text modality end to end through the database: a text column or referenced text files →
``vectorsync migrate``, ``train``, ``sync`` → similarity search in SQL.

Data: a generated labelled corpus (``tests/text_data.py``); no third-party text is committed.
"""

from __future__ import annotations

import numpy as np
import psycopg
from psycopg import sql

from tests.pg_support import nearest_label_agreement
from tests.text_data import LABELS, knn_label_agreement, long_text, make_corpus

WORKER = """
[worker]
max_attempts = 1
"""

TEXT_SPEC = """
[[embeddings]]
name = "{name}"
table = "{table}"
key = "id"
modality = "text"
dim = {dim}
{input}
{extra}
encoder = {encoder}
"""
LSTM = "{ seed = 0, epochs = 4 }"
MINILM = '{ type = "minilm" }'


def spec(name: str, table: str, input_line: str, encoder: str, *, dim: int = 64, extra: str = "") -> str:
    return TEXT_SPEC.format(name=name, table=table, input=input_line, encoder=encoder, dim=dim, extra=extra)


def run_ok(cli, *args: str, config) -> None:
    result = cli(*args, config=config)
    assert result.code == 0, result.err




def vectors(conn: psycopg.Connection, table: str) -> dict[int, np.ndarray]:
    rows = conn.execute(sql.SQL("SELECT id, embedding::real[] FROM {}").format(sql.Identifier(table))).fetchall()
    return {key: np.asarray(vector, dtype=np.float32) for key, vector in rows}


def failed_rows(conn: psycopg.Connection, name: str) -> dict[str, tuple[str, str, int]]:
    rows = conn.execute(
        "SELECT key, column_name, error, attempts FROM vectorsync.failed WHERE embedding = %s", (name,)
    ).fetchall()
    return {key: (column, error, attempts) for key, column, error, attempts in rows}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- a text column: LSTM and MiniLM --------------------------------------------------------------


def test_lstm_and_minilm_neighbours_share_the_topic(conn, write_config, cli):
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts, labels = make_corpus(800)
    conn.execute("CREATE TABLE articles (id int PRIMARY KEY, topic text, body text)")
    with conn.cursor() as cur:
        rows = [(i, LABELS[label], text) for i, (text, label) in enumerate(zip(texts, labels, strict=True))]
        cur.executemany("INSERT INTO articles VALUES (%s, %s, %s)", rows)
        cur.execute("INSERT INTO articles VALUES (%s, %s, %s)", (10_000, "finance", long_text()))
    chunked = 'max_tokens = 32\nlong_text = "chunk"'
    config = write_config(
        spec("articles", "articles", 'column = "body"', LSTM, extra=chunked)
        + spec("articles_minilm", "articles", 'column = "body"', MINILM, dim=384)
    )
    run_ok(cli, "migrate", config=config)
    run_ok(cli, "train", "articles", config=config)
    run_ok(cli, "sync", config=config)  # MiniLM is pretrained: no train step, version 1 on first sync

    assert conn.execute(
        "SELECT embedding, version, encoder_type FROM vectorsync.models ORDER BY embedding"
    ).fetchall() == [("articles", 1, "lstm"), ("articles_minilm", 1, "minilm")]
    for table in ("articles_embeddings", "articles_minilm_embeddings"):
        assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()[0] == 801
    # The long text (one cooking sentence, then finance) is embedded whole, in chunks, not dropped.
    assert 10_000 in vectors(conn, "articles_embeddings")

    topic = {str(i): int(label) for i, label in enumerate(labels)}
    lstm = nearest_label_agreement(conn, "articles", topic | {"10000": LABELS.index("finance")}, step=8)
    minilm = nearest_label_agreement(conn, "articles_minilm", topic | {"10000": LABELS.index("finance")}, step=8)
    tfidf = knn_label_agreement(
        TruncatedSVD(64, random_state=0).fit_transform(TfidfVectorizer(sublinear_tf=True).fit_transform(texts)), labels
    )
    chance = 1 / len(LABELS)
    print(f"\ntext kNN(5) topic agreement via vectorsync.nearest on {len(texts)} texts (chance {chance:.2f}): "
          f"lstm 64d {lstm:.3f}, minilm 384d {minilm:.3f}; tf-idf+svd 64d baseline (in memory) {tfidf:.3f}")
    assert lstm > 2.5 * chance
    assert minilm > 2 * chance


def test_long_text_is_chunked_and_covers_the_whole_text(conn, write_config, cli):
    texts, labels = make_corpus(200, seed=11)
    conn.execute("CREATE TABLE posts (id int PRIMARY KEY, body text)")
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO posts VALUES (%s, %s)", list(enumerate(texts)))
        cur.execute("INSERT INTO posts VALUES (%s, %s)", (10_000, long_text()))
    config = write_config(
        spec("cut", "posts", 'column = "body"', MINILM, dim=384, extra='max_tokens = 24\nlong_text = "truncate"')
        + spec("whole", "posts", 'column = "body"', MINILM, dim=384, extra='max_tokens = 24\nlong_text = "chunk"')
    )
    run_ok(cli, "migrate", config=config)
    run_ok(cli, "sync", config=config)

    cut, whole = vectors(conn, "cut_embeddings"), vectors(conn, "whole_embeddings")
    assert 10_000 in cut and 10_000 in whole
    # Mostly about finance: only the chunked vector, which saw all of it, sits nearer finance than cooking.
    finance = np.mean([whole[i] for i, label in enumerate(labels) if LABELS[label] == "finance"], axis=0)
    cooking = np.mean([whole[i] for i, label in enumerate(labels) if LABELS[label] == "cooking"], axis=0)
    assert cosine(whole[10_000], finance) > cosine(whole[10_000], cooking)
    assert cosine(whole[10_000], finance) > cosine(cut[10_000], finance)


# --- referenced text files ------------------------------------------------------------------------


def test_text_files_are_read_with_the_spec_encoding_and_bad_files_fail_with_reasons(conn, write_config, cli, tmp_path):
    texts, _ = make_corpus(150, seed=5)
    texts[0] = "Le café du chef: a crème brûlée for 5 €."  # needs the spec's encoding to read right
    base = tmp_path / "notes"
    (base / "2024").mkdir(parents=True)
    for i, text in enumerate(texts):
        (base / "2024" / f"{i}.txt").write_bytes(text.encode("cp1252"))
    (base / "undecodable.txt").write_bytes(b"caf\x81 \x8d")  # bytes cp1252 leaves undefined
    (base / "empty.txt").write_bytes(b"")
    (base / "blank.txt").write_bytes(b"  \n\t \n")
    (tmp_path / "outside.txt").write_text("a file outside base_dir")
    bad = {
        1001: ("2024/missing.txt", "file not found"),
        1002: ("undecodable.txt", "is not valid cp1252"),
        1003: ("empty.txt", "empty text"),
        1004: ("blank.txt", "empty text"),
        1005: ("../outside.txt", "points outside base_dir"),
        1006: (None, "the reference is empty"),
    }
    conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text, path text)")
    rows = [(i, text, f"2024/{i}.txt") for i, text in enumerate(texts)] + [(k, None, p) for k, (p, _) in bad.items()]
    rows.sort(key=lambda row: row[0] % 4)  # bad rows are spread among good ones
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO notes VALUES (%s, %s, %s)", rows)
    files = f'path_column = "path"\nbase_dir = "{base}"'
    config = write_config(
        WORKER
        + spec("in_row", "notes", 'column = "body"', MINILM, dim=384)
        + spec("from_files", "notes", files, MINILM, dim=384, extra='encoding = "cp1252"')
        + spec("files_lstm", "notes", files, "{ seed = 0, epochs = 1 }", dim=32, extra='encoding = "cp1252"')
    )
    run_ok(cli, "migrate", config=config)
    run_ok(cli, "train", "files_lstm", config=config)  # trains on the readable files, skips the others
    assert cli("sync", config=config).code == 1  # the unreadable files' rows fail, and sync says so

    in_row, from_files = vectors(conn, "in_row_embeddings"), vectors(conn, "from_files_embeddings")
    assert set(from_files) == set(range(len(texts))) == set(vectors(conn, "files_lstm_embeddings"))
    for key in from_files:  # the file, decoded as cp1252, is exactly the text held in the row
        np.testing.assert_allclose(from_files[key], in_row[key], atol=1e-5)
    for name in ("from_files", "files_lstm"):
        failed = failed_rows(conn, name)
        assert set(failed) == {str(key) for key in bad}
        for key, (_, reason) in bad.items():
            column, error, attempts = failed[str(key)]
            assert (column, attempts) == ("path", 1)
            assert reason in error, error
    assert conn.execute("SELECT count(*) FROM vectorsync.pending").fetchone()[0] == 0
