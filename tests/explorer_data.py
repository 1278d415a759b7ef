"""A database holding every modality `vectorsync init`, the UI and reports look at: the demo's wine
table, digit images in ``bytea`` and as files referenced by path, a labelled text corpus (with one
row whose text is a script tag), a citation graph, and a table without a primary key."""

from __future__ import annotations

from pathlib import Path

import psycopg

from tests.test_modality_image import digit_images
from tests.text_data import LABELS, make_corpus

XSS = "<script>window.__vectorsync_xss = 1</script> an article about the match, the goal and the league"
DIGITS = 300
PHOTOS = 40
ARTICLES = 300
PAPERS = 60


def load(conn: psycopg.Connection, folder: Path) -> None:
    """Create and fill the tables; image files go under ``folder/photos``."""
    from vectorsync.sync.demo import load_wine_table

    load_wine_table(conn)
    images, labels = digit_images(DIGITS)
    conn.execute("CREATE TABLE digits (id int PRIMARY KEY, label int NOT NULL, image bytea)")
    with conn.cursor().copy("COPY digits (id, label, image) FROM STDIN") as copy:
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            copy.write_row([i, label, image])
    photos = folder / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    conn.execute("CREATE TABLE photos (id int PRIMARY KEY, path text NOT NULL)")
    for i in range(PHOTOS):
        (photos / f"digit_{i}.png").write_bytes(images[i])
        conn.execute("INSERT INTO photos VALUES (%s, %s)", (i, f"photos/digit_{i}.png"))
    texts, topics = make_corpus(ARTICLES, seed=3)
    conn.execute("CREATE TABLE articles (id int PRIMARY KEY, topic text NOT NULL, body text NOT NULL)")
    with conn.cursor().copy("COPY articles (id, topic, body) FROM STDIN") as copy:
        for i, (text, topic) in enumerate(zip(texts, topics, strict=True)):
            copy.write_row([i, LABELS[topic], text if i else XSS])
    conn.execute("CREATE TABLE papers (id int PRIMARY KEY, title text UNIQUE NOT NULL, community int NOT NULL)")
    conn.execute(
        "CREATE TABLE citations (id serial PRIMARY KEY, citing int NOT NULL REFERENCES papers, "
        "cited int NOT NULL REFERENCES papers)"
    )
    conn.execute("INSERT INTO papers SELECT i, 'paper ' || i, i %% 2 FROM generate_series(0, %s) i", (PAPERS - 1,))
    # two communities of papers that cite within themselves
    conn.execute(
        "INSERT INTO citations (citing, cited) SELECT a, b FROM generate_series(0, %s) a, generate_series(0, %s) b "
        "WHERE a <> b AND a %% 2 = b %% 2 AND (a * 7 + b * 3) %% 5 = 0",
        (PAPERS - 1, PAPERS - 1),
    )
    conn.execute("CREATE TABLE readings (sensor text, value double precision)")
    conn.execute("INSERT INTO readings VALUES ('a', 1.0), ('b', 2.0)")
