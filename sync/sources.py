"""The read path: fetch source rows by key (or stream them for training), resolve references.

A reference is a file path relative to the spec's ``base_dir`` or a ``file://`` URI. Image
references resolve to the file's bytes; text references to its decoded content. Only regular files
inside ``base_dir`` (anywhere only with ``allow_any_path``), within a size limit and a read timeout,
are read. A reference that cannot be resolved becomes an ``InputError`` for that row only.
"""

from __future__ import annotations

import codecs
import os
import stat
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pandas as pd
import psycopg
from psycopg import sql

from vectorsync.encoders.base import InputError
from vectorsync.migrations.operations import SEARCH_COLUMN
from vectorsync.sync import queue
from vectorsync.sync.catalog import Embedding, statement
from vectorsync.sync.spec import MediaSpec, SpecError, TextSpec

KEY = "__key__"
HASH = "__input_hash__"
#: Keyword search keeps the words of a text's first this many characters: a ``tsvector`` holds at
#: most 1 MB, and a text's vector is made from its beginning too.
SEARCH_TEXT_CHARS = 100_000


def _select_columns(emb: Embedding, extra: Sequence[str] = ()) -> sql.Composed:
    columns = [*emb.spec.input_columns, *[c for c in extra if c not in emb.spec.input_columns]]
    parts = [
        sql.SQL("s.{}::text AS {}").format(emb.key, sql.Identifier(KEY)),
        sql.SQL("{} AS {}").format(emb.input_hash_expr("s"), sql.Identifier(HASH)),
        *[sql.SQL("s.{}").format(sql.Identifier(c)) for c in columns],
    ]
    return sql.SQL(", ").join(parts)


def _names(cur: psycopg.Cursor[Any]) -> list[str]:
    """The result's column names (every query here returns rows, so there is a description)."""
    return [d.name for d in cur.description or ()]


def read_rows(conn: psycopg.Connection, emb: Embedding, keys: Sequence[str]) -> pd.DataFrame:
    """The source rows with these (text) keys, read without locking them: a row the application
    holds locked is read as last committed, never waited for."""
    return read_rows_and_hashes(conn, emb, keys, [])[0]


