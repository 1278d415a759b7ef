"""Roles and privileges: what each of vectorsync's roles needs, granted or checked in one place.

- The **owner** runs ``migrate`` and owns the ``vectorsync`` schema, its catalogue and every target
  table; nobody else may write the catalogue.
- A **worker** role holds exactly what a worker needs (``worker_rights``): read the catalogue and
  the models, work the queue, record failures and errors, register itself, read the key and input
  columns of each source table, and write each target table.
- **Application** roles need nothing from vectorsync: the capture trigger runs as the owner.
- A **reader** is any role that may SELECT a source table: it may read that embedding's target
  table and call the query functions (``reader_rights``). ``migrate`` mirrors every source table's
  SELECT grants onto its target table, and takes SELECT back from roles that lost it on the source.

Every identifier is composed with ``psycopg.sql.Identifier``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from vectorsync.errors import DatabaseError
from vectorsync.sync.spec import split_qualified

SCHEMA = "vectorsync"

#: What a worker needs on vectorsync's own tables; nothing else in the schema.
WORKER_CATALOGUE: tuple[tuple[tuple[str, ...], str], ...] = (
    (("SELECT",), "embeddings"),
    (("SELECT",), "models"),
    (("SELECT",), "generations"),
    (("SELECT", "INSERT", "UPDATE", "DELETE"), "queue"),
    (("SELECT", "UPDATE", "DELETE"), "changes"),  # UPDATE: a spread locks the rows it takes
    (("SELECT", "INSERT", "UPDATE", "DELETE"), "failed"),
    (("INSERT",), "errors"),
    (("SELECT", "INSERT", "UPDATE"), "workers"),
    # graph runs: the change log they consume, the state they leave, the run they record
    (("SELECT", "DELETE"), "graph_changes"),
    (("SELECT", "INSERT", "UPDATE"), "graph_state"),
    (("SELECT", "INSERT", "UPDATE"), "runs"),
)
WORKER_SEQUENCES = ("queue_id_seq", "errors_id_seq", "runs_id_seq")
#: What the query functions and the status view need a reader to see: the catalogue, not the queue.
READER_CATALOGUE = ("embeddings", "generations", "status")
TARGET_WRITES = ("SELECT", "INSERT", "UPDATE", "DELETE")


class PrivilegeError(DatabaseError):
    """The connected role lacks a privilege that the command needs."""


@dataclass(frozen=True)
class Right:
    """Privileges on one object (a schema, a table or some of its columns, a sequence)."""

    kind: str  # "SCHEMA", "TABLE" or "SEQUENCE"
    name: tuple[str, ...]  # (schema,) or (schema, relation)
    privileges: tuple[str, ...]
    columns: tuple[str, ...] = ()

    @property
    def object(self) -> sql.Identifier:
        return sql.Identifier(*self.name)

    def grant(self, role: str) -> sql.Composed:
        columns: sql.Composable = sql.SQL("")
        if self.columns:
            columns = sql.SQL(" ({})").format(sql.SQL(", ").join(map(sql.Identifier, self.columns)))
        return sql.SQL("GRANT {privileges}{columns} ON {kind} {object} TO {role}").format(
            privileges=sql.SQL(", ").join(map(sql.SQL, self.privileges)),
            columns=columns,
            kind=sql.SQL(self.kind),
            object=self.object,
            role=sql.Identifier(role),
        )

    def held_by(self, conn: psycopg.Connection, role: str) -> bool:
        qualified = self.object.as_string(conn)
        for privilege in self.privileges:
            if self.kind == "SCHEMA":
                query, args = "SELECT has_schema_privilege(%s, %s, %s)", (role, self.name[0], privilege)
            elif self.kind == "SEQUENCE":
                query, args = "SELECT has_sequence_privilege(%s, %s, %s)", (role, qualified, privilege)
            elif self.columns:
                for column in self.columns:
                    row = conn.execute(
                        "SELECT has_column_privilege(%s, %s, %s, %s)", (role, qualified, column, privilege)
                    ).fetchone()
                    if not (row and row[0]):
                        return False
                continue
            else:
                query, args = "SELECT has_table_privilege(%s, %s, %s)", (role, qualified, privilege)
            row = conn.execute(query, args).fetchone()
            if not (row and row[0]):
                return False
        return True

    def describe(self, conn: psycopg.Connection) -> str:
        return self.grant("ROLE").as_string(conn).removeprefix("GRANT ").removesuffix(' TO "ROLE"')


@dataclass(frozen=True)
class _Embedding:
    name: str
    source: tuple[str, str]
    target: tuple[str, str]
    key: str
    inputs: tuple[str, ...]
    #: The generation tables behind the target view (workers write them, query functions read them).
    generations: tuple[tuple[str, str], ...] = ()
    #: A native graph's edge table and the columns a graph run reads from it.
    edges: tuple[str, str] | None = None
    edge_columns: tuple[str, ...] = ()

    @property
    def targets(self) -> tuple[tuple[str, str], ...]:
        return (self.target, *self.generations)


def _embeddings(conn: psycopg.Connection) -> list[_Embedding]:
    rows = conn.execute(
        "SELECT e.name, e.source_schema, e.source_table, e.target_schema, e.target_table, e.key_column, "
        "e.input_columns, coalesce((SELECT array_agg(ARRAY[g.table_schema, g.table_name] ORDER BY g.generation) "
        "FROM vectorsync.generations g WHERE g.embedding = e.name), '{}'), e.spec -> 'graph' "
        "FROM vectorsync.embeddings e ORDER BY e.name"
    ).fetchall()
    return [
        _Embedding(r[0], (r[1], r[2]), (r[3], r[4]), r[5], tuple(r[6]), tuple((g[0], g[1]) for g in r[7]),
                   *_edge_table(r[1], r[8]))
        for r in rows
    ]


def _edge_table(source_schema: str, graph: dict[str, Any] | None) -> tuple[tuple[str, str] | None, tuple[str, ...]]:
    """The edge table of a native graph spec (in the node table's schema unless qualified) and the
    endpoint and weight columns a run reads."""
    if not graph or not graph.get("edges"):
        return None, ()
    schema, table = split_qualified(graph["edges"])
    columns = (graph.get("source_column", "source"), graph.get("target_column", "target"), graph.get("weight_column"))
    return (schema or source_schema, table), tuple(c for c in columns if c)


def _exists(conn: psycopg.Connection, name: tuple[str, str]) -> bool:
    row = conn.execute("SELECT to_regclass(%s)", (sql.Identifier(*name).as_string(conn),)).fetchone()
    return bool(row and row[0] is not None)


def worker_rights(conn: psycopg.Connection) -> list[Right]:
    """Everything a worker role needs, for the embeddings migrate has recorded."""
    rights = [Right("SCHEMA", (SCHEMA,), ("USAGE",))]
    rights += [Right("TABLE", (SCHEMA, table), privileges) for privileges, table in WORKER_CATALOGUE]
    rights += [Right("SEQUENCE", (SCHEMA, sequence), ("USAGE",)) for sequence in WORKER_SEQUENCES]
    rights.append(Right("TABLE", (SCHEMA, "embeddings"), ("UPDATE",), ("last_sync",)))  # a finished graph run
    for e in _embeddings(conn):
        if not (_exists(conn, e.source) and _exists(conn, e.target)):
            continue
        columns = tuple(dict.fromkeys((e.key, *e.inputs)))
        rights.append(Right("TABLE", e.source, ("SELECT",), columns))
        # Writing a batch locks its rows FOR SHARE (so a concurrent DELETE or UPDATE waits for the
        # batch), and PostgreSQL allows that lock only to a role that may UPDATE some column.
        rights.append(Right("TABLE", e.source, ("UPDATE",), (e.key,)))
        rights += [Right("TABLE", target, TARGET_WRITES) for target in e.targets if _exists(conn, target)]
        if e.edges is not None and _exists(conn, e.edges):
            rights.append(Right("TABLE", e.edges, ("SELECT",), e.edge_columns))
    return rights


def reader_rights(conn: psycopg.Connection, role: str) -> tuple[list[Right], list[str]]:
    """What ``role`` needs to query the embeddings of the source tables it may read, and the
    names of the embeddings whose source it may not read (it gets nothing on those)."""
    rights = [Right("SCHEMA", (SCHEMA,), ("USAGE",))]
    rights += [Right("TABLE", (SCHEMA, table), ("SELECT",)) for table in READER_CATALOGUE]
    unreadable: list[str] = []
    for e in _embeddings(conn):
        if not (_exists(conn, e.source) and _exists(conn, e.target)):
            continue
        if Right("TABLE", e.source, ("SELECT",)).held_by(conn, role):
            rights += [Right("TABLE", target, ("SELECT",)) for target in e.targets if _exists(conn, target)]
        else:
            unreadable.append(e.name)
    return rights, unreadable


def role_exists(conn: psycopg.Connection, role: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None


def create_role(conn: psycopg.Connection, role: str) -> None:
    """A role that can log in, with no password: set one with ALTER ROLE ... PASSWORD."""
    conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))


def missing(conn: psycopg.Connection, role: str, rights: Sequence[Right]) -> list[Right]:
    return [right for right in rights if not right.held_by(conn, role)]


def grant(conn: psycopg.Connection, role: str, rights: Sequence[Right]) -> list[Right]:
    """Grant what ``role`` lacks of ``rights``; returns what was granted."""
    lacking = missing(conn, role, rights)
    for right in lacking:
        conn.execute(right.grant(role))
    return lacking


def _acl_grantees(conn: psycopg.Connection, name: tuple[str, str], privilege: str) -> list[str]:
    """Roles granted ``privilege`` on the whole table (``PUBLIC`` for everyone), owner excluded."""
    rows = conn.execute(
        "SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END "
        "FROM pg_class c, aclexplode(c.relacl) a "
        "WHERE c.oid = to_regclass(%s) AND a.privilege_type = %s AND a.grantee <> c.relowner",
        (sql.Identifier(*name).as_string(conn), privilege),
    ).fetchall()
    return [r[0] for r in rows]


def _role(name: str) -> sql.Composable:
    return sql.SQL("PUBLIC") if name == "PUBLIC" else sql.Identifier(name)


def mirror_reader_grants(conn: psycopg.Connection) -> None:
    """Give each target table the SELECT grants of its source table (and the schema USAGE and
    catalogue SELECT the query functions need), and take SELECT on a target back from roles that
    can no longer read its source. Workers (which write the target) keep theirs."""
    for e in _embeddings(conn):
        if not (_exists(conn, e.source) and _exists(conn, e.target)):
            continue
        readers = _acl_grantees(conn, e.source, "SELECT")
        for reader in readers:
            role = _role(reader)
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(SCHEMA), role))
            for table in READER_CATALOGUE:
                conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(SCHEMA, table), role))
            for target in e.targets:
                if _exists(conn, target):
                    conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(*target), role))
        for target in e.targets:
            if not _exists(conn, target):
                continue
            writers = set(_acl_grantees(conn, target, "INSERT"))
            for holder in _acl_grantees(conn, target, "SELECT"):
                if holder in writers:
                    continue
                can_read = "PUBLIC" in readers or (
                    holder != "PUBLIC" and Right("TABLE", e.source, ("SELECT",)).held_by(conn, holder)
                )
                if not can_read:
                    conn.execute(sql.SQL("REVOKE SELECT ON {} FROM {}").format(sql.Identifier(*target), _role(holder)))


def refresh_worker_grants(conn: psycopg.Connection) -> None:
    """Bring every worker role (one granted INSERT on vectorsync.errors) up to the current embeddings."""
    rights = worker_rights(conn)
    for role in _acl_grantees(conn, (SCHEMA, "errors"), "INSERT"):
        if role != "PUBLIC":
            grant(conn, role, rights)


@dataclass(frozen=True)
class MigrateTarget:
    """What migrate will touch for one embedding: its source (for the trigger) and target."""

    embedding: str
    source: tuple[str, str]
    target: tuple[str, str]
    capture: bool


def check_migrate(conn: psycopg.Connection, targets: Sequence[MigrateTarget]) -> None:
    """Stop before migrate changes anything when the connected role lacks a privilege it needs;
    the error names the privilege and the object."""
    me = conn.execute("SELECT current_user").fetchone()[0]  # type: ignore[index]  # always one row
    owner = conn.execute("SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = %s", (SCHEMA,)).fetchone()
    if owner is not None:
        if not _member(conn, owner[0]):
            raise PrivilegeError(
                f"migrate must run as {owner[0]!r}, the owner of schema {SCHEMA} (connected as {me!r}); "
                f"vectorsync's catalogue is writable only by its owner"
            )
    elif not _database_create(conn):
        raise PrivilegeError(
            f"migrate needs CREATE on database {_database(conn)} to create schema {SCHEMA} (connected as {me!r}); "
            f"run it as the database owner or GRANT CREATE ON DATABASE {_database(conn)} TO {_shown(me)}"
        )
    for t in targets:
        source = _shown(*t.source)
        if t.capture and not Right("TABLE", t.source, ("TRIGGER",)).held_by(conn, me):
            raise PrivilegeError(
                f"migrate needs TRIGGER on table {source} for embedding {t.embedding!r} (connected as {me!r}); "
                f"run it as the table's owner or GRANT TRIGGER ON {source} TO {_shown(me)}"
            )
        target = _shown(*t.target)
        row = conn.execute(
            "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = to_regclass(%s)",
            (sql.Identifier(*t.target).as_string(conn),),
        ).fetchone()
        if row is not None:
            if not _member(conn, row[0]):
                raise PrivilegeError(
                    f"migrate needs to own table {target} of embedding {t.embedding!r}, which belongs to "
                    f"{row[0]!r} (connected as {me!r}); run migrate as {row[0]!r}"
                )
            continue
        schema_row = conn.execute(
            "SELECT has_schema_privilege(%s, 'CREATE') FROM pg_namespace WHERE nspname = %s", (t.target[0], t.target[0])
        ).fetchone()
        if schema_row is not None and not schema_row[0]:
            raise PrivilegeError(
                f"migrate needs CREATE on schema {_shown(t.target[0])} for table {target} "
                f"of embedding {t.embedding!r} (connected as {me!r})"
            )
        if schema_row is None and not _database_create(conn):
            raise PrivilegeError(
                f"migrate needs CREATE on database {_database(conn)} to create schema "
                f"{_shown(t.target[0])} of embedding {t.embedding!r} (connected as {me!r})"
            )


def _shown(*parts: str) -> str:
    """A name as a user would write it: quoted only where SQL needs it."""
    return ".".join(p if re.fullmatch(r"[a-z_][a-z0-9_$]*", p) else '"' + p.replace('"', '""') + '"' for p in parts)


def _member(conn: psycopg.Connection, role: str) -> bool:
    row = conn.execute("SELECT pg_has_role(current_user, %s, 'USAGE')", (role,)).fetchone()
    return bool(row and row[0])


def _database(conn: psycopg.Connection) -> str:
    return str(conn.execute("SELECT quote_ident(current_database())").fetchone()[0])  # type: ignore[index]  # always one row


def _database_create(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT has_database_privilege(current_database(), 'CREATE')").fetchone()
    return bool(row and row[0])


@dataclass
class RoleReport:
    """What ``setup_role`` found and did for one role."""

    created: bool
    granted: list[str]  # described rights granted now
    missing: list[str]  # described rights still lacking (only when checking)
    unreadable: list[str]  # embeddings a reader gets nothing on: it may not read their source


def setup_role(conn: psycopg.Connection, kind: str, role: str, *, check: bool = False) -> RoleReport:
    """Create ``role`` if needed and grant what a ``kind`` ("worker" or "reader") needs; with
    ``check``, change nothing and report what is missing."""
    owner = conn.execute("SELECT pg_get_userbyid(nspowner) FROM pg_namespace WHERE nspname = %s", (SCHEMA,)).fetchone()
    if owner is None:
        raise DatabaseError("vectorsync has no schema in this database yet; run `vectorsync migrate` first")
    if not _member(conn, owner[0]):
        me = conn.execute("SELECT current_user").fetchone()[0]  # type: ignore[index]  # always one row
        raise PrivilegeError(
            f"vectorsync grant must run as {owner[0]!r}, the owner of schema {SCHEMA} (connected as {me!r})"
        )
    exists = role_exists(conn, role)
    if not exists and check:
        raise PrivilegeError(f"role {role!r} does not exist; run `vectorsync grant {kind} {role}` to create it")
    if not exists:
        try:
            create_role(conn, role)
        except psycopg.errors.InsufficientPrivilege:
            raise PrivilegeError(
                f"creating role {role!r} needs CREATEROLE; create it yourself (CREATE ROLE {_shown(role)} LOGIN) "
                f"and run `vectorsync grant {kind} {role}` again"
            ) from None
    unreadable: list[str] = []
    if kind == "worker":
        rights = worker_rights(conn)
    else:
        rights, unreadable = reader_rights(conn, role)
    if check:
        return RoleReport(False, [], [r.describe(conn) for r in missing(conn, role, rights)], unreadable)
    return RoleReport(not exists, [r.describe(conn) for r in grant(conn, role, rights)], [], unreadable)
