"""Model generations: embed a new model into a table of its own, then swap it into service at once.

Each embedding has one generation *serving* (the table its target view and the query functions
read), at most one *building*, and *retired* ones kept for rollback. A generation is bound to one
model version, dim, distance and encoder type, so no table ever holds vectors of two models.

While a generation is being built, workers write every changed row into both live generations
(each with its own model) and backfill the building one in key order; when the backfill is done
the building generation gets its index, and the swap checks it misses no source row, drops the
vectors of rows deleted meanwhile, and replaces the target view, all in one transaction. Rollback
puts the previous generation back the same way and queues the rows that changed since it retired.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from vectorsync.embedding_sql.distance import Distance
from vectorsync.embedding_sql.storage import Storage
from vectorsync.errors import DatabaseError
from vectorsync.migrations import operations
from vectorsync.sync import indexing, queue, sink
from vectorsync.sync.catalog import Embedding
from vectorsync.sync.db import scalar
from vectorsync.sync.models import NoModel, ensure_model, new_encoder, store

log = logging.getLogger(__name__)


class GenerationError(DatabaseError):
    """A generation command cannot be carried out as asked (nothing to roll back to, say)."""


@dataclass(frozen=True)
class Generation:
    """One row of ``vectorsync.generations``."""

    embedding: str
    generation: int
    model_version: int | None
    dim: int
    distance: str
    storage: str
    encoder_type: str
    state: str
    table_schema: str
    table_name: str
    backfilled_to: str | None
    backfill_done: bool
    created_at: datetime
    started_at: datetime | None
    serving_since: datetime | None
    retired_at: datetime | None

    @property
    def table(self) -> sql.Identifier:
        return sql.Identifier(self.table_schema, self.table_name)


_COLUMNS = sql.SQL(", ").join(sql.Identifier(f.name) for f in dataclasses.fields(Generation))


def generations(conn: psycopg.Connection, name: str, *, states: tuple[str, ...] | None = None) -> list[Generation]:
    """The generations of embedding ``name``, newest first."""
    with conn.cursor(row_factory=class_row(Generation)) as cur:
        return cur.execute(
            sql.SQL(
                "SELECT {} FROM vectorsync.generations WHERE embedding = %s "
                "AND (%s::text[] IS NULL OR state = ANY(%s)) ORDER BY generation DESC"
            ).format(_COLUMNS),
            (name, list(states) if states else None, list(states) if states else None),
        ).fetchall()


def _one(conn: psycopg.Connection, name: str, state: str) -> Generation | None:
    found = generations(conn, name, states=(state,))
    return found[0] if found else None


def serving(conn: psycopg.Connection, name: str) -> Generation | None:
    return _one(conn, name, "serving")


def building(conn: psycopg.Connection, name: str) -> Generation | None:
    return _one(conn, name, "building")


def bind(emb: Embedding, gen: Generation) -> Embedding:
    """``emb`` writing to and reading from ``gen``: its table, dimension, distance, storage and
    model version."""
    spec = emb.spec.model_copy(update={"dim": gen.dim, "distance": gen.distance, "storage": gen.storage})
    return dataclasses.replace(
        emb,
        spec=spec,
        dim=gen.dim,
        distance=cast(Distance, gen.distance),
        storage=cast(Storage, gen.storage),
        target_schema=gen.table_schema,
        target_table=gen.table_name,
        current_version=gen.model_version,
    )


def _objects_for(emb: Embedding) -> Embedding:
    """``emb`` as the spec declares it: its target is the view users query."""
    return Embedding.from_spec(emb.spec, emb.source_schema, key_type=emb.key_type)


def _objects(emb: Embedding, gen: Generation) -> operations.EmbeddingObjects:
    return operations.generation_objects(_objects_for(emb), gen.generation, gen.dim, gen.distance, gen.storage)


def serving_target(conn: psycopg.Connection, emb: Embedding) -> Embedding:
    """``emb`` bound to its generation in service, which gets a model first if it has none (a
    pretrained encoder's is registered; a trainable one raises NoModel)."""
    gen = serving(conn, emb.name)
    if gen is None:
        raise GenerationError(f"embedding {emb.name!r} has no generation in service; run `vectorsync migrate`")
    if gen.model_version is None:
        with conn.transaction():
            start(conn, emb, ensure_model(conn, emb))
        gen = serving(conn, emb.name)
        assert gen is not None
    if gen.model_version is None:
        raise NoModel(f"embedding {emb.name!r} has no model for generation {gen.generation}; run `vectorsync train`")
    return bind(emb, gen)


def live(conn: psycopg.Connection, emb: Embedding) -> list[Embedding]:
    """``emb`` bound to each generation that must receive changes now: the serving one, then the
    one being built once it has a model."""
    targets = [serving_target(conn, emb)]
    gen = building(conn, emb.name)
    if gen is not None and gen.model_version is None:
        with conn.transaction():
            gen = with_pretrained_model(conn, emb, gen)
    if gen is not None and gen.model_version is not None:
        targets.append(bind(emb, gen))
    return targets


def with_pretrained_model(conn: psycopg.Connection, emb: Embedding, gen: Generation) -> Generation:
    """A generation started for a pretrained encoder gets its model on first use; a trainable
    encoder waits for ``vectorsync train``."""
    if emb.spec.encoder_type != gen.encoder_type or emb.spec.dim != gen.dim:
        return gen  # this process runs with an older config; a process with the new one provides it
    encoder = new_encoder(emb.spec)
    if encoder.trainable:
        return gen
    current = scalar(
        conn,
        "SELECT model_version FROM vectorsync.generations WHERE embedding = %s AND generation = %s FOR UPDATE",
        (emb.name, gen.generation),
    )
    if current is None:
        version = store(conn, emb, encoder, {}, None)
        _assign_model(conn, gen, version)
        return dataclasses.replace(gen, model_version=version)
    return dataclasses.replace(gen, model_version=current)


def _assign_model(conn: psycopg.Connection, gen: Generation, version: int) -> None:
    conn.execute(
        "UPDATE vectorsync.generations SET model_version = %s, started_at = now(), backfilled_to = NULL, "
        "backfill_done = false WHERE embedding = %s AND generation = %s",
        (version, gen.embedding, gen.generation),
    )


def start(conn: psycopg.Connection, emb: Embedding, version: int) -> Generation:
    """After model ``version`` was registered: the generation that will embed it. A serving
    generation with no vectors yet simply takes the model; otherwise a building generation does
    (a new one, or the one already being built, emptied). Call in the registering transaction."""
    conn.execute(
        "SELECT 1 FROM vectorsync.generations WHERE embedding = %s AND state IN ('serving', 'building') FOR UPDATE",
        (emb.name,),
    )
    current = serving(conn, emb.name)
    if current is None:
        raise GenerationError(f"embedding {emb.name!r} has no generation in service; run `vectorsync migrate`")
    shape = (emb.spec.dim, emb.spec.distance, emb.spec.storage, emb.spec.encoder_type)
    fits = (current.dim, current.distance, current.storage, current.encoder_type) == shape
    if fits and (current.model_version == version or _is_empty(conn, current)):
        _assign_model(conn, current, version)
        mark_backfilled(conn, current, None)  # the queue and sync fill the generation in service
        return dataclasses.replace(current, model_version=version)
    target = building(conn, emb.name)
    if target is None:
        objects = _objects_for(emb)
        with conn.cursor() as cur:
            operations.add_generation(cur, objects, "building", emb.key_sql_type.as_string(conn), with_index=False)
        target = building(conn, emb.name)
        assert target is not None
    else:
        conn.execute(sql.SQL("TRUNCATE {}").format(target.table))
    _assign_model(conn, target, version)
    queue.notify(conn, emb.name)
    return dataclasses.replace(target, model_version=version)


def _is_empty(conn: psycopg.Connection, gen: Generation) -> bool:
    return scalar(conn, sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {})").format(gen.table))


# --- building -----------------------------------------------------------------------------------


def may_build(conn: psycopg.Connection) -> bool:
    """Whether this session may build and swap generations: the catalogue's owner may (the worker
    role may not write the catalogue)."""
    return bool(scalar(conn, "SELECT has_table_privilege('vectorsync.generations', 'UPDATE')"))


def _lock_key(name: str) -> tuple[str]:
    return ("vectorsync.generation:" + name,)


def try_lock(conn: psycopg.Connection, name: str, *, transaction: bool = False) -> bool:
    """Whether this session now holds the lock that lets one process at a time build ``name``'s
    generation (until the transaction ends, or until ``unlock``)."""
    function = "pg_try_advisory_xact_lock" if transaction else "pg_try_advisory_lock"
    return bool(scalar(conn, sql.SQL("SELECT {}(hashtextextended(%s, 0))").format(sql.Identifier(function)),
                       _lock_key(name)))


def unlock(conn: psycopg.Connection, name: str) -> None:
    conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", _lock_key(name))


def next_keys(conn: psycopg.Connection, emb: Embedding, gen: Generation, limit: int) -> list[str]:
    """The next ``limit`` source keys after where ``gen``'s backfill stands, in key order."""
    after: sql.Composable = sql.SQL("")
    if gen.backfilled_to is not None:
        after = sql.SQL(" WHERE s.{} > CAST({} AS {})").format(
            emb.key, sql.Literal(gen.backfilled_to), emb.key_sql_type
        )
    return [
        row[0]
        for row in conn.execute(
            sql.SQL("SELECT s.{key}::text FROM {src} s{after} ORDER BY s.{key} LIMIT {n}").format(
                key=emb.key, src=emb.source, after=after, n=sql.Literal(limit)
            )
        ).fetchall()
    ]


def absent(conn: psycopg.Connection, target: Embedding, keys: list[str]) -> list[str]:
    """The ``keys`` with no vector in ``target``'s generation."""
    present = {
        row[0]
        for row in conn.execute(
            sql.SQL("SELECT {key}::text FROM {tgt} WHERE {key} = ANY(CAST(%s AS {karr}))").format(
                key=target.key, tgt=target.target, karr=target.key_array_type
            ),
            (keys,),
        ).fetchall()
    }
    return [k for k in keys if k not in present]


def mark_backfilled(conn: psycopg.Connection, gen: Generation, upto: str | None) -> None:
    """Record backfill progress: up to key ``upto``, or done when None."""
    conn.execute(
        "UPDATE vectorsync.generations SET backfilled_to = coalesce(%s, backfilled_to), backfill_done = %s "
        "WHERE embedding = %s AND generation = %s",
        (upto, upto is None, gen.embedding, gen.generation),
    )


def missing(conn: psycopg.Connection, emb: Embedding, gen: Generation) -> int:
    """Source rows with no vector in ``gen`` that are neither queued nor failed items."""
    return int(scalar(
        conn,
        sql.SQL(
            "SELECT count(*) FROM {src} s WHERE NOT EXISTS (SELECT 1 FROM {tgt} t WHERE t.{key} = s.{key}) "
            "AND NOT EXISTS (SELECT 1 FROM vectorsync.failed f WHERE f.embedding = %(name)s AND f.key = s.{key}::text) "
            "AND NOT EXISTS (SELECT 1 FROM vectorsync.queue q WHERE q.embedding = %(name)s AND q.key = s.{key}::text)"
        ).format(src=emb.source, tgt=gen.table, key=emb.key),
        {"name": emb.name},
    ))


def build_index(conn: psycopg.Connection, emb: Embedding, gen: Generation) -> None:
    """Build the generation's index without blocking the workers that write to it (``conn`` in
    autocommit mode); an index left invalid by an interrupted build is rebuilt."""
    objects = _objects(emb, gen)
    index = sql.Identifier(operations.GENERATION_SCHEMA, objects.index_name)
    valid = conn.execute(
        "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(%s)", (index.as_string(conn),)
    ).fetchone()
    if valid is not None and valid[0]:
        return
    if valid is not None:
        conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(index))
    rows = scalar(conn, sql.SQL("SELECT count(*) FROM {}").format(gen.table))
    statement = operations.index_statement(objects, rows=rows, concurrently=True)
    if statement is not None:
        settings = indexing.build_settings(conn, objects, rows)
        for name, value in settings.items():  # for the session: a concurrent build runs outside a transaction
            conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        try:
            conn.execute(statement)
        finally:
            for name in settings:
                conn.execute(sql.SQL("RESET {}").format(sql.Identifier(name)))
    conn.execute(sql.SQL("ANALYZE {}").format(gen.table))


