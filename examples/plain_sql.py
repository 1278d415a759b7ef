"""Similarity search in plain SQL with vectorsync's functions.

    python examples/plain_sql.py
"""

import json

import psycopg
from flowers import database_url, prepare


def main() -> None:
    url = database_url()
    prepare(url)
    with psycopg.connect(url, autocommit=True) as conn:
        print("the 5 flowers nearest to flower 0, with their species:")
        for key, distance, species in conn.execute(
            "SELECT n.key, n.distance, f.species FROM vectorsync.nearest('flowers', '0', 5) n "
            "JOIN flowers f ON f.id = n.key::integer ORDER BY n.distance"
        ):
            print(f"  {key:>4}  {species:<12} {distance:.4f}")

        print("nearest virginica flowers to flower 0 (a filter on source columns, as JSON):")
        rows = conn.execute(
            "SELECT key, distance FROM vectorsync.nearest_where('flowers', '0', 3, %s)",
            (json.dumps({"species": "virginica"}),),
        ).fetchall()
        print("  " + ", ".join(f"{key} ({distance:.4f})" for key, distance in rows))

        print("nearest to a given vector, with a wider HNSW search for this call:")
        vector = conn.execute("SELECT embedding::text FROM flowers_embeddings WHERE id = 100").fetchone()[0]
        rows = conn.execute(
            "SELECT key, distance FROM vectorsync.nearest_to('flowers', %s::vector, 3, ef_search => 100)", (vector,)
        ).fetchall()
        print("  " + ", ".join(f"{key} ({distance:.4f})" for key, distance in rows))

        print("k-NN join: each of flowers 0, 50, 100 with its 2 nearest:")
        for key, neighbour, distance, rank in conn.execute(
            "SELECT * FROM vectorsync.knn_join('flowers', ARRAY['0', '50', '100'], 2)"
        ):
            print(f"  {key:>4} #{rank}: {neighbour:>4} ({distance:.4f})")

        name, source_rows, embedded, pending, failed, version = conn.execute(
            "SELECT name, source_rows, embedded, pending, failed, model_version FROM vectorsync.status"
        ).fetchone()
        print(f"status: {name}: {embedded}/{source_rows} embedded, {pending} pending, {failed} failed, "
              f"model version {version}")


if __name__ == "__main__":
    main()
