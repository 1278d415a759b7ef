"""``vectorsync report NAME``: how good is an embedding's model?

The figures: each model version's training curve and held-out metrics; with a label column, the
share of each row's k nearest neighbours that carry its label, for the model's vectors and for a
baseline of the same dimension computed on the same rows in the same run (PCA of the input
columns or pixels for tabular and image, TF-IDF + SVD for text, raw features for graph), with
example rows and their neighbours. ``build`` returns plain data (for ``--json`` and the UI);
``render_html`` turns it into one self-contained page with matplotlib plots embedded as PNG.
"""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import psycopg
from psycopg import sql

from vectorsync.sync import sources
from vectorsync.sync.catalog import Embedding
from vectorsync.sync.spec import GraphEmbeddingSpec, ImageSpec, SpecError, TabularSpec, TextSpec, split_qualified

#: Rows compared at most; kNN over more adds time, not information.
SAMPLE_ROWS = 2000
#: Two agreements closer than this (absolute share) count as a tie.
TIE = 0.005


def versions(conn: psycopg.Connection, name: str) -> list[dict[str, Any]]:
    """Every model version of ``name``, newest first, with metrics and training curve."""
    rows = conn.execute(
        "SELECT version, encoder_type, dim, metrics, trained_rows, history, created_at FROM vectorsync.models "
        "WHERE embedding = %s ORDER BY version DESC",
        (name,),
    ).fetchall()
    return [
        {
            "version": r[0],
            "encoder_type": r[1],
            "dim": r[2],
            "metrics": r[3],
            "trained_rows": r[4],
            "history": r[5],
            "created_at": r[6].isoformat(),
        }
        for r in rows
    ]


def build(
    conn: psycopg.Connection,
    emb: Embedding,
    *,
    label: str | None = None,
    k: int = 5,
    sample: int = SAMPLE_ROWS,
    examples: int = 3,
) -> dict[str, Any]:
    """The report's figures as JSON-ready data."""
    spec = emb.spec
    history = versions(conn, spec.name)
    current = next((v for v in history if v["version"] == emb.current_version), None)
    report: dict[str, Any] = {
        "embedding": spec.name,
        "modality": spec.modality,
        "table": spec.table,
        "dim": spec.dim,
        "distance": spec.distance,
        "current_version": emb.current_version,
        "versions": history,
        "held_out": {k_: v for k_, v in (current or {}).get("metrics", {}).items() if k_.startswith("holdout")},
        "label": label,
        "k": k,
    }
    if label is None:
        return report
    frame = _sample(conn, emb, label, sample)
    if len(frame) <= k:
        raise SpecError(
            f"embedding {spec.name!r}: only {len(frame)} embedded rows with a {label!r}; need more than {k}"
        )
    labels = frame[label].astype(str).to_numpy()
    vectors = np.stack([vector_array(v) for v in frame["__vector__"]])
    baseline_name, baseline = _baseline(conn, emb, frame)
    model_agreement = knn_agreement(vectors, labels, k, spec.distance)
    base_agreement = knn_agreement(baseline, labels, k, spec.distance) if baseline is not None else None
    shares = np.array(list(Counter(labels).values())) / len(labels)
    report["agreement"] = {
        "rows": len(frame),
        "model": model_agreement,
        "baseline": base_agreement,
        "baseline_method": baseline_name,
        "baseline_dim": None if baseline is None else int(baseline.shape[1]),
        "chance": float((shares**2).sum()),
    }
    report["verdict"] = verdict(spec.name, label, k, model_agreement, base_agreement, baseline_name)
    report["examples"] = _examples(conn, emb, frame, label, k, examples)
    return report


def vector_array(value: Any) -> np.ndarray:
    """A pgvector value (``Vector`` in binary mode, an array in text mode) as float32."""
    return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, dtype=np.float32)


def knn_agreement(vectors: np.ndarray, labels: np.ndarray, k: int, distance: str) -> float:
    """Share of each row's ``k`` nearest other rows that carry its label."""
    from sklearn.neighbors import NearestNeighbors

    metric = "euclidean" if distance == "l2" else "cosine"
    finder = NearestNeighbors(n_neighbors=min(k + 1, len(vectors)), metric=metric).fit(vectors)
    _, found = finder.kneighbors(vectors)
    agree = 0
    for row, neighbours in enumerate(found):
        others = [n for n in neighbours if n != row][:k]
        agree += int((labels[others] == labels[row]).sum())
    return agree / (len(vectors) * k)


