"""vectorsync's vectors from a SQLAlchemy 2 model: attach the embedding, then query by similarity.

    python examples/sqlalchemy_orm.py
"""

import asyncio
import importlib.util

import psycopg
from flowers import database_url, prepare
from sqlalchemy import REAL, Text, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from vectorsync.embedding_sql import attach_embedding, embedding_distance, nearest, similar_to


class Base(DeclarativeBase):
    pass


class Flower(Base):
    __tablename__ = "flowers"

    id: Mapped[int] = mapped_column(primary_key=True)
    species: Mapped[str] = mapped_column(Text)
    sepal_length: Mapped[float] = mapped_column(REAL)
    sepal_width: Mapped[float] = mapped_column(REAL)
    petal_length: Mapped[float] = mapped_column(REAL)
    petal_width: Mapped[float] = mapped_column(REAL)


# Maps flowers_embeddings (kept in sync by vectorsync) and adds Flower.embedding_row.
attach_embedding(Flower, "flowers", dim=3, distance="cosine")


def main() -> None:
    url = database_url()
    prepare(url)
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(url))
    with Session(engine) as session:
        flower = session.get(Flower, 0)
        print(f"flower 0 is a {flower.species}; its vector: {[round(x, 3) for x in flower.embedding_row.embedding]}")

        print("similar_to(flower, k=5):")
        for other, distance in session.execute(similar_to(flower, k=5)):
            print(f"  {other.id:>4}  {other.species:<12} {distance:.4f}")

        print("nearest(Flower, to=vector, k=3, where=Flower.species != 'setosa'):")
        vector = session.get(Flower, 120).embedding_row.embedding
        for other, distance in session.execute(nearest(Flower, to=vector, k=3, where=Flower.species != "setosa")):
            print(f"  {other.id:>4}  {other.species:<12} {distance:.4f}")

        # The distance expression composes with your own queries.
        farthest = session.execute(
            select(Flower.id, embedding_distance(Flower, flower).label("d"))
            .join(Flower.embedding_row)
            .order_by(embedding_distance(Flower, flower).desc())
            .limit(1)
        ).one()
        print(f"the flower least like flower 0: {farthest.id} ({farthest.d:.4f})")
    engine.dispose()
    if importlib.util.find_spec("greenlet") is None:
        print("async: skipped; SQLAlchemy's asyncio needs greenlet: pip install 'sqlalchemy[asyncio]'")
        return
    asyncio.run(with_async_session(url))


async def with_async_session(url: str) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    engine = create_async_engine("postgresql+psycopg://", async_creator=lambda: psycopg.AsyncConnection.connect(url))
    async with AsyncSession(engine) as session:
        flower = await session.get(Flower, 50)
        rows = (await session.execute(similar_to(flower, k=3))).all()
        found = ", ".join(f"{other.id} {other.species}" for other, _ in rows)
        print(f"async: flowers like {flower.id} ({flower.species}): {found}")
    await engine.dispose()


if __name__ == "__main__":
    main()
