"""Similarity-query latency through the ORM helper against the same SQL through psycopg, and recall.

100k vectors (10k with --quick) of dimension 64 in gaussian clusters are written with the sink's
binary COPY, then the HNSW index is built once (as sync does after a backfill), at the spec's
defaults (m=16, ef_construction=64, ef_search=40).

Latency against the idiom: ``nearest(Doc, to=vector, k=10)`` and ``similar_to(doc, k=10)`` through a
Session, against the query a user writes by hand with pgvector-python's comparator
(``select(Doc, E.embedding.cosine_distance(q)).join(E).order_by(...).limit(k)``) in the same kind of
Session, interleaved (target: at most 1.10x).

Latency against the driver: for each query vector, ``nearest(Doc, to=vector, k=10)`` through a SQLAlchemy Session, the
same statement built once with a bind parameter and reused, and the same SQL text (compiled from
that statement) through a plain psycopg connection, interleaved, each in its own transaction
(BEGIN, SELECT, ROLLBACK on every side), one client. The baseline is the psycopg call; the ratio is
the ORM's cost over it (target: at most 1.10).

Recall@10: the index's top 10 against exact search (numpy) for the same queries, at the default
ef_search and at 100.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from sqlalchemy import Text, bindparam, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from benchmarks.common import Figure, scratch_database, timer
from vectorsync.embedding_sql import Vector, attach_embedding, nearest, similar_to
from vectorsync.embedding_sql.orm import embedding_info
from vectorsync.sync import catalog, schema, sink
from vectorsync.sync.bulk import create_index, drop_index
from vectorsync.sync.spec import parse_config

NAME = "query"
DIM = 64
K = 10


class Base(DeclarativeBase):
    pass


class Doc(Base):
    __tablename__ = "docs"

    id: Mapped[int] = mapped_column(primary_key=True)
    category: Mapped[str] = mapped_column(Text)


attach_embedding(Doc, "docs", dim=DIM)


def vectors(n: int, seed: int, centers: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (centers[rng.integers(0, len(centers), n)] + rng.normal(size=(n, DIM))).astype(np.float32)


def load(url: str, rows: int, data: np.ndarray) -> tuple[float, float]:
    """Table, embedding, vectors and index; returns (COPY seconds, index build seconds)."""
    config = parse_config({"embeddings": [{"name": "docs", "table": "docs", "key": "id", "modality": "tabular",
                                           "dim": DIM, "columns": ["category"]}]})
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id integer PRIMARY KEY, category text NOT NULL)")
        conn.execute("INSERT INTO docs SELECT g, 'c' || (g %% 10) FROM generate_series(0, %s) g", (rows - 1,))
        schema.upgrade(url, config)
        conn.execute("TRUNCATE vectorsync.queue, vectorsync.changes")
        emb = catalog.load(conn, config.embeddings[0])
        drop_index(conn, emb)
        with timer() as copy_time, conn.transaction():
            for start in range(0, rows, 20_000):
                chunk = data[start:start + 20_000]
                sink.upsert(conn, emb, [str(i) for i in range(start, start + len(chunk))], chunk, 1)
        conn.execute("SET maintenance_work_mem = '1GB'")  # the graph fits in memory: a one-pass build
        with timer() as build_time:
            create_index(conn, emb)
        conn.execute("ANALYZE docs, docs_embeddings")
    return copy_time[0], build_time[0]


def percentile(samples: list[float], q: float) -> float:
    return float(np.percentile(np.array(samples) * 1000, q))


def run(data_dir: Path, quick: bool) -> list[Figure]:
    rows, queries = (10_000, 300) if quick else (100_000, 2_000)
    centers = np.random.default_rng(0).normal(size=(1000, DIM)) * 2
    data = vectors(rows, 1, centers)
    probes = vectors(queries, 2, centers)
    with scratch_database(data_dir) as url:
        copy_seconds, build_seconds = load(url, rows, data)
        engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(url))
        raw = psycopg.connect(url)
        register_vector(raw)
        statement = nearest(Doc, to=probes[0], k=K)
        compiled = statement.compile(engine)
        raw_sql = str(compiled)  # the same text the ORM sends, with %(name)s placeholders

        def orm_query(q: np.ndarray) -> list[int]:
            with Session(engine) as session:
                return [doc.id for doc, _ in session.execute(nearest(Doc, to=q, k=K)).all()]

        reusable = nearest(Doc, to=bindparam("query", type_=Vector(DIM)), k=K)

        def orm_reused(q: np.ndarray) -> list[int]:
            with Session(engine) as session:
                return [doc.id for doc, _ in session.execute(reusable, {"query": q}).all()]

        row_class = embedding_info(Doc).row_class

        def idiom(q: np.ndarray) -> list[int]:
            """What a user writes by hand with pgvector-python's comparator, in the same Session."""
            with Session(engine) as session:
                stmt = (
                    select(Doc, row_class.embedding.cosine_distance(q).label("distance"))
                    .join(row_class, Doc.id == row_class.id)
                    .order_by(row_class.embedding.cosine_distance(q))
                    .limit(K)
                )
                return [doc.id for doc, _ in session.execute(stmt).all()]

        def similar(q: np.ndarray, session: Session, anchor: Doc) -> list[int]:
            return [doc.id for doc, _ in session.execute(similar_to(anchor, k=K)).all()]

        def idiom_similar(session: Session, anchor: Doc) -> list[int]:
            own = select(row_class.embedding).where(row_class.id == anchor.id).scalar_subquery()
            stmt = (
                select(Doc, row_class.embedding.cosine_distance(own).label("distance"))
                .join(row_class, Doc.id == row_class.id)
                .where(Doc.id != anchor.id)
                .order_by(row_class.embedding.cosine_distance(own))
                .limit(K)
            )
            return [doc.id for doc, _ in session.execute(stmt).all()]

        def raw_query(q: np.ndarray) -> list[int]:
            params = {**compiled.params, "param_1": q}
            result = [row[0] for row in raw.execute(raw_sql, params).fetchall()]
            raw.rollback()
            return result

        for q in probes[:50]:  # warm caches and the pool
            orm_query(q)
            orm_reused(q)
            raw_query(q)
            idiom(q)
        orm_times: list[float] = []
        reused_times: list[float] = []
        raw_times: list[float] = []
        idiom_times: list[float] = []
        similar_times: list[float] = []
        idiom_similar_times: list[float] = []
        found: list[list[int]] = []
        anchors = [int(i) for i in np.random.default_rng(3).integers(0, rows, len(probes))]
        for q, anchor_id in zip(probes, anchors, strict=True):  # interleaved: every variant meets the same state
            started = time.perf_counter()
            by_hand = idiom(q)
            idiom_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            found.append(orm_query(q))
            orm_times.append(time.perf_counter() - started)
            assert by_hand == found[-1], "nearest() and the hand-written idiom disagree"
            with Session(engine) as session:
                anchor = session.get(Doc, anchor_id)
                started = time.perf_counter()
                neighbours = similar(q, session, anchor)
                similar_times.append(time.perf_counter() - started)
            with Session(engine) as session:
                anchor = session.get(Doc, anchor_id)
                started = time.perf_counter()
                assert idiom_similar(session, anchor) == neighbours, "similar_to() and the idiom disagree"
                idiom_similar_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            same_reused = orm_reused(q)
            reused_times.append(time.perf_counter() - started)
            started = time.perf_counter()
            same_raw = raw_query(q)
            raw_times.append(time.perf_counter() - started)
            assert same_raw == found[-1] == same_reused, "the ORM helper and its SQL disagree"
        with psycopg.connect(url) as conn:
            register_vector(conn)
            conn.execute("SET hnsw.ef_search = 100")
            wide = [[r[0] for r in conn.execute(raw_sql, {**compiled.params, "param_1": q}).fetchall()] for q in probes]
        raw.close()
        engine.dispose()

    norms = np.linalg.norm(data, axis=1)

    def recall(results: list[list[int]]) -> float:
        hits = 0
        for q, got in zip(probes, results, strict=True):
            exact = np.argsort(1 - data @ q / (norms * np.linalg.norm(q)))[:K]
            hits += len(set(exact.tolist()) & set(got))
        return 100.0 * hits / (K * len(probes))

    size = f"{rows // 1000}k x {DIM}"
    orm_mean, reused_mean, raw_mean = (float(np.mean(t)) for t in (orm_times, reused_times, raw_times))
    return [
        Figure(NAME, f"p50 latency, nearest() via ORM Session, k={K}, {size}", percentile(orm_times, 50), "ms",
               "hand-written pgvector comparator query, same Session", percentile(idiom_times, 50), "ratio <= 1.10"),
        Figure(NAME, f"p50 latency, similar_to() via ORM Session, k={K}, {size}", percentile(similar_times, 50),
               "ms", "hand-written pgvector comparator query, same Session", percentile(idiom_similar_times, 50),
               "ratio <= 1.10"),
        Figure(NAME, f"p50 latency, nearest() via ORM Session vs the driver, k={K}, {size}",
               percentile(orm_times, 50), "ms", "same SQL via psycopg", percentile(raw_times, 50), "ratio <= 1.10"),
        Figure(NAME, f"p99 latency, nearest() via ORM Session vs the driver, k={K}, {size}",
               percentile(orm_times, 99), "ms", "same SQL via psycopg", percentile(raw_times, 99), "ratio <= 1.10"),
        Figure(NAME, f"QPS, one client, ORM, {size}", 1 / orm_mean, "queries/s",
               "same SQL via psycopg", 1 / raw_mean),
        Figure(NAME, "ORM overhead over psycopg (mean latency)", 100 * (orm_mean / raw_mean - 1), "%",
               target="<= 10%"),
        Figure(NAME, f"p50 latency, one reused nearest() statement (bindparam), {size}",
               percentile(reused_times, 50), "ms", "same SQL via psycopg", percentile(raw_times, 50), "ratio <= 1.10"),
        Figure(NAME, "ORM overhead over psycopg, reused statement (mean latency)",
               100 * (reused_mean / raw_mean - 1), "%", target="<= 10%"),
        Figure(NAME, f"recall@10, HNSW m=16 ef_construction=64 ef_search=40, {size}", recall(found), "%",
               "exact search", 100.0, ">= 95%"),
        Figure(NAME, f"recall@10, ef_search=100, {size}", recall(wide), "%", "exact search", 100.0),
        Figure(NAME, f"HNSW index build after loading, {size}", build_seconds, "s",
               "binary COPY of the vectors", copy_seconds),
    ]
