"""The ``vectorsync`` command line.

Every command reads the config (``--config``, default ``./vectorsync.toml``) and connects by the
precedence ``--database-url`` > ``VECTORSYNC_DATABASE_URL`` > ``[database] url`` > the embedded
PostgreSQL. Expected failures (a ``VectorsyncError``) print one line and a hint and exit 1; any
other exception is a bug: a one-line hint, or its traceback with ``--verbose``.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import vectorsync
from vectorsync.errors import InputError, SpecError, VectorsyncError
from vectorsync.sync import db
from vectorsync.sync.progress import Progress as ProgressCallback
from vectorsync.sync.spec import Config, load_config

app = typer.Typer(
    help="Keep vector embeddings of your PostgreSQL tables in sync, in pgvector columns.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # click's plain help: typer's rich panels label on/off flags "<bool>" as if they took a value
    rich_markup_mode=None,
)
# soft_wrap: lines longer than the terminal (a URL, a command to copy) are never broken mid-word;
# tables still fit the width
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)
#: Set by ``--verbose``; read when an unexpected exception reaches ``main_entry``.
_verbose = False


@dataclass
class State:
    config_path: Path
    database_url: str | None
    _config: Config | None = None
    _url: str | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def config_or_empty(self) -> Config:
        return self.config if self.config_path.exists() else Config()

    @property
    def url(self) -> str:
        if self._url is None:
            config_url = self.config_or_empty().database.url
            self._url = db.resolve_url(self.database_url, config_url, self.config_path)
        return self._url

    def where(self) -> str:
        """The config and the database in use, in one line."""
        config = str(self.config_path) + ("" if self.config_path.exists() else " (not found)")
        database = db.describe(self.database_url, self.config_or_empty().database.url, self.config_path, self.url)
        return f"config {config}; database {database}"


def _state(ctx: typer.Context) -> State:
    return ctx.obj


def _print_version(value: bool) -> None:
    if value:
        out.print(f"vectorsync {vectorsync.__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[Path, typer.Option("--config", "-c", help="Spec file.", envvar="VECTORSYNC_CONFIG")] = Path(
        "vectorsync.toml"
    ),
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", help="PostgreSQL URL; overrides VECTORSYNC_DATABASE_URL and the config."),
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log more; show the traceback of an unexpected error.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """vectorsync: embeddings of rows, images, faces, text and graphs, kept in sync in pgvector.

    Without a database URL it runs an embedded PostgreSQL + pgvector in .vectorsync/ beside the
    config file (or VECTORSYNC_DATA_DIR).
    """
    global _verbose
    _verbose = verbose
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    ctx.obj = State(config, database_url)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def progress_task(bar: Progress, description: str) -> ProgressCallback:
    """A new bar on ``bar`` that the service layer's plain progress callbacks move."""
    task = bar.add_task(description, total=None, info="")

    def update(done: int, total: int | None, message: str) -> None:
        bar.update(task, completed=done, total=total, info=message)

    return update


@app.command("db-url")
def db_url(ctx: typer.Context) -> None:
    """Print the database URL in use (starts the embedded server if that is the one)."""
    out.print(_state(ctx).url, highlight=False, soft_wrap=True)


@app.command("db-stop")
def db_stop(ctx: typer.Context) -> None:
    """Stop the embedded PostgreSQL server cleanly (its data stays)."""
    directory = db.data_dir(_state(ctx).config_path)
    stopped = db.stop_embedded(directory)
    console.print("embedded server stopped" if stopped else f"no embedded server is running in {directory}")


