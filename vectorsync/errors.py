"""The one exception tree: every failure a user can meet is a ``VectorsyncError``.

A caller (the CLI, a service, a user's script) catches everything vectorsync raises on purpose
with one ``except VectorsyncError``; anything else escaping is a bug. Each message is one sentence
saying what happened and what to do, naming the offending value; ``hint`` may add what to run next.

This module sits at the package root, importing nothing, because every room raises these errors
and the rooms may not import each other upwards (``encoders`` and ``migrations`` know nothing of
``sync``).
"""

from __future__ import annotations


class VectorsyncError(Exception):
    """Base of every error vectorsync raises on purpose."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class SpecError(VectorsyncError, ValueError):
    """The spec (``vectorsync.toml``, a command's arguments) is missing or invalid."""


class DatabaseError(VectorsyncError):
    """The database cannot be reached or does not hold what vectorsync needs."""


class ModelError(VectorsyncError):
    """A model is missing, untrained, or does not fit the embedding."""


class ModelFileError(ModelError):
    """A pretrained model folder is missing, incomplete, or not the expected weights."""


class MissingExtraError(VectorsyncError, ImportError):
    """A feature needs an optional dependency group (``pip install 'vectorsync[extra]'``)."""

    def __init__(self, feature: str, extra: str, package: str) -> None:
        super().__init__(f"{feature} needs the {package} package: pip install 'vectorsync[{extra}]'")
        self.extra = extra
        self.package = package


class InputError(VectorsyncError, ValueError):
    """An input value cannot be used; names the column (when there is one) and says why."""

    def __init__(self, column: str | None, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.column = column
        self.message = message