# --- swapping -----------------------------------------------------------------------------------


def _put_in_service(conn: psycopg.Connection, emb: Embedding, old: Generation, new: Generation) -> int:
    """Inside the swap's transaction: make ``new`` the generation behind the target view; returns
    how many vectors of rows deleted meanwhile it dropped."""
    objects = _objects_for(emb)
    view = sql.Identifier(objects.target_schema, objects.target_table)
    # Writers (the capture trigger deletes through the view) wait from here to the commit; readers
    # go on reading the old generation until the view is replaced.
    conn.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(view))
    orphans = conn.execute(
        sql.SQL("DELETE FROM {tgt} t WHERE NOT EXISTS (SELECT 1 FROM {src} s WHERE s.{key} = t.{key})").format(
            tgt=new.table, src=emb.source, key=emb.key
        )
    ).rowcount
    conn.execute(
        "UPDATE vectorsync.generations SET state = 'retired', retired_at = now() "
        "WHERE embedding = %s AND generation = %s",
        (emb.name, old.generation),
    )
    conn.execute(
        "UPDATE vectorsync.generations SET state = 'serving', serving_since = now() "
        "WHERE embedding = %s AND generation = %s",
        (emb.name, new.generation),
    )
    with conn.cursor() as cur:
        operations.copy_grants(cur, objects, new.table)
        operations.point_view(cur, objects, new.table, new.storage)
    return orphans