@app.command()
def init(
    ctx: typer.Context,
    tables: Annotated[list[str] | None, typer.Argument(help="Tables to look at (default: all).")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Write the proposal without asking.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing config file.")] = False,
    search_dir: Annotated[
        list[Path] | None,
        typer.Option("--search-dir", help="Where relative file paths in columns are looked for (default: the "
                     "config's folder and the current one)."),
    ] = None,
) -> None:
    """Look at the database and propose embeddings (tabular, image, text, graph) as a commented config file."""
    from vectorsync.sync import introspect

    state = _state(ctx)
    path = state.config_path
    if path.exists() and not force:
        raise SpecError(f"{path} already exists; pass --force to overwrite it or --config to write elsewhere")
    url = db.resolve_url(state.database_url, None, path)
    with db.connection(url, autocommit=True) as conn:
        result = introspect.propose(conn, tables, config_dir=path.resolve().parent, search_dirs=search_dir)
    table = Table(title="proposed embeddings")
    for column in ("name", "table", "modality", "columns", "dim", "why"):
        table.add_column(column)
    for p in result.proposals:
        table.add_row(p.name, p.table, p.modality, p.columns, str(p.entry["dim"]), p.why)
    out.print(table)
    for name, reason in result.skipped:
        console.print(f"not proposed: {name} {reason}", highlight=False)
    if not result.proposals:
        raise SpecError("found nothing to embed; name the tables to look at, or write vectorsync.toml by hand")
    text = introspect.render(result, "Proposed by `vectorsync init`; review, edit, then run `vectorsync migrate`.")
    if not yes and not typer.confirm(f"write {path}?"):
        console.print("nothing written")
        raise typer.Exit(1)
    introspect.write(path, text, force=force)
    console.print(f"wrote {path}; next: vectorsync migrate && vectorsync train NAME && vectorsync sync")


@app.command()
def doctor(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Show the server's PostgreSQL and pgvector versions, which features are on, and what an upgrade brings."""
    from vectorsync.sync import capabilities

    with db.connection(_state(ctx).url) as conn:
        found = capabilities.detect(conn)
    features = [
        {"feature": f.name, "on": found.has(f.name), "needs": capabilities.short(f.needs), "gain": f.gain}
        for f in capabilities.FEATURES
    ]
    if as_json:
        out.print_json(data={
            "postgres": found.postgres, "pgvector": capabilities.show(found.pgvector),
            "pgvector_installed": found.pgvector_installed, "features": features,
        })
        return
    out.print(f"PostgreSQL {found.postgres}, pgvector {capabilities.show(found.pgvector)}"
              f"{'' if found.pgvector_installed else ' (available, not created yet: vectorsync migrate creates it)'}",
              highlight=False)
    for f in features:
        mark = "on " if f["on"] else "off"
        out.print(f"  {mark}  {f['feature']}" + ("" if f["on"] else f"  (pgvector >= {f['needs']}: {f['gain']})"),
                  highlight=False)
    if found.missing():
        out.print("Upgrade pgvector to turn on what is off (ALTER EXTENSION vector UPDATE after installing it).",
                  highlight=False)


@app.command()
def migrate(
    ctx: typer.Context,
    downgrade: Annotated[bool, typer.Option("--downgrade", help="Remove everything vectorsync made.")] = False,
    recreate: Annotated[
        list[str] | None,
        typer.Option("--recreate", help="Drop and rebuild this embedding's table (e.g. after a dim change)."),
    ] = None,
) -> None:
    """Create or update vectorsync's schema, target tables, indexes and triggers (Alembic)."""
    from vectorsync.sync import service

    state = _state(ctx)
    if downgrade:
        dropped = service.remove(state.url)
        console.print(f"removed vectorsync's schema and {len(dropped)} embedding table(s); your tables are untouched")
        return
    for spec in state.config.embeddings:
        if getattr(spec, "allow_any_path", False):
            console.print(
                f"[yellow]warning:[/] embedding {spec.name!r} sets allow_any_path = true: its workers read any file "
                "a row names that they can read (e.g. /etc/passwd); set base_dir instead unless you trust every writer"
            )
    report = service.migrate(state.url, state.config, recreate=recreate)
    changed = "up to date" if report.revision_before == report.revision_after else f"-> {report.revision_after}"
    console.print(f"schema {changed}; embeddings: {', '.join(report.embeddings) or 'none'}")


@app.command()
def train(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Embedding to train.")],
    sample: Annotated[int | None, typer.Option(help="Train on at most this many rows.")] = None,
) -> None:
    """Train the embedding's encoder on its table's rows and store it as a new model version."""
    from vectorsync.sync import service

    state = _state(ctx)
    with _progress() as bar:
        progress = progress_task(bar, f"train {name}")
        result = service.train(state.url, state.config, name, sample=sample, progress=progress)
    summary = _training_summary(result.rows, result.metrics)
    console.print(f"{name}: model version {result.version} {summary}", soft_wrap=True)
    if result.building is not None:
        console.print(
            f"{name}: generation {result.building} is being built with it; queries keep using the generation in "
            "service until a worker (or `vectorsync sync`) completes, indexes and swaps it in",
            soft_wrap=True,
        )


def _training_summary(rows: int, metrics: dict[str, float]) -> str:
    """"trained on 900 rows, 100 held out (...)", saying how many rows had unusable inputs."""
    shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not k.endswith("_rows"))
    if "train_rows" not in metrics:
        return f"trained on {rows} rows ({shown})"
    trained, held = int(metrics["train_rows"]), int(metrics.get("holdout_rows", 0))
    text = f"trained on {trained} rows, {held} more held out to measure it ({shown})"
    if trained + held < rows:
        text += f"; {rows - trained - held} of {rows} rows were skipped: their inputs could not be used"
    return text



@app.command("sync")
def sync_command(
    ctx: typer.Context,
    names: Annotated[list[str] | None, typer.Argument(help="Embeddings to sync (default: all).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per batch (default 2048).")] = None,
) -> None:
    """Embed every row that has no vector from the current model or whose inputs changed; remove
    vectors of deleted rows. Exits 0 when nothing is pending; a second run does no work."""

    state = _state(ctx)
    _sync_all(state, [s.name for s in state.config.select(names)], batch_size)


def _sync_all(state: State, names: list[str], batch_size: int | None) -> None:
    from vectorsync.sync import service
    from vectorsync.sync.worker import first_encode_seconds, seconds_since_start

    failed: dict[str, int] = {}
    first_batch: list[float] = []
    with _progress() as bar:
        for name in names:
            bar_update = progress_task(bar, f"sync {name}")

            def progress(done: int, total: int | None, message: str, bar_update: ProgressCallback = bar_update) -> None:
                if done and not first_batch:
                    first_batch.append(seconds_since_start())
                bar_update(done, total, message)

            result = service.sync(state.url, state.config, name, batch_size=batch_size, progress=progress)
            if result.trained is not None:
                bar.console.print(f"{name}: had no model; trained version {result.trained.version} first")
                first_batch[:] = [0.0]  # its progress was training steps: no start-up figure to report
            bar.console.print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in result.counts().items()))
            if result.failed:
                failed[name] = result.failed
        if first_batch and first_batch[0]:
            bar.console.print(
                f"first batch began encoding {first_encode_seconds() or 0.0:.1f}s and was written "
                f"{first_batch[0]:.1f}s after the command started"
            )
    _refuse_failures(failed)