def read_rows_and_hashes(
    conn: psycopg.Connection, emb: Embedding, keys: Sequence[str], stored: Sequence[tuple[Embedding, int] | None]
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """``read_rows``, and for each ``(target, model version)`` of ``stored`` the input hashes
    stored with those keys' vectors from that model version, by key (empty for a None entry), all
    read by one statement: a lone change's batch makes one round trip less."""
    if emb.spec.encoder_type == "graphsage":
        from vectorsync.sync.graph_sage import read_neighbourhoods

        return read_neighbourhoods(conn, emb, list(keys)), [{} for _ in stored]
    wanted = [(i, target) for i, target in enumerate(stored) if target is not None]

    def compose() -> sql.Composed:
        hashes = [
            sql.SQL("(SELECT t.input_hash FROM {tgt} t WHERE t.{key} = s.{key} AND t.model_version = %s "
                    "AND t.input_hash IS NOT NULL{keywords}) AS {name}").format(
                tgt=target.target,
                key=target.key,
                keywords=sql.SQL(" AND t.{} IS NOT NULL").format(sql.Identifier(SEARCH_COLUMN))
                if target.text_search else sql.SQL(""),
                name=sql.Identifier(f"__stored_{i}__"),
            )
            for i, (target, _) in wanted
        ]
        return sql.SQL("SELECT {cols} FROM {src} s WHERE s.{key} = ANY(CAST(%s AS {karr}))").format(
            cols=sql.SQL(", ").join([_select_columns(emb), *hashes]), src=emb.source, key=emb.key,
            karr=emb.key_array_type,
        )

    shape = ("read", emb.shape, tuple((i, target.shape) for i, (target, _) in wanted))
    with conn.cursor(binary=True) as cur:
        cur.execute(statement(shape, compose), [*[version for _, (_, version) in wanted], list(keys)])
        rows = cur.fetchall()
        names = _names(cur)
    found: list[dict[str, str]] = [{} for _ in stored]
    if wanted:
        width = len(names) - len(wanted)
        for position, (i, _) in enumerate(wanted):
            found[i] = {row[0]: row[width + position] for row in rows if row[width + position] is not None}
        rows = [row[:width] for row in rows]
        names = names[:width]
    return pd.DataFrame(rows, columns=names, dtype=object), found


def lock_rows_query(emb: Embedding) -> sql.SQL:
    """A SELECT that locks the rows with the keys of its one parameter (text keys) ``FOR SHARE SKIP
    LOCKED`` until the transaction ends, and returns their ``key`` and current input hash as ``value``
    (run by ``queue.confirm_lease_and_lock``).

    Held only while a batch writes its vectors: a concurrent UPDATE or DELETE waits for that write
    (so it re-queues or removes the vector after it, never before), and a row the application holds
    locked is skipped instead of waited for.
    """
    return statement(("lock", emb.shape), lambda: sql.SQL(
        "SELECT s.{key}::text AS key, {hash} AS value FROM {src} s WHERE s.{key} = ANY(CAST(%s AS {karr})) "
        "FOR SHARE OF s SKIP LOCKED"
    ).format(key=emb.key, hash=emb.input_hash_expr("s"), src=emb.source, karr=emb.key_array_type))


def existing_keys(conn: psycopg.Connection, emb: Embedding, keys: Sequence[str]) -> set[str]:
    """Which of these keys still have a source row (a plain read: never waits on row locks)."""
    if not keys:
        return set()
    rows = conn.execute(
        sql.SQL("SELECT s.{key}::text FROM {src} s WHERE s.{key} = ANY(CAST(%s AS {karr}))").format(
            key=emb.key, src=emb.source, karr=emb.key_array_type
        ),
        (list(keys),),
    ).fetchall()
    return {row[0] for row in rows}


def stream_rows(
    conn: psycopg.Connection,
    emb: Embedding,
    *,
    extra_columns: Sequence[str] = (),
    sample: int | None = None,
    holdout: bool | None = None,
    holdout_percent: int = 10,
    chunk_rows: int = 2048,
    seed: int = 0,
) -> Iterator[pd.DataFrame]:
    """Stream rows in chunks through a server-side cursor (never the whole table in memory).

    ``holdout`` True/False selects the held-out or the training part by a stable hash of the key;
    ``sample`` caps the rows (a deterministic pseudo-random subset for a given seed).
    """
    conditions: list[sql.Composable] = []
    if holdout is not None:
        bucket = sql.SQL("abs(hashtextextended(s.{}::text, {})) % 100").format(emb.key, sql.Literal(seed))
        op = sql.SQL("<") if holdout else sql.SQL(">=")
        conditions.append(sql.SQL("{} {} {}").format(bucket, op, sql.Literal(holdout_percent)))
    where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("")
    order = sql.SQL(" ORDER BY hashtextextended(s.{}::text, {})").format(emb.key, sql.Literal(seed + 1))
    limit = sql.SQL(" LIMIT {}").format(sql.Literal(sample)) if sample else sql.SQL("")
    query = sql.SQL("SELECT {cols} FROM {src} s").format(
        cols=_select_columns(emb, extra_columns), src=emb.source
    ) + where + order + limit
    with conn.cursor(name="vectorsync_stream", binary=True) as cur:
        cur.itersize = chunk_rows
        cur.execute(query)
        while True:
            rows = cur.fetchmany(chunk_rows)
            if not rows:
                break
            yield pd.DataFrame(rows, columns=_names(cur), dtype=object)


def stream_stale(
    conn: psycopg.Connection, emb: Embedding, version: int, *, chunk_rows: int
) -> Iterator[pd.DataFrame]:
    """Stream the rows with no vector, or one from an older model, that are not failed items."""
    query = sql.SQL(
        "SELECT {cols} FROM {src} s LEFT JOIN {tgt} t ON t.{key} = s.{key} "
        "WHERE (t.{key} IS NULL OR t.model_version <> {version}) AND {not_failed}"
    ).format(
        cols=_select_columns(emb),
        src=emb.source,
        tgt=emb.target,
        key=emb.key,
        version=sql.Literal(version),
        not_failed=queue.not_failed(emb, "s"),
    )
    with conn.cursor(name="vectorsync_stale", binary=True) as cur:  # binary: ~30% cheaper to parse
        cur.itersize = chunk_rows
        cur.execute(query)
        names = _names(cur)
        while rows := cur.fetchmany(chunk_rows):
            yield pd.DataFrame(rows, columns=names, dtype=object)


def count_stale(conn: psycopg.Connection, emb: Embedding, version: int) -> int:
    row = conn.execute(
        sql.SQL(
            "SELECT count(*) FROM {src} s LEFT JOIN {tgt} t ON t.{key} = s.{key} "
            "WHERE t.{key} IS NULL OR t.model_version <> %s"
        ).format(src=emb.source, tgt=emb.target, key=emb.key),
        (version,),
    ).fetchone()
    assert row is not None  # an aggregate always returns one row
    return int(row[0])


def resolve_references(emb: Embedding, frame: pd.DataFrame) -> dict[int, InputError]:
    """Replace reference values by file contents in place; return failures by row position.

    Files are read in a small thread pool, each within the spec's ``read_timeout_seconds``: a read
    that hangs (a stale network mount) fails its own row, and the batch goes on. Any error reading
    one row, MemoryError included, fails that row only.
    """
    spec = emb.spec
    column = getattr(spec, "path_column", None)
    if column is None:
        return {}
    assert isinstance(spec, MediaSpec)
    encoding = spec.encoding if isinstance(spec, TextSpec) else None  # text files are decoded here
    if encoding is not None:
        try:
            codecs.lookup(encoding)
        except LookupError:  # a spec error, not a per-row one: every file would fail the same way
            raise SpecError(
                f"embedding {spec.name!r}: unknown text encoding {encoding!r}; fix 'encoding' in the spec"
            ) from None
    failures: dict[int, InputError] = {}
    values: list[object] = []
    references = frame[column].tolist()
    pending = [_READERS.submit(_read_reference, reference, spec) for reference in references]
    for position, (reference, future) in enumerate(zip(references, pending, strict=True)):
        try:
            data = future.result(timeout=spec.read_timeout_seconds)
            values.append(data.decode(encoding) if encoding is not None else data)
        except TimeoutError:
            future.cancel()
            failures[position] = InputError(
                column, f"reading {reference!r} took longer than read_timeout_seconds = {spec.read_timeout_seconds}"
            )
            values.append(None)
        except UnicodeDecodeError as exc:
            failures[position] = InputError(column, f"file {reference!r} is not valid {encoding}: {exc.reason}")
            values.append(None)
        except InputError as exc:
            exc.column = column
            failures[position] = exc
            values.append(None)
        except Exception as exc:  # whatever one reference does (MemoryError too), only its row fails
            failures[position] = InputError(column, f"cannot read reference {reference!r}: {type(exc).__name__}: {exc}")
            values.append(None)
    frame[column] = pd.Series(values, index=frame.index, dtype=object)
    return failures


def search_texts(emb: Embedding, frame: pd.DataFrame, rows: Sequence[int]) -> list[str] | None:
    """The texts of ``frame``'s ``rows`` (file contents once references are resolved) for the
    keyword column of an embedding with ``text_search``; None for an embedding without it."""
    spec = emb.spec
    if emb.text_search is None or not isinstance(spec, TextSpec):
        return None
    texts = []
    for value in frame[spec.input_column].iloc[list(rows)].tolist():
        if isinstance(value, bytes | memoryview):  # a bytea column: decoded as the encoder decodes it
            value = bytes(value).decode(spec.encoding, errors="replace")
        text = "" if value is None else str(value)
        texts.append(text[:SEARCH_TEXT_CHARS].replace("\x00", ""))  # PostgreSQL text holds no NUL
    return texts


#: Bytes asked for per read of a file that reports no size (``/proc``).
_UNSIZED_READ = 64 * 2**10

#: Reads referenced files off the worker's thread, so a read that never returns cannot hold it.
_READERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="vectorsync-read")


