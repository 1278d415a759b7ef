"""A small similarity endpoint: ``GET /similar/{id}?k=5`` returns the nearest flowers as JSON.

    python examples/web_service.py --port 8000
    curl 'http://127.0.0.1:8000/similar/0?k=3'

The standard library's threading HTTP server and a psycopg connection pool keep it dependency-free;
the handler is one SQL call, the same in FastAPI or any other framework.
"""

from __future__ import annotations

import argparse
import json
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import psycopg
from flowers import database_url, prepare
from psycopg_pool import ConnectionPool

SIMILAR = (
    "SELECT f.id, f.species, n.distance FROM vectorsync.nearest('flowers', %s, %s) n "
    "JOIN flowers f ON f.id = n.key::integer ORDER BY n.distance"
)


def similar(pool: ConnectionPool, key: str, k: int) -> list[dict]:
    with pool.connection() as conn:
        rows = conn.execute(SIMILAR, (key, k)).fetchall()
    return [{"id": id_, "species": species, "distance": distance} for id_, species, distance in rows]


def handler(pool: ConnectionPool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            parts = url.path.strip("/").split("/")
            if len(parts) != 2 or parts[0] != "similar" or not parts[1].isdigit():
                return self.reply(HTTPStatus.NOT_FOUND, {"error": "use GET /similar/{id}?k=5"})
            try:
                k = int(parse_qs(url.query).get("k", ["5"])[0])
            except ValueError:
                return self.reply(HTTPStatus.BAD_REQUEST, {"error": "k must be an integer"})
            if not 1 <= k <= 100:
                return self.reply(HTTPStatus.BAD_REQUEST, {"error": "k must be between 1 and 100"})
            try:
                return self.reply(HTTPStatus.OK, {"id": int(parts[1]), "similar": similar(pool, parts[1], k)})
            except (psycopg.errors.NoDataFound, psycopg.errors.RaiseException) as exc:  # no such row, or no vector yet
                return self.reply(HTTPStatus.NOT_FOUND, {"error": exc.diag.message_primary})

        def reply(self, status: HTTPStatus, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    args = parser.parse_args()
    url = database_url()
    prepare(url)
    with ConnectionPool(url, min_size=1, max_size=4, kwargs={"autocommit": True}) as pool:
        server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(pool))
        print(f"serving on http://127.0.0.1:{server.server_port}/similar/{{id}}?k=5", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


if __name__ == "__main__":
    main()