def _refuse_failures(failed: dict[str, int]) -> None:
    """A sync that left rows unembedded did not do what it was asked: say so, where to look, what to run."""
    if not failed:
        return
    first = next(iter(failed))
    raise InputError(
        None,
        "; ".join(f"{count} row(s) of {name} could not be embedded" for name, count in failed.items()),
        hint=f"see why with: SELECT key, error FROM vectorsync.failed WHERE embedding = '{first}'; "
        f"fix those rows (or files), then run: vectorsync retry {' '.join(failed)}",
    )


@app.command()
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Per embedding: source rows, embedded, pending, failed, model version, lag, throughput; live workers."""
    from vectorsync.sync import service

    state = _state(ctx)
    if (
        not state.config_path.exists()
        and db.configured_url(state.database_url, None) is None
        and not db.data_dir(state.config_path).exists()
    ):
        # no config and no embedded server here yet: starting an empty one would mislead
        raise SpecError(
            f"config file {str(state.config_path)!r} not found and no database URL given, so there is nothing "
            "to report",
            hint="run status in your project's folder, or pass --config PATH or --database-url URL",
        )
    report = service.status(state.url, state.config_or_empty())
    if as_json:
        out.print_json(json.dumps(report, default=str))
        return
    console.print(state.where(), highlight=False, soft_wrap=True)
    if not report["migrated"]:
        console.print("no embeddings yet: run vectorsync migrate", highlight=False)
        return
    out.print(_status_table(report["embeddings"]))
    for row in report["embeddings"]:
        if row.get("broken"):
            console.print(f"{row['name']} is broken: {row['broken']}", highlight=False, soft_wrap=True)
        if row.get("building"):
            out.print(f"{row['name']}: building generation {row['building']}", highlight=False, soft_wrap=True)
    if report["workers"] is None:
        out.print("live workers: not shown, this role may not read vectorsync.workers")
    elif report["workers"]:
        out.print(_workers_table(report["workers"]))
    else:
        out.print("no live workers")


def _narrow_table(title: str, headers: dict[str, str]) -> Table:
    """A table that fits 80 columns: short headers (the long names are in ``--json``), names that
    wrap instead of being cut, numbers right-aligned."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, title_justify="left")
    for header, justify in headers.items():
        table.add_column(header, justify="left" if justify == "<" else "right", overflow="fold", no_wrap=justify == ">")
    return table