def verdict(name: str, label: str, k: int, model: float, baseline: float | None, method: str) -> str:
    if baseline is None:
        return f"{model:.1%} of each row's {k} nearest neighbours share its {label!r} ({method})."
    if abs(model - baseline) < TIE:
        outcome = "matches"
    else:
        outcome = "beats" if model > baseline else "does not beat"
    return (
        f"The {name} model {outcome} the {method} baseline: {model:.1%} vs {baseline:.1%} of each row's "
        f"{k} nearest neighbours share its {label!r}."
    )


def _sample(conn: psycopg.Connection, emb: Embedding, label: str, limit: int) -> pd.DataFrame:
    """Up to ``limit`` rows embedded by the current model, with label, vector and input columns."""
    columns = [c for c in emb.spec.input_columns if c != label]
    query = sql.SQL(
        "SELECT s.{key}::text AS {k}, s.{label}, t.embedding AS {v}{inputs} FROM {src} s "
        "JOIN {tgt} t ON t.{key} = s.{key} WHERE s.{label} IS NOT NULL "
        "AND t.model_version = coalesce(%s, (SELECT max(model_version) FROM {tgt})) "
        "ORDER BY md5(s.{key}::text) LIMIT %s"
    ).format(
        key=emb.key,
        k=sql.Identifier(sources.KEY),
        label=sql.Identifier(label),
        v=sql.Identifier("__vector__"),
        inputs=sql.SQL("").join(sql.SQL(", s.{}").format(sql.Identifier(c)) for c in columns),
        src=emb.source,
        tgt=emb.target,
    )
    try:
        with conn.cursor() as cur:
            cur.execute(query, (emb.current_version, limit))
            frame = pd.DataFrame(cur.fetchall(), columns=[d.name for d in cur.description or []], dtype=object)
    except psycopg.errors.UndefinedColumn:
        raise SpecError(f"table {emb.spec.table!r} has no column {label!r}; pass an existing --label column") from None
    return frame


def _baseline(conn: psycopg.Connection, emb: Embedding, frame: pd.DataFrame) -> tuple[str, np.ndarray | None]:
    spec = emb.spec
    dim = spec.dim
    if isinstance(spec, TabularSpec):
        return "PCA", _pca(_tabular_matrix(frame[[c for c in spec.columns if c in frame]]), dim)
    if isinstance(spec, ImageSpec):
        from vectorsync.encoders.image import cell_image, to_array

        data = frame.copy()
        sources.resolve_references(emb, data)
        pixels = []
        for value in data[spec.input_column]:
            try:
                pixels.append(to_array(cell_image(value, spec.input_column), spec.image_size, spec.channels).ravel())
            except ValueError:  # an unusable image: the model has no vector for it either
                pixels.append(np.zeros(spec.channels * spec.image_size**2, np.float32))
        return "PCA", _pca(np.stack(pixels), dim)
    if isinstance(spec, TextSpec):
        from sklearn.decomposition import TruncatedSVD
        from sklearn.feature_extraction.text import TfidfVectorizer

        data = frame.copy()
        sources.resolve_references(emb, data)
        texts = [str(t) if t is not None else "" for t in data[spec.input_column]]
        tfidf = TfidfVectorizer(sublinear_tf=True, min_df=1).fit_transform(texts)
        parts = max(1, min(dim, tfidf.shape[1] - 1, len(texts) - 1))
        return "TF-IDF + SVD", TruncatedSVD(parts, random_state=0).fit_transform(tfidf)
    if isinstance(spec, GraphEmbeddingSpec) and spec.graph is not None:
        return "raw features", _graph_features(conn, emb, frame)
    return "none available for this source", None


def _tabular_matrix(frame: pd.DataFrame) -> np.ndarray:
    """Standardised numbers and one-hot categories, missing values at the mean: the usual inputs."""
    parts: list[np.ndarray] = []
    for column in frame.columns:
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.notna().sum() >= 0.9 * frame[column].notna().sum() and values.notna().any():
            filled = values.fillna(values.mean()).to_numpy(dtype=np.float64)
            spread = filled.std() or 1.0
            parts.append(((filled - filled.mean()) / spread)[:, None])
        else:
            parts.append(pd.get_dummies(frame[column].astype(str)).to_numpy(dtype=np.float64))
    return np.hstack(parts)