def swap(conn: psycopg.Connection, emb: Embedding, *, expect: int | None = None) -> Generation:
    """Put the generation being built in service, in one transaction. Refused while it misses
    source rows; ``expect`` refuses if another generation is being built by now."""
    with conn.transaction():
        conn.execute(
            "SELECT 1 FROM vectorsync.generations WHERE embedding = %s AND state IN ('serving', 'building') FOR UPDATE",
            (emb.name,),
        )
        new, old = building(conn, emb.name), serving(conn, emb.name)
        if new is None or old is None or (expect is not None and new.generation != expect):
            raise GenerationError(f"embedding {emb.name!r} has no generation being built to put in service")
        if new.model_version is None:
            raise GenerationError(
                f"generation {new.generation} of embedding {emb.name!r} has no model yet; "
                f"run `vectorsync train {emb.name}`"
            )
        lacking = missing(conn, emb, new)
        if lacking:
            raise GenerationError(
                f"generation {new.generation} of embedding {emb.name!r} still misses {lacking} row(s); "
                f"let the workers finish or run `vectorsync sync {emb.name}`"
            )
        _put_in_service(conn, emb, old, new)
    prune(conn, emb.name, keep=getattr(emb.spec, "keep_generations", 1))
    swapped = serving(conn, emb.name)
    assert swapped is not None
    return swapped


