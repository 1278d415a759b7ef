"""A worker whose connection freezes mid-batch (network gone, nothing closed) holds nothing for long:
another worker embeds its batch within the lease, and the frozen worker, once the network is back,
fails its commit cleanly, reconnects and goes on."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.worker_support import (
    WorkerProcess,
    add_slow_writes,
    create_items,
    drained,
    insert_items,
    prepare,
    remove_slow_writes,
    scalar,
    wait_until,
    worker_totals,
)

SPEC = """
[worker]
batch_size = 100
max_wait_ms = 10
poll_seconds = 0.5
batch_deadline_seconds = 8

[[embeddings]]
name = "items"
table = "items"
key = "id"
modality = "tabular"
dim = 8
index = "none"
columns = ["a", "b", "c", "kind"]
encoder = { type = "autoencoder", seed = 1, epochs = 3, hidden = [16] }
"""


class FreezableProxy:
    """A TCP proxy on 127.0.0.1 to PostgreSQL's unix socket. ``freeze()`` stops forwarding in both
    directions and closes nothing, as a cut network does; ``thaw()`` delivers what was held."""

    def __init__(self, server_url: str) -> None:
        info = conninfo_to_dict(server_url)
        self.upstream = str(Path(info["host"]) / f".s.PGSQL.{info.get('port') or 5432}")
        self.flowing = threading.Event()
        self.flowing.set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, server_url: str, **params: str) -> str:
        info = conninfo_to_dict(server_url)
        info.update(host="127.0.0.1", port=str(self.port), **params)
        return make_conninfo(**info)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX)
            upstream.connect(self.upstream)
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            self.flowing.wait()  # frozen: hold the data, and the end of the stream, until thawed
            try:
                if not data:
                    target.shutdown(socket.SHUT_WR)
                    return
                target.sendall(data)
            except OSError:
                return

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    def close(self) -> None:
        self.thaw()
        for sock in self.sockets:
            sock.close()


def frozen_batch_in_flight(conn) -> bool:
    return bool(
        scalar(
            conn,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'frozen' AND wait_event = 'PgSleep'",
        )
    )


def test_a_frozen_worker_loses_its_batch_to_another_and_recovers_when_thawed(conn, db_url, tmp_path):
    create_items(conn, 300)
    config = tmp_path / "vectorsync.toml"
    config.write_text(SPEC)
    prepare(db_url, config)
    add_slow_writes(conn, 1.0)
    insert_items(conn, 300, 300)
    proxy = FreezableProxy(db_url)
    try:
        with (
            WorkerProcess(proxy.url(db_url, application_name="frozen"), config, tmp_path / "frozen.log") as frozen,
            WorkerProcess(db_url, config, tmp_path / "other.log") as other,
        ):
            wait_until(lambda: frozen_batch_in_flight(conn), 180, "a batch of the proxied worker", interval=0.02)
            proxy.freeze()
            frozen_at = time.monotonic()
            # the frozen batch (and any batch the other worker holds right now): leased items
            leased = [r[0] for r in conn.execute("SELECT key FROM vectorsync.queue WHERE leased_until > now()")]
            wait_until(
                lambda: scalar(
                    conn,
                    "SELECT count(*) FROM items_embeddings WHERE id::text = ANY(%s)",
                    (leased,),
                ) == len(leased)
                and not scalar(conn, "SELECT count(*) FROM vectorsync.pending WHERE key = ANY(%s)", (leased,)),
                30,
                "another worker to embed the frozen worker's batch",
            )
            taken_over = time.monotonic() - frozen_at
            print(f"\nfrozen worker's batch ({len(leased)} leased items) embedded by another after {taken_over:.1f}s")
            assert leased
            wait_until(lambda: drained(conn, 600), 120, "the other worker to drain the queue")

            proxy.thaw()
            wait_until(lambda: "reconnected" in frozen.output(), 120, "the frozen worker to reconnect")
            assert other.terminate() == 0
            remove_slow_writes(conn)
            insert_items(conn, 600, 50)
            wait_until(lambda: drained(conn, 650), 120, "the thawed worker to embed new rows on its own")
            assert frozen.terminate() == 0, frozen.output()
        # Nothing lost, nothing doubled: every row was embedded and counted exactly once.
        assert worker_totals(conn) == (650, 0)
        assert "for the database since losing it" in frozen.output()
        assert "Traceback" not in frozen.output()
    finally:
        proxy.close()
