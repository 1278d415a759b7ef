"""The explorer's FastAPI app: Status, Explore, Map and Models pages, and the report.

Safe by default: it reads with the connection's own role, in read-only transactions (retrying
failed items is the one write, and only with ``allow_retry``); it serves images only as
re-encoded PNG thumbnails, and files only from inside the spec's ``base_dir``; every database
value reaches the page through autoescaped templates or JSON; a token guards every request when
one is set (``vectorsync ui`` sets one whenever it binds beyond 127.0.0.1).
"""

from __future__ import annotations

import importlib.util
import io
import secrets
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psycopg
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pgvector.psycopg import register_vector
from psycopg import sql
from psycopg_pool import ConnectionPool

from vectorsync.sync import catalog, monitor, queue, report, sources
from vectorsync.sync.models import ModelCache
from vectorsync.sync.report import vector_array
from vectorsync.sync.spec import Config, EmbeddingSpec, ImageSpec, SpecError, TextSpec
from vectorsync.sync.ui.templating import environment

#: Vectors projected on the map at most.
MAP_SAMPLE = 20_000
THUMBNAIL_PX = 128
SNIPPET_CHARS = 240
TOKEN_COOKIE = "vectorsync_token"


@dataclass
class Settings:
    url: str
    config: Config
    allow_retry: bool = False
    #: When set, every request must carry it (``?token=``, then a cookie, or a Bearer header).
    token: str | None = None
    projections: dict[tuple[str, int | None, str], dict[str, Any]] = field(default_factory=dict)


def _configure(conn: psycopg.Connection) -> None:
    # read-only unless a transaction asks otherwise (the retry button does, explicitly)
    conn.execute("SET default_transaction_read_only = on")
    try:
        register_vector(conn)
    except psycopg.ProgrammingError:  # not migrated yet: pages say so
        pass