def rollback(conn: psycopg.Connection, emb: Embedding) -> tuple[Generation, int]:
    """Put the generation that served before the current one back in service at once; the rows
    that changed since it retired are queued for its model. Returns it and the rows queued."""
    with conn.transaction():
        conn.execute("SELECT 1 FROM vectorsync.generations WHERE embedding = %s FOR UPDATE", (emb.name,))
        current = serving(conn, emb.name)
        if current is None:
            raise GenerationError(f"embedding {emb.name!r} has no generation in service; run `vectorsync migrate`")
        earlier = [
            g for g in generations(conn, emb.name, states=("retired",))
            if g.generation < current.generation and g.model_version is not None
        ]
        if not earlier:
            raise GenerationError(
                f"embedding {emb.name!r} has no earlier generation to roll back to "
                f"(generation {current.generation} is in service; see `vectorsync generations {emb.name}`)"
            )
        previous = earlier[0]
        _put_in_service(conn, emb, current, previous)
        queued = queue.enqueue_backfill(conn, bind(emb, previous), previous.model_version)
        # a keyword language changed while it was retired left its keyword column empty
        sink.fill_search(conn, emb)
    return dataclasses.replace(previous, state="serving"), queued


def drop(conn: psycopg.Connection, name: str, numbers: list[int] | None = None) -> list[int]:
    """Drop retired generations (the given ones, or all), or the one being built when named;
    returns the generations dropped. The one in service is never dropped."""
    dropped = []
    with conn.transaction():
        for gen in generations(conn, name):
            if numbers is None and gen.state != "retired":
                continue
            if numbers is not None and gen.generation not in numbers:
                continue
            if gen.state == "serving":
                raise GenerationError(
                    f"generation {gen.generation} of embedding {name!r} is in service and cannot be dropped; "
                    f"roll back first (`vectorsync rollback {name}`)"
                )
            conn.execute(
                "DELETE FROM vectorsync.generations WHERE embedding = %s AND generation = %s", (name, gen.generation)
            )
            with conn.cursor() as cur:
                operations.drop_generation_table(cur, gen.table_schema, gen.table_name)
            dropped.append(gen.generation)
        unknown = sorted(set(numbers or []) - set(dropped))
        if unknown:
            raise GenerationError(f"embedding {name!r} has no generation {unknown[0]}")
    return dropped


