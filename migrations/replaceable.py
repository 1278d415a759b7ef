"""Replaceable objects (Alembic cookbook, "Replaceable Objects"): SQL functions and views whose
whole text lives in the revision that installs them.

A revision declares each object as a module-level value and creates it; a later revision that
changes it declares the new text and replaces it by naming the revision that holds the old one::

    nearest = Function("vectorsync.nearest", "embedding_name text, ...", "TABLE (...)", "LANGUAGE sql", "...")

    def upgrade() -> None:
        replace(nearest, replaces="0003_similarity_functions.nearest")

    def downgrade() -> None:
        replace(nearest, replace_with="0003_similarity_functions.nearest")

``create`` / ``drop`` / ``replace`` are typed shorthands for the registered operations
``op.create_replaceable`` / ``op.drop_replaceable`` / ``op.replace_replaceable``, which users'
own revisions can call as well. So a released revision never reads a file that later edits, and
a downgrade restores exactly the text the previous revision installed. Function names in the
``vectorsync`` schema are never overloaded, which lets a function be dropped by name alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from alembic import op
from alembic.operations import MigrateOperation, Operations

from vectorsync.migrations.operations import execute_script


@dataclass(frozen=True)
class Function:
    """``CREATE FUNCTION name(arguments) RETURNS returns attributes AS $fn$source$fn$``.

    ``source`` is stored by PostgreSQL as written (it is what ``pg_get_functiondef`` shows), so it
    keeps its own leading and trailing newlines.
    """

    name: str
    arguments: str
    returns: str
    attributes: str
    source: str

    def create(self, *, or_replace: bool = False) -> str:
        verb = "CREATE OR REPLACE" if or_replace else "CREATE"
        header = f"{verb} FUNCTION {self.name}({self.arguments})\nRETURNS {self.returns}\n{self.attributes}"
        return f"{header} AS $fn${self.source}$fn$"

    def drop(self) -> str:
        return f"DROP FUNCTION {self.name}"

    def replace(self, old: Replaceable) -> list[str]:
        # CREATE OR REPLACE cannot change the arguments or the result type; it also keeps grants
        if isinstance(old, Function) and (old.arguments, old.returns) == (self.arguments, self.returns):
            return [self.create(or_replace=True)]
        return [old.drop(), self.create()]


@dataclass(frozen=True)
class View:
    """``CREATE VIEW name AS query``."""

    name: str
    query: str

    def create(self) -> str:
        return f"CREATE VIEW {self.name} AS {self.query}"

    def drop(self) -> str:
        return f"DROP VIEW {self.name}"

    def replace(self, old: Replaceable) -> list[str]:
        return [old.drop(), self.create()]


Replaceable = Function | View


def _from_revision(operations: Operations, ident: str) -> Replaceable:
    """The object ``attribute`` of revision ``revision`` named as ``"revision.attribute"``."""
    revision, _, attribute = ident.partition(".")
    module = operations.get_context().script.get_revision(revision).module  # type: ignore[union-attr]  # set by env.py's run
    found: Replaceable = getattr(module, attribute)
    return found


def _run(operations: Operations, statements: list[str]) -> None:
    # as written: function bodies hold format() patterns such as %1$I
    for statement in statements:
        execute_script(operations.get_bind(), statement)


@Operations.register_operation("create_replaceable")
class CreateReplaceableOp(MigrateOperation):
    """``op.create_replaceable(obj)``; reverses to a drop."""

    def __init__(self, target: Replaceable) -> None:
        self.target = target

    @classmethod
    def create_replaceable(cls, operations: Operations, target: Replaceable) -> None:
        return operations.invoke(cls(target))

    def reverse(self) -> DropReplaceableOp:
        return DropReplaceableOp(self.target)


@Operations.register_operation("drop_replaceable")
class DropReplaceableOp(MigrateOperation):
    """``op.drop_replaceable(obj)``; reverses to a create."""

    def __init__(self, target: Replaceable) -> None:
        self.target = target

    @classmethod
    def drop_replaceable(cls, operations: Operations, target: Replaceable) -> None:
        return operations.invoke(cls(target))

    def reverse(self) -> CreateReplaceableOp:
        return CreateReplaceableOp(self.target)


@Operations.register_operation("replace_replaceable")
class ReplaceReplaceableOp(MigrateOperation):
    """``op.replace_replaceable(new, replaces="rev.attr")`` on upgrade, and
    ``op.replace_replaceable(new, replace_with="rev.attr")`` on downgrade."""

    def __init__(self, target: Replaceable, replaces: str | None = None, replace_with: str | None = None) -> None:
        if (replaces is None) == (replace_with is None):
            raise ValueError("replace_replaceable takes exactly one of replaces= or replace_with=")
        self.target = target
        self.replaces = replaces
        self.replace_with = replace_with

    @classmethod
    def replace_replaceable(
        cls,
        operations: Operations,
        target: Replaceable,
        *,
        replaces: str | None = None,
        replace_with: str | None = None,
    ) -> None:
        return operations.invoke(cls(target, replaces=replaces, replace_with=replace_with))


@Operations.implementation_for(CreateReplaceableOp)
def _create(operations: Operations, operation: CreateReplaceableOp) -> None:
    _run(operations, [operation.target.create()])


@Operations.implementation_for(DropReplaceableOp)
def _drop(operations: Operations, operation: DropReplaceableOp) -> None:
    _run(operations, [operation.target.drop()])


@Operations.implementation_for(ReplaceReplaceableOp)
def _replace(operations: Operations, operation: ReplaceReplaceableOp) -> None:
    if operation.replaces is not None:
        old, new = _from_revision(operations, operation.replaces), operation.target
    else:
        old, new = operation.target, _from_revision(operations, str(operation.replace_with))
    _run(operations, new.replace(old))


def create(target: Replaceable) -> None:
    """Create ``target`` in the running migration."""
    op.invoke(CreateReplaceableOp(target))


def drop(target: Replaceable) -> None:
    """Drop ``target`` in the running migration."""
    op.invoke(DropReplaceableOp(target))


def replace(target: Replaceable, *, replaces: str | None = None, replace_with: str | None = None) -> None:
    """Upgrade to ``target`` from ``replaces`` ("revision.attribute"), or downgrade from ``target``
    back to ``replace_with``."""
    op.invoke(ReplaceReplaceableOp(target, replaces=replaces, replace_with=replace_with))


__all__ = ["Function", "Replaceable", "View", "create", "drop", "replace"]