def reference_path(reference: object, spec: MediaSpec) -> Path:
    """The file a reference names, checked against the spec's ``base_dir`` / ``allow_any_path``.

    A relative path is taken relative to ``base_dir`` and must stay inside it ('..' and symlinks
    are resolved first); absolute paths and ``file://`` URIs must lie inside it too unless
    ``allow_any_path`` is set.
    """
    if reference is None or (isinstance(reference, float) and pd.isna(reference)) or str(reference).strip() == "":
        raise InputError(None, "the reference is empty")
    text = str(reference)
    if "://" in text:
        try:
            parsed = urlparse(text)
        except ValueError as exc:  # e.g. 'file://[abc/x': Invalid IPv6 URL
            raise InputError(None, f"reference {text!r} is not a valid URI: {exc}") from None
        if parsed.scheme != "file":
            raise InputError(None, f"unsupported URI scheme {parsed.scheme!r} in {text!r} (use a path or file://)")
        if parsed.netloc not in ("", "localhost"):
            raise InputError(None, f"file URI {text!r} names host {parsed.netloc!r}; only local files can be read")
        path = Path(unquote(parsed.path))
    else:
        path = Path(text)
    if "\x00" in str(path):
        raise InputError(None, f"reference {text!r} contains a NUL byte")
    if spec.base_dir is None:
        if not path.is_absolute():
            raise InputError(None, f"relative reference {text!r} needs base_dir in the spec")
        return path.resolve()
    base = Path(spec.base_dir).expanduser().resolve()
    resolved = (base / path).resolve()  # an absolute path stays itself; '..' and symlinks are resolved
    if base not in resolved.parents and not spec.allow_any_path:
        raise InputError(None, f"reference {text!r} points outside base_dir {str(base)!r}")
    return resolved