def _pca(matrix: np.ndarray, dim: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    parts = max(1, min(dim, matrix.shape[0], matrix.shape[1]))
    return PCA(parts, random_state=0).fit_transform(matrix)


def _graph_features(conn: psycopg.Connection, emb: Embedding, frame: pd.DataFrame) -> np.ndarray:
    """The spec's feature columns when it has some, else each node's row of the adjacency matrix."""
    graph = emb.spec.graph  # type: ignore[attr-defined]  # only called for GraphEmbeddingSpec with edges
    keys = list(frame[sources.KEY])
    if graph.feature_columns:
        rows = conn.execute(
            sql.SQL("SELECT {key}::text, {cols} FROM {src} WHERE {key} = ANY(CAST(%s AS {karr}))").format(
                key=emb.key,
                karr=emb.key_array_type,
                cols=sql.SQL(", ").join(map(sql.Identifier, graph.feature_columns)),
                src=emb.source,
            ),
            (keys,),
        ).fetchall()
        by_key = {r[0]: np.concatenate([np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in r[1:]]) for r in rows}
        return np.stack([by_key[k] for k in keys])
    schema, table = split_qualified(graph.edges)
    edges = conn.execute(
        sql.SQL("SELECT {s}::text, {t}::text FROM {e}").format(
            s=sql.Identifier(graph.source_column),
            t=sql.Identifier(graph.target_column),
            e=sql.Identifier(*(p for p in (schema, table) if p)),
        )
    ).fetchall()
    nodes = {key: i for i, key in enumerate(sorted({n for edge in edges for n in edge} | set(keys)))}
    matrix = np.zeros((len(keys), len(nodes)), np.float32)
    position = {key: i for i, key in enumerate(keys)}
    for source, target in edges:
        if source in position:
            matrix[position[source], nodes[target]] = 1
        if target in position and graph.orientation == "undirected":
            matrix[position[target], nodes[source]] = 1
    return matrix


def _examples(
    conn: psycopg.Connection, emb: Embedding, frame: pd.DataFrame, label: str, k: int, count: int
) -> list[dict[str, Any]]:
    labels = dict(zip(frame[sources.KEY], frame[label].astype(str), strict=True))
    chosen = sorted(labels, key=lambda key: (len(key), key))[:count]
    result = []
    for key in chosen:
        neighbours = [
            {"key": n, "distance": float(d), "label": labels.get(n) or _label_of(conn, emb, label, n)}
            for n, d in conn.execute("SELECT key, distance FROM vectorsync.nearest(%s, %s, %s)", (emb.name, key, k))
        ]
        result.append({"key": key, "label": labels[key], "neighbours": neighbours})
    return result


def _label_of(conn: psycopg.Connection, emb: Embedding, label: str, key: str) -> str:
    row = conn.execute(
        sql.SQL("SELECT {label}::text FROM {src} WHERE {key} = ANY(CAST(%s AS {karr}))").format(
            label=sql.Identifier(label), src=emb.source, key=emb.key, karr=emb.key_array_type
        ),
        ([key],),
    ).fetchone()
    return "" if row is None or row[0] is None else row[0]


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def plots(report: dict[str, Any]) -> dict[str, str]:
    """The report's figures as PNG data URIs: training curves, and model vs baseline agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images: dict[str, str] = {}
    curves = [v for v in report["versions"] if v["history"]]
    if curves:
        figure, axes = plt.subplots(figsize=(6, 3.2))
        for version in reversed(curves):
            epochs = [p["epoch"] for p in version["history"]]
            axes.plot(epochs, [p["loss"] for p in version["history"]], marker=".", label=f"v{version['version']}")
        axes.set_xlabel("epoch")
        axes.set_ylabel("training loss")
        axes.set_title(f"{report['embedding']}: training curves")
        axes.legend()
        images["training_curve"] = _png(figure)
        plt.close(figure)
    agreement = report.get("agreement")
    if agreement:
        names = ["model"] + (["baseline"] if agreement["baseline"] is not None else []) + ["chance"]
        values = [agreement[n] for n in names]
        figure, axes = plt.subplots(figsize=(5, 3))
        bars = axes.bar(
            [n if n != "baseline" else f"baseline ({agreement['baseline_method']})" for n in names],
            values,
            color=["#2b6cb0", "#a0aec0", "#e2e8f0"][: len(names)],
        )
        axes.bar_label(bars, labels=[f"{v:.1%}" for v in values])
        axes.set_ylim(0, 1.05)
        axes.set_ylabel(f"kNN (k={report['k']}) label agreement")
        images["agreement"] = _png(figure)
        plt.close(figure)
    return images


def render_html(report: dict[str, Any]) -> str:
    """One self-contained HTML page (plots inline); every value is escaped by Jinja's autoescape."""
    from vectorsync.sync.ui.templating import environment

    return environment().get_template("report.html").render(
        report=report, images=plots(report), report_json=json.dumps(report, indent=2, default=str)
    )
