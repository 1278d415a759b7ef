"""``op.create_vectorsync_embedding`` and ``op.drop_vectorsync_embedding`` for Alembic revisions.

Importing ``vectorsync.migrations.operations`` inside an Alembic run registers them; outside one,
import this module first.
"""

from __future__ import annotations

from alembic.operations import MigrateOperation, Operations

from vectorsync.migrations.operations import EmbeddingObjects, create_embedding, drop_embedding


@Operations.register_operation("create_vectorsync_embedding")
class CreateEmbeddingOp(MigrateOperation):
    """``op.create_vectorsync_embedding(EmbeddingObjects(...))``."""

    def __init__(self, objects: EmbeddingObjects) -> None:
        self.objects = objects

    @classmethod
    def create_vectorsync_embedding(cls, operations: Operations, objects: EmbeddingObjects) -> None:
        return operations.invoke(cls(objects))

    def reverse(self) -> DropEmbeddingOp:
        return DropEmbeddingOp(self.objects.name)


@Operations.register_operation("drop_vectorsync_embedding")
class DropEmbeddingOp(MigrateOperation):
    """``op.drop_vectorsync_embedding("items")``."""

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def drop_vectorsync_embedding(cls, operations: Operations, name: str) -> None:
        return operations.invoke(cls(name))


@Operations.implementation_for(CreateEmbeddingOp)
def _create(operations: Operations, operation: CreateEmbeddingOp) -> None:
    create_embedding(operations.get_bind(), operation.objects)


@Operations.implementation_for(DropEmbeddingOp)
def _drop(operations: Operations, operation: DropEmbeddingOp) -> None:
    drop_embedding(operations.get_bind(), operation.name)