def _age(seconds: float | None) -> str:
    if seconds is None:
        return ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _status_table(rows: list[dict[str, Any]]) -> Table:
    table = _narrow_table(
        "embeddings",
        {"name": "<", "rows": ">", "embedded": ">", "pending": ">", "failed": ">", "model": ">", "lag": ">",
         "rows/s": ">", "synced": ">"},
    )
    # names keep their width up to a point, then wrap (numbers never do)
    table.columns[0].min_width = min(14, max((len(str(row["name"])) for row in rows), default=4))
    now = time.time()
    for row in rows:
        last = row.get("last_sync")
        table.add_row(
            str(row["name"]),
            *(str(row.get(c, "")) for c in ("source_rows", "embedded", "pending", "failed")),
            "" if row.get("model_version") is None else str(row["model_version"]),
            _age(row.get("lag_seconds")),
            f"{row.get('per_second_1m', 0):g}",
            "never" if last is None else _age(now - last.timestamp()) + " ago",
        )
    return table


def _workers_table(rows: list[dict[str, Any]]) -> Table:
    table = _narrow_table("live workers", {"id": "<", "embeddings": "<", "embedded": ">", "failed": ">", "seen": ">"})
    for row in rows:
        table.add_row(
            row["id"], ", ".join(row["embeddings"]), str(row["embedded"]), str(row["failed"]),
            _age(row["heartbeat_age_s"]) + " ago",
        )
    return table