def create_app(settings: Settings) -> FastAPI:
    """The app; the caller runs it (``vectorsync ui`` with uvicorn, tests with a uvicorn thread)."""
    pool = ConnectionPool(
        settings.url, min_size=1, max_size=4, kwargs={"autocommit": True}, configure=_configure, open=False
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pool.open()
        # scikit-learn takes seconds to import; load it beside the first requests, not in the map's
        threading.Thread(target=importlib.import_module, args=("sklearn.decomposition",), daemon=True).start()
        try:
            yield
        finally:
            pool.close()

    app = FastAPI(title="vectorsync", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    templates = Jinja2Templates(env=environment())
    models = ModelCache()
    model_lock = threading.Lock()
    app.mount("/static", StaticFiles(packages=[("vectorsync.sync.ui", "static")]), name="static")

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        if settings.token:
            offered = (
                request.query_params.get("token")
                or request.cookies.get(TOKEN_COOKIE)
                or request.headers.get("authorization", "").removeprefix("Bearer ")
            )
            if not offered or not secrets.compare_digest(offered, settings.token):
                return Response("a valid token is required: open the URL vectorsync ui printed", status_code=401)
        response: Response = await call_next(request)
        if settings.token and request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, settings.token, httponly=True, samesite="strict")
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
            "frame-ancestors 'none'; form-action 'self'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    def spec_of(name: str) -> EmbeddingSpec:
        try:
            return settings.config.embedding(name)
        except SpecError as exc:
            raise HTTPException(404, str(exc)) from None

    def page(request: Request, template: str, **context: Any) -> HTMLResponse:
        names = [s.name for s in settings.config.embeddings]
        return templates.TemplateResponse(
            request, template, {"names": names, "allow_retry": settings.allow_retry, **context}
        )

    # -- Status ----------------------------------------------------------------------------------

    def status_data() -> dict[str, Any]:
        with pool.connection() as conn:
            data = monitor.status(conn, settings.config)
            data["failed_items"] = queue.failed_items(conn, limit=100) if data["migrated"] else []
        return data

    @app.get("/", response_class=HTMLResponse)
    def status_page(request: Request) -> HTMLResponse:
        return page(request, "status.html", status=status_data(), active="status")

    @app.get("/fragments/status", response_class=HTMLResponse)
    def status_fragment(request: Request) -> HTMLResponse:
        return page(request, "status_table.html", status=status_data())

    @app.get("/api/status")
    def status_json() -> JSONResponse:
        return JSONResponse(_jsonable(status_data()))

    @app.post("/retry/{name}")
    def retry(name: str) -> RedirectResponse:
        if not settings.allow_retry:
            raise HTTPException(403, "retrying is off: start vectorsync ui with --allow-retry")
        spec_of(name)
        with pool.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION READ WRITE")
            queue.retry_failed(conn, [name])
        return RedirectResponse("/", status_code=303)

    # -- rows, thumbnails, snippets ----------------------------------------------------------------

    def embedding(conn: psycopg.Connection, spec: EmbeddingSpec) -> catalog.Embedding:
        try:
            return catalog.load(conn, spec)
        except catalog.NotMigrated as exc:
            raise HTTPException(409, str(exc)) from None

    def rows_of(conn: psycopg.Connection, emb: catalog.Embedding, keys: list[str]) -> dict[str, dict[str, Any]]:
        """Display data of each key: input columns (tabular), a text snippet, or a thumbnail URL."""
        spec = emb.spec
        if not keys:
            return {}
        columns = [c for c in spec.input_columns if not isinstance(spec, ImageSpec)]
        query = sql.SQL("SELECT s.{key}::text{cols} FROM {src} s WHERE s.{key} = ANY(CAST(%s AS {karr}))").format(
            key=emb.key,
            karr=emb.key_array_type,
            cols=sql.SQL("").join(sql.SQL(", s.{}").format(sql.Identifier(c)) for c in columns),
            src=emb.source,
        )
        found: dict[str, dict[str, Any]] = {}
        for row in conn.execute(query, (keys,)).fetchall():
            values = dict(zip(columns, row[1:], strict=True))
            item: dict[str, Any] = {"key": row[0]}
            if isinstance(spec, ImageSpec):
                item["thumbnail"] = f"/thumb/{spec.name}/{row[0]}"
            elif isinstance(spec, TextSpec):
                item["snippet"] = _snippet(emb, values)
            else:
                item["columns"] = [(c, _display(v)) for c, v in values.items()]
            found[row[0]] = item
        return found

    @app.get("/thumb/{name}/{key}")
    def thumbnail(name: str, key: str) -> Response:
        spec = spec_of(name)
        if not isinstance(spec, ImageSpec):
            raise HTTPException(404, f"embedding {name!r} holds no images")
        if spec.path_column and not spec.base_dir:
            raise HTTPException(404, f"embedding {name!r} has no base_dir; the UI serves files only from inside it")
        with pool.connection() as conn:
            emb = embedding(conn, spec)
            try:
                cells = conn.execute(
                    sql.SQL("SELECT {c} FROM {src} WHERE {key} = ANY(CAST(%s AS {karr}))").format(
                        c=sql.Identifier(spec.input_column), src=emb.source, key=emb.key, karr=emb.key_array_type
                    ),
                    ([key],),
                ).fetchall()
            except psycopg.errors.DataError:  # not a value of the key's type
                cells = []
        frame = pd.DataFrame(cells, columns=[spec.input_column], dtype=object)
        if frame.empty:
            raise HTTPException(404, f"no row with key {key!r} in {spec.table!r}")
        failures = sources.resolve_references(emb, frame)
        if failures:
            raise HTTPException(404, failures[0].message)
        return Response(_thumbnail_png(frame.iloc[0, 0], spec.input_column), media_type="image/png")

    # -- Explore ---------------------------------------------------------------------------------

    def query_vector(emb: catalog.Embedding, conn: psycopg.Connection, text: str) -> np.ndarray:
        spec = emb.spec
        if emb.current_version is None:
            raise HTTPException(409, f"embedding {spec.name!r} has no model yet; run `vectorsync train {spec.name}`")
        with model_lock:  # encoders are not re-entrant across threads
            encoder = models.get(conn, emb, emb.current_version)
            result = encoder.encode(pd.DataFrame({spec.input_columns[0]: [text]}))
        if result.failures:
            raise HTTPException(400, f"cannot encode the query: {result.failures[0].message}")
        return result.vectors[0]

    @app.get("/explore", response_class=HTMLResponse)
    def explore(
        request: Request,
        embedding_name: str | None = Query(None, alias="embedding"),
        key: str | None = None,
        q: str | None = None,
        k: int = Query(10, ge=1, le=100),
    ) -> HTMLResponse:
        name = embedding_name or (settings.config.embeddings[0].name if settings.config.embeddings else None)
        context: dict[str, Any] = {"active": "explore", "name": name, "key": key or "", "q": q or "", "k": k}
        if name is None:
            return page(request, "explore.html", **context)
        spec = spec_of(name)
        context["modality"] = spec.modality
        context["text_search"] = isinstance(spec, TextSpec)
        with pool.connection() as conn:
            emb = embedding(conn, spec)
            hits: list[tuple[str, float]] = []
            try:
                if key:
                    hits = conn.execute(
                        "SELECT key, distance FROM vectorsync.nearest(%s, %s, %s)", (name, key, k)
                    ).fetchall()
                elif q and isinstance(spec, TextSpec):
                    vector = query_vector(emb, conn, q)
                    hits = conn.execute(
                        "SELECT key, distance FROM vectorsync.nearest_to(%s, %s, %s)", (name, vector, k)
                    ).fetchall()
            except psycopg.DatabaseError as exc:
                # the query functions' own errors (no such row, not embedded yet, no permission) are for the user
                message = exc.diag.message_primary or ""
                if not message.startswith("vectorsync: "):
                    raise
                context["error"] = message.removeprefix("vectorsync: ")
            shown = rows_of(conn, emb, [*([key] if key and "error" not in context else []), *[h[0] for h in hits]])
        context["query_row"] = shown.get(key) if key else None
        context["neighbours"] = [
            {**shown.get(h[0], {"key": h[0]}), "distance": float(h[1])} for h in hits
        ]
        context["searched"] = bool(key or q)
        return page(request, "explore.html", **context)

    # -- Map -------------------------------------------------------------------------------------

    @app.get("/map", response_class=HTMLResponse)
    def map_page(
        request: Request, embedding_name: str | None = Query(None, alias="embedding"), color: str | None = None
    ) -> HTMLResponse:
        name = embedding_name or (settings.config.embeddings[0].name if settings.config.embeddings else None)
        columns: list[str] = []
        if name:
            spec = spec_of(name)
            with pool.connection() as conn:
                emb = embedding(conn, spec)
                columns = [
                    r[0]
                    for r in conn.execute(
                        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 "
                        "AND NOT attisdropped AND format_type(atttypid, NULL) <> 'bytea' ORDER BY attnum",
                        (emb.source.as_string(conn),),
                    ).fetchall()
                ]
        return page(
            request, "map.html", active="map", name=name, color=color or "", columns=columns, methods=_methods()
        )

    @app.get("/api/map/{name}")
    def map_data(name: str, color: str | None = None, method: str = "pca") -> JSONResponse:
        spec = spec_of(name)
        if method not in _methods():
            raise HTTPException(400, f"unknown projection {method!r}; available: {', '.join(_methods())}")
        with pool.connection() as conn:
            emb = embedding(conn, spec)
            cache_key = (name, emb.current_version, method)
            if cache_key not in settings.projections:
                settings.projections[cache_key] = _project(conn, emb, method)
            projection = settings.projections[cache_key]
            keys = projection["keys"]
            colours = _column_values(conn, emb, color, keys) if color else []
        return JSONResponse(
            {"keys": keys, "x": projection["x"], "y": projection["y"], "color": colours, "method": method}
        )

    @app.get("/api/row/{name}/{key}")
    def row_json(name: str, key: str) -> JSONResponse:
        """What a card shows of one row (the map's hover panel asks for it point by point)."""
        spec = spec_of(name)
        with pool.connection() as conn:
            emb = embedding(conn, spec)
            try:
                item = rows_of(conn, emb, [key]).get(key)
            except psycopg.errors.DataError:  # not a value of the key's type
                item = None
        if item is None:
            raise HTTPException(404, f"no row with key {key!r} in {spec.table!r}")
        return JSONResponse(_jsonable(item))

    # -- Models and reports ----------------------------------------------------------------------

    @app.get("/models", response_class=HTMLResponse)
    def models_page(request: Request, embedding_name: str | None = Query(None, alias="embedding")) -> HTMLResponse:
        name = embedding_name or (settings.config.embeddings[0].name if settings.config.embeddings else None)
        history: list[dict[str, Any]] = []
        if name:
            spec_of(name)
            with pool.connection() as conn:
                try:
                    history = report.versions(conn, name)
                except psycopg.errors.UndefinedTable:
                    history = []
        return page(request, "models.html", active="models", name=name, versions=history)

    @app.get("/api/models/{name}")
    def models_json(name: str) -> JSONResponse:
        spec_of(name)
        with pool.connection() as conn:
            return JSONResponse(_jsonable(report.versions(conn, name)))

    @app.get("/report/{name}", response_class=HTMLResponse)
    def report_page(name: str, label: str | None = None) -> HTMLResponse:
        spec = spec_of(name)
        with pool.connection() as conn:
            emb = embedding(conn, spec)
            try:
                data = report.build(conn, emb, label=label or None)
            except SpecError as exc:
                raise HTTPException(400, str(exc)) from None
        return HTMLResponse(report.render_html(data))

    @app.get("/vendor/plotly.min.js")
    def plotly_js() -> FileResponse:
        import plotly

        bundle = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
        return FileResponse(bundle, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    @app.get("/favicon.ico")
    def favicon() -> FileResponse:
        return FileResponse(Path(str(resources.files("vectorsync.sync.ui").joinpath("static/favicon.svg"))))

    return app


def _methods() -> list[str]:
    return ["pca", *(["umap"] if importlib.util.find_spec("umap") else [])]


def _project(conn: psycopg.Connection, emb: catalog.Embedding, method: str) -> dict[str, Any]:
    """A 2-D projection of up to ``MAP_SAMPLE`` vectors of the current model (a stable sample)."""
    rows = conn.execute(
        sql.SQL("SELECT {key}::text, embedding FROM {tgt} WHERE model_version = %s ORDER BY md5({key}::text) LIMIT %s")
        .format(key=emb.key, tgt=emb.target),
        (emb.current_version, MAP_SAMPLE),
    ).fetchall()
    if not rows:
        return {"keys": [], "x": [], "y": [], "method": method}
    matrix = np.stack([vector_array(r[1]) for r in rows])
    if emb.spec.distance != "l2":
        matrix = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    if len(matrix) < 3:
        points = np.zeros((len(matrix), 2))
    elif method == "umap":
        import umap

        points = umap.UMAP(n_components=2, random_state=0).fit_transform(matrix)
    else:
        from sklearn.decomposition import PCA

        points = PCA(2, random_state=0).fit_transform(matrix) if matrix.shape[1] >= 2 else np.hstack([matrix] * 2)
    return {
        "keys": [r[0] for r in rows],
        "x": [round(float(v), 5) for v in points[:, 0]],
        "y": [round(float(v), 5) for v in points[:, 1]],
        "method": method,
    }


def _column_values(conn: psycopg.Connection, emb: catalog.Embedding, column: str, keys: list[str]) -> list[Any]:
    try:
        rows: dict[str, Any] = dict(
            conn.execute(
                sql.SQL("SELECT {key}::text, {c} FROM {src} WHERE {key} = ANY(CAST(%s AS {karr}))").format(
                    key=emb.key, c=sql.Identifier(column), src=emb.source, karr=emb.key_array_type
                ),
                (keys,),
            ).fetchall()
        )
    except psycopg.errors.UndefinedColumn:
        raise HTTPException(400, f"table {emb.spec.table!r} has no column {column!r}") from None
    return [_jsonable(rows.get(k)) for k in keys]


def _snippet(emb: catalog.Embedding, values: dict[str, Any]) -> str:
    spec = emb.spec
    assert isinstance(spec, TextSpec)
    if spec.path_column:
        frame = pd.DataFrame({spec.path_column: [values.get(spec.path_column)]}, dtype=object)
        failures = sources.resolve_references(emb, frame)
        text = failures[0].message if failures else frame.iloc[0, 0]
    else:
        text = values.get(spec.input_column)
    text = "" if text is None else str(text)
    return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1] + "…"


def _display(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)[:SNIPPET_CHARS]


def _thumbnail_png(value: Any, column: str) -> bytes:
    """The image re-encoded as a small PNG: the browser never receives the stored bytes as such."""
    from PIL import Image

    from vectorsync.encoders.image import cell_image, to_mode

    try:
        image = to_mode(cell_image(value, column), 3)
    except ValueError as exc:
        raise HTTPException(404, str(exc)) from None
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    if max(image.size) < 64:  # tiny images (digits, icons) are scaled up to stay visible
        scale = 64 / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