def prune(conn: psycopg.Connection, name: str, *, keep: int) -> list[int]:
    """Drop retired generations beyond the ``keep`` most recently retired."""
    retired = sorted(
        generations(conn, name, states=("retired",)), key=lambda g: g.retired_at or g.created_at, reverse=True
    )
    extra = [g.generation for g in retired[keep:]]
    return drop(conn, name, extra) if extra else []


# --- reporting ----------------------------------------------------------------------------------


def progress(conn: psycopg.Connection, name: str) -> list[dict[str, Any]]:
    """Each generation of embedding ``name`` with its state and rows; the one being built also with
    its progress (share of the source rows) and an estimate of the seconds left, from its rate so far."""
    source = conn.execute(
        "SELECT source_schema, source_table FROM vectorsync.embeddings WHERE name = %s", (name,)
    ).fetchone()
    source_rows = 0
    if source is not None and _exists(conn, sql.Identifier(*source)):
        source_rows = scalar(conn, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(*source)))
    rows = []
    for gen in generations(conn, name):
        embedded = 0
        if _exists(conn, gen.table):
            embedded = scalar(conn, sql.SQL("SELECT count(*) FROM {}").format(gen.table))
        entry: dict[str, Any] = {
            "generation": gen.generation,
            "state": gen.state,
            "model_version": gen.model_version,
            "dim": gen.dim,
            "distance": gen.distance,
            "storage": gen.storage,
            "encoder": gen.encoder_type,
            "table": f"{gen.table_schema}.{gen.table_name}",
            "rows": embedded,
            "serving_since": gen.serving_since,
        }
        if gen.state == "building":
            entry["progress"] = round(embedded / source_rows, 4) if source_rows else 1.0
            entry["seconds_left"] = _seconds_left(gen, embedded, source_rows)
            if gen.model_version is None:
                entry["waiting_for"] = f"vectorsync train {name}"
        rows.append(entry)
    return rows


def _exists(conn: psycopg.Connection, table: sql.Identifier) -> bool:
    return bool(scalar(conn, "SELECT to_regclass(%s) IS NOT NULL", (table.as_string(conn),)))


def _seconds_left(gen: Generation, done: int, total: int) -> float | None:
    if gen.started_at is None or done == 0:
        return None
    elapsed = time.time() - gen.started_at.timestamp()
    return round(max(total - done, 0) * elapsed / done, 1)