@app.command()
def search(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Embedding.")],
    key: Annotated[str, typer.Argument(help="Key of the row whose neighbours you want.")],
    k: Annotated[int, typer.Option("-k", help="How many neighbours.")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Print [{key, distance}, ...].")] = False,
) -> None:
    """The k nearest rows to row KEY (itself excluded), by the spec's distance, through the index."""
    from vectorsync.sync import service

    state = _state(ctx)
    result = [asdict(n) for n in service.nearest(state.url, name, key, k)]
    if as_json:
        out.print(json.dumps(result), highlight=False, soft_wrap=True)
        return
    table = Table(title=f"nearest to {name} {key}")
    table.add_column("key")
    table.add_column("distance")
    for row in result:
        table.add_row(row["key"], f"{row['distance']:.4f}")
    out.print(table)


@app.command()
def hybrid(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Text embedding with text_search in its spec.")],
    query: Annotated[str, typer.Argument(help="What to look for: words, \"a phrase\", -excluded, or OR.")],
    k: Annotated[int, typer.Option("-k", help="How many rows.")] = 10,
    vector_weight: Annotated[float, typer.Option(help="Weight of the vector ranking (0: keywords only).")] = 1.0,
    text_weight: Annotated[float, typer.Option(help="Weight of the keyword ranking (0: vectors only).")] = 1.0,
    rrf_k: Annotated[int, typer.Option(help="Reciprocal rank fusion constant: higher flattens the ranks.")] = 60,
    as_json: Annotated[bool, typer.Option("--json", help="Print [{key, score, vector_rank, text_rank}, ...].")] = False,
) -> None:
    """The k rows that best match QUERY by keywords and by meaning (the query encoded by the
    embedding's model), fused by reciprocal rank fusion."""
    from vectorsync.sync import service

    state = _state(ctx)
    hits = service.hybrid(
        state.url, state.config, name, query, k, vector_weight=vector_weight, text_weight=text_weight, rrf_k=rrf_k
    )
    result = [asdict(hit) for hit in hits]
    if as_json:
        out.print(json.dumps(result), highlight=False, soft_wrap=True)
        return
    table = Table(title=f"hybrid search of {name}: {query}")
    for column in ("key", "score", "vector rank", "keyword rank"):
        table.add_column(column)
    for row in result:
        table.add_row(
            row["key"], f"{row['score']:.5f}", str(row["vector_rank"] or "-"), str(row["text_rank"] or "-")
        )
    out.print(table)


class RoleKind(StrEnum):
    worker = "worker"
    reader = "reader"


@app.command()
def grant(
    ctx: typer.Context,
    kind: Annotated[RoleKind, typer.Argument(help="worker: runs `vectorsync worker`; reader: queries embeddings.")],
    role: Annotated[str, typer.Argument(help="The role (created, able to log in, if it does not exist).")],
    check: Annotated[bool, typer.Option("--check", help="Change nothing; list what ROLE lacks.")] = False,
) -> None:
    """Create or check a worker or reader role with exactly the rights it needs (see the README)."""
    from vectorsync.sync import privileges

    state = _state(ctx)
    with db.connection(state.url) as conn:
        report = privileges.setup_role(conn, kind.value, role, check=check)
        conn.commit()
    for name in report.unreadable:
        console.print(f"{role} may not read the source table of embedding {name!r}: it gets nothing on it")
    if check:
        for right in report.missing:
            out.print(f"missing: {right}", highlight=False)
        if report.missing:
            raise typer.Exit(1)
        out.print(f"{role} holds everything a {kind.value} needs", highlight=False)
        return
    if report.created:
        out.print(f"created role {role} (LOGIN, no password: set one with ALTER ROLE)", highlight=False)
    for right in report.granted:
        out.print(f"granted {right}", highlight=False)
    out.print(f"{role} holds everything a {kind.value} needs", highlight=False)


@app.command()
def retry(
    ctx: typer.Context,
    names: Annotated[list[str] | None, typer.Argument(help="Embeddings (default: all).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per batch (default 2048).")] = None,
) -> None:
    """Re-queue items from vectorsync.failed (after you fixed their rows or files) and sync them;
    exits non-zero if some fail again."""
    from vectorsync.sync import service

    state = _state(ctx)
    selected = [s.name for s in state.config.select(names)]
    count = service.retry(state.url, state.config, selected)
    console.print(f"re-queued {count} failed item(s)")
    _sync_all(state, selected, batch_size)


@app.command()
def worker(
    ctx: typer.Context,
    names: Annotated[list[str] | None, typer.Argument(help="Embeddings to serve (default: all).")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", "-n", min=1, help="Worker threads.")] = 1,
    batch_size: Annotated[int | None, typer.Option(help="Items per batch (default: [worker] batch_size).")] = None,
    max_wait_ms: Annotated[
        int | None, typer.Option(help="Longest a batch lingers to gather changes while they keep arriving.")
    ] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics on this port.")] = None,
    shutdown_timeout: Annotated[float, typer.Option(help="Seconds to finish the current batch on stop.")] = 10.0,
) -> None:
    """Run until SIGTERM/SIGINT: wait for changes (LISTEN), embed them, keep graph bridges fresh."""
    from vectorsync.sync.daemon import run_workers

    state = _state(ctx)
    run_workers(
        state.url,
        state.config,
        names,
        concurrency=concurrency,
        batch_size=batch_size,
        max_wait_ms=max_wait_ms,
        metrics_port=metrics_port,
        shutdown_timeout=shutdown_timeout,
        console=console,
    )


@app.command()
def rollback(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Embedding.")],
) -> None:
    """Put the generation that served before the current one back in service, at once."""
    from vectorsync.sync import service

    state = _state(ctx)
    restored, queued = service.rollback(state.url, state.config, name)
    console.print(
        f"{name}: generation {restored.generation} (model version {restored.model_version}) is in service again"
        + (f"; {queued} row(s) that changed since are queued for it" if queued else "")
    )


generations_app = typer.Typer(help="List and drop an embedding's generations.", no_args_is_help=True)
app.add_typer(generations_app, name="generations")


@generations_app.command("list")
def generations_list(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Embedding.")],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Every generation of NAME: state, model version, dim, distance, storage, rows; progress while building."""
    from vectorsync.sync import service

    state = _state(ctx)
    rows = service.generations_of(state.url, state.config, name)
    if as_json:
        out.print_json(json.dumps(rows, default=str))
        return
    columns = [
        "generation", "state", "model_version", "dim", "distance", "storage", "encoder", "rows", "progress",
        "seconds_left",
    ]
    table = Table(title=f"generations of {name}")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*[("" if row.get(c) is None else str(row.get(c))) for c in columns])
    out.print(table)


@generations_app.command("drop")
def generations_drop(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Embedding.")],
    numbers: Annotated[
        list[int] | None, typer.Argument(help="Generations to drop (default: every retired one).")
    ] = None,
) -> None:
    """Drop retired generations (or the one being built, when named); the one in service stays."""
    from vectorsync.sync import service

    state = _state(ctx)
    dropped = service.drop_generations(state.url, state.config, name, numbers)
    shown = ", ".join(map(str, dropped))
    console.print(f"{name}: dropped generation(s) {shown}" if dropped else f"{name}: nothing to drop")


@app.command()
def reindex(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Embedding.")],
) -> None:
    """Rebuild the embedding's vector index with the spec's parameters."""
    from vectorsync.sync import service

    state = _state(ctx)
    seconds = service.reindex(state.url, state.config, name)
    console.print(f"{name}: index rebuilt in {seconds:.1f}s")


@app.command()
def demo(
    ctx: typer.Context,
    k: Annotated[int, typer.Option("-k", help="Neighbours to show per example.")] = 5,
) -> None:
    """Load a real dataset into the embedded database, migrate, train, sync, and show neighbours."""
    from vectorsync.sync.demo import run_demo

    state = _state(ctx)
    run_demo(state, k=k, console=out, progress=_progress, progress_task=progress_task)


@app.command()
def report(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Embedding.")],
    label: Annotated[
        str | None, typer.Option(help="Column of the source table: compare kNN label agreement with a baseline.")
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="HTML file (default NAME-report.html).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON instead.")] = False,
    sample: Annotated[int, typer.Option(help="Rows compared at most.")] = 2000,
) -> None:
    """Model quality: training curves, held-out metrics and, with --label, kNN (k=5) label agreement
    against a same-dimension baseline (PCA, TF-IDF + SVD, raw graph features) on the same rows."""
    from vectorsync.sync import catalog
    from vectorsync.sync import report as reports

    state = _state(ctx)
    spec = state.config.embedding(name)
    with db.connection(state.url, autocommit=True) as conn:
        data = reports.build(conn, catalog.load(conn, spec), label=label, sample=sample)
    if as_json:
        out.print(json.dumps(data, default=str), highlight=False, soft_wrap=True)
        return
    path = output or Path(f"{name}-report.html")
    path.write_text(reports.render_html(data))
    if data.get("verdict"):
        console.print(data["verdict"], highlight=False)
    console.print(f"wrote {path}")


@app.command()
def ui(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to bind; beyond loopback needs --allow-remote.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8765,
    allow_remote: Annotated[
        bool, typer.Option("--allow-remote", help="Allow binding beyond loopback; every request then needs the token.")
    ] = False,
    token: Annotated[
        str | None, typer.Option(envvar="VECTORSYNC_UI_TOKEN", help="Token for remote use (default: a random one).")
    ] = None,
    allow_retry: Annotated[bool, typer.Option("--allow-retry", help="Enable the retry button (a write).")] = False,
) -> None:
    """A local web explorer: status, nearest neighbours with thumbnails, a 2-D map, models and reports."""
    try:
        from vectorsync.sync.ui import server
    except ImportError as exc:
        raise SpecError(f"the UI needs the 'ui' extra ({exc.name} is missing): pip install 'vectorsync[ui]'") from None

    state = _state(ctx)
    url, token = server.plan(host, port, allow_remote=allow_remote, token=token)
    console.print(f"vectorsync ui on {url} (read-{'write: retry enabled' if allow_retry else 'only'}); Ctrl+C stops it")
    server.serve(state.url, state.config, host=host, port=port, token=token, allow_retry=allow_retry)


def main_entry(argv: list[str] | None = None) -> int:
    """Run the CLI. A ``VectorsyncError`` is expected: its message (and hint) on stderr, exit 1.
    Anything else is a bug: a one-line hint, or the traceback with ``--verbose``; exit 2."""
    global _verbose
    _verbose = False
    try:
        app(args=argv, prog_name="vectorsync")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except VectorsyncError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        if exc.hint:
            console.print(f"hint: {exc.hint}", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    except Exception as exc:
        if _verbose:
            console.print_exception()
        else:
            console.print(
                f"[red]unexpected error:[/red] {type(exc).__name__}: {' '.join(str(exc).split())[:200]}",
                highlight=False,
                soft_wrap=True,
            )
            console.print("hint: this is a bug in vectorsync; rerun with --verbose and report it", soft_wrap=True)
        return 2
    return 0


def run() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main_entry())


if __name__ == "__main__":
    run()