def _read_reference(reference: object, spec: MediaSpec) -> bytes:
    """The bytes of the regular file a reference points to, at most ``max_file_bytes``.

    The file is opened without blocking and checked with fstat before anything is read: a FIFO,
    a device (``/dev/zero``), a socket or a directory is refused, as is a file (sparse or not)
    larger than the limit; files that report no size (``/proc``) are read up to the limit only.
    """
    path = reference_path(reference, spec)
    limit = spec.max_file_bytes
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError(None, f"file not found: {str(path)!r}") from None
    except OSError as exc:
        raise InputError(None, f"cannot open {str(path)!r}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise InputError(None, f"reference is a directory, not a file: {str(path)!r}")
        if not stat.S_ISREG(info.st_mode):
            raise InputError(None, f"reference {str(path)!r} is not a regular file (a FIFO, device or socket)")
        if info.st_size > limit:
            raise InputError(
                None, f"file {str(path)!r} is {info.st_size} bytes, above max_file_bytes = {limit} for this embedding"
            )
        handle = os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise
    chunks: list[bytes] = []
    size = 0
    # a read allocates what it asks for: ask for the file's size (one byte more to see it grew),
    # not for max_file_bytes, or every small file would cost the whole limit in memory
    step = info.st_size + 1 if info.st_size else _UNSIZED_READ
    with handle:
        try:
            while size <= limit and (chunk := handle.read(min(limit + 1 - size, step))):
                chunks.append(chunk)
                size += len(chunk)
        except OSError as exc:
            raise InputError(None, f"cannot read {str(path)!r}: {exc.strerror}") from None
    data = b"".join(chunks)
    if len(data) > limit:
        raise InputError(None, f"file {str(path)!r} is larger than max_file_bytes = {limit} for this embedding")
    return data
