"""What the connected server can do: PostgreSQL and pgvector versions, and the features they bring.

vectorsync works on PostgreSQL >= 14 with pgvector >= 0.5 and uses newer features only where the
server has them; a spec that needs a missing feature is refused with one line naming both versions.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from vectorsync.errors import DatabaseError

MIN_POSTGRES = 140000
MIN_PGVECTOR = (0, 5, 0)


@dataclass(frozen=True)
class Feature:
    name: str
    needs: tuple[int, int, int]
    gain: str


#: pgvector features vectorsync uses, by the version that brought them.
FEATURES: tuple[Feature, ...] = (
    Feature("parallel HNSW builds", (0, 6, 0), "HNSW indexes build on several cores, several times faster"),
    Feature("halfvec storage", (0, 7, 0), "storage = 'halfvec': half the memory and index size at the same recall"),
    Feature("binary quantization", (0, 7, 0), "storage = 'bit': a 32x smaller index, re-ranked at full precision"),
    Feature("iterative index scans", (0, 8, 0), "filtered searches get k rows through the index, no exact scan"),
)


def parse_version(text: str) -> tuple[int, int, int]:
    major, minor, patch, *_ = [*(int(p) for p in text.split("-")[0].split(".")[:3] if p.isdigit()), 0, 0, 0]
    return major, minor, patch


def show(version: tuple[int, int, int] | None) -> str:
    return ".".join(map(str, version)) if version else "none"


def short(version: tuple[int, int, int]) -> str:
    """0.7.0 as "0.7": the form release notes use for the version that brought a feature."""
    return show(version).removesuffix(".0")


@dataclass(frozen=True)
class ServerFeatures:
    postgres: str
    postgres_num: int
    pgvector: tuple[int, int, int] | None
    """The installed pgvector, or the version that CREATE EXTENSION would install; None if absent."""
    pgvector_installed: bool
    newest_pgvector: tuple[int, int, int] = FEATURES[-1].needs

    def has(self, feature: str) -> bool:
        needed = next(f.needs for f in FEATURES if f.name == feature)
        return self.pgvector is not None and self.pgvector >= needed

    def require(self, feature: str, what: str) -> None:
        """Refuse ``what`` (as the user wrote it, e.g. "storage = halfvec") when the server lacks ``feature``."""
        if not self.has(feature):
            needed = next(f.needs for f in FEATURES if f.name == feature)
            raise DatabaseError(
                f"{what} needs pgvector >= {short(needed)}; "
                f"this server has {show(self.pgvector)}"
            )

    def missing(self) -> list[Feature]:
        return [f for f in FEATURES if not self.has(f.name)]


def detect(conn: psycopg.Connection) -> ServerFeatures:
    """Read the server's versions; one clear error when it is older than vectorsync supports."""
    version, num = conn.execute(
        "SELECT current_setting('server_version'), current_setting('server_version_num')::int"
    ).fetchone() or ("", 0)
    row = conn.execute(
        "SELECT installed_version, default_version FROM pg_available_extensions WHERE name = 'vector'"
    ).fetchone()
    installed = row is not None and row[0] is not None
    pgvector = parse_version(row[0] or row[1]) if row else None
    features = ServerFeatures(str(version), int(num), pgvector, installed)
    if features.postgres_num < MIN_POSTGRES:
        raise DatabaseError(f"vectorsync needs PostgreSQL >= 14; this server is {version}")
    if pgvector is not None and pgvector < MIN_PGVECTOR:
        raise DatabaseError(
            f"vectorsync needs pgvector >= {show(MIN_PGVECTOR)}; this server has {show(pgvector)}: "
            "ALTER EXTENSION vector UPDATE (after installing a newer pgvector)"
        )
    return features
