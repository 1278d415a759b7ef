"""The Neo4j bridge: reads node embeddings over Bolt and hands them, in pages, to the upsert path.

Two sources, chosen by the spec (``sync.spec.Neo4jSpec``):

- ``property``: vectors already stored on the nodes (e.g. written by ``gds.fastRP.write``).
- ``algorithm``: computed on the server by streaming procedures, never written to the graph.
  Neo4j GDS: a uniquely named in-memory projection (``gds.graph.project``), then
  ``gds.fastRP.stream`` / ``gds.beta.graphSage.stream`` (after ``gds.beta.graphSage.train``) /
  ``gds.node2vec.stream``; the projection (and model) are always dropped. ArcadeDB: its own
  procedures ``algo.fastrp`` / ``algo.graphsage`` / ``algo.node2vec``, which take one config map,
  run over every vertex and yield ``node`` (a record id, not a node) and ``embedding``; each row is
  re-matched by ``elementId`` to read its label and key.

The server's dialect comes from the Bolt agent string (ArcadeDB also answers ``gds.version()``).
Nothing here writes to Postgres: ``stream_embeddings`` yields ``(keys, float32 matrix)`` pages.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

import numpy as np

from vectorsync.errors import DatabaseError, MissingExtraError
from vectorsync.sync.spec import Neo4jSpec

log = logging.getLogger(__name__)

Dialect = Literal["neo4j-gds", "arcadedb", "memgraph", "unknown"]
T = TypeVar("T")

MAX_ATTEMPTS = 4
BACKOFF_SECONDS = 0.5

#: GDS config keys -> ArcadeDB config keys, per algorithm (ArcadeDB ignores keys it does not know,
#: so anything not listed here is refused instead of silently dropped).
_ARCADE_KEYS: dict[str, dict[str, str]] = {
    "fastRP": {
        "embeddingDimension": "dimensions",
        "randomSeed": "seed",
        "nodeSelfInfluence": "selfInfluence",
        "normalizationStrength": "normalization",
        "iterations": "iterations",
    },
    "graphSage": {"embeddingDimension": "embeddingDimension", "randomSeed": "seed", "layers": "layers"},
    "node2vec": {
        "embeddingDimension": "embeddingDimension",
        "randomSeed": "seed",
        "walkLength": "walkLength",
        "walksPerNode": "walksPerNode",
        "iterations": "iterations",
        "windowSize": "windowSize",
        "negativeSamplingRate": "negSamples",
        "initialLearningRate": "learningRate",
    },
}
_ARCADE_PROCEDURES = {"fastRP": "algo.fastrp", "graphSage": "algo.graphsage", "node2vec": "algo.node2vec"}
_GDS_PROCEDURES = {
    "fastRP": "gds.fastRP.stream",
    "graphSage": "gds.beta.graphSage.stream",
    "node2vec": "gds.node2vec.stream",
}
_ORIENTATIONS = {"UNDIRECTED": "BOTH", "NATURAL": "OUT", "REVERSE": "IN"}


class BridgeError(DatabaseError):
    """The bridge cannot read embeddings; the message says what is wrong and what to do."""


def _neo4j() -> Any:
    try:
        import neo4j
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise MissingExtraError("the Neo4j bridge", "neo4j", "neo4j driver") from None
    return neo4j


def _quote(name: str) -> str:
    """A Cypher identifier (label, property) in backticks, whatever characters it holds."""
    return "`" + name.replace("`", "``") + "`"


def _transient(exc: BaseException) -> bool:
    errors = _neo4j().exceptions
    return isinstance(exc, errors.ServiceUnavailable | errors.SessionExpired | errors.TransientError)


def _with_retry(action: Callable[[], T], what: str, spec: Neo4jSpec) -> T:
    """Run ``action``, retrying transient Bolt failures with exponential backoff, a bounded number of times."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            return action()
        except Exception as exc:
            if not _transient(exc):
                raise _explain(exc, spec) from exc
            if attempt == MAX_ATTEMPTS:
                raise BridgeError(
                    f"cannot reach the graph server at {spec.uri} while {what} "
                    f"after {MAX_ATTEMPTS} attempts ({exc}); check that it is running and reachable"
                ) from exc
            delay = BACKOFF_SECONDS * 2 ** (attempt - 1)
            log.warning("transient error while %s (%s); retrying in %.1fs", what, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _explain(exc: BaseException, spec: Neo4jSpec) -> BaseException:
    """Turn a driver exception into a BridgeError a user can act on (others pass through)."""
    errors = _neo4j().exceptions
    if isinstance(exc, BridgeError):
        return exc
    if isinstance(exc, errors.AuthError):
        return BridgeError(
            f"authentication failed for user {spec.user!r} at {spec.uri}: check the password in ${spec.password_env}"
        )
    if isinstance(exc, errors.Neo4jError):
        return BridgeError(f"the graph server at {spec.uri} refused the query: {exc.message or exc}")
    if isinstance(exc, errors.DriverError | ValueError):
        return BridgeError(f"cannot connect to the graph server at {spec.uri}: {exc}")
    return exc


def detect_dialect(driver: Any) -> Dialect:
    """Which server is behind ``driver``, from the Bolt agent string it reports on connecting.

    ``"Neo4j/5.26.0"`` is Neo4j; ArcadeDB says ``"Neo4j/5.26.0 compatible (ArcadeDB 26.10.2)"``;
    Memgraph says ``"Memgraph/..."``. Probing ``gds.version()`` would not do: ArcadeDB answers it.
    """
    agent = (driver.get_server_info().agent or "").lower()
    if "arcadedb" in agent:
        return "arcadedb"
    if "memgraph" in agent:
        return "memgraph"
    if agent.startswith("neo4j/"):
        return "neo4j-gds"
    return "unknown"


@contextmanager
def connect(spec: Neo4jSpec) -> Iterator[Any]:
    """An open driver for ``spec``, connectivity and credentials already verified."""
    neo4j = _neo4j()
    password = os.environ.get(spec.password_env)
    if password is None:
        raise BridgeError(f"set the environment variable {spec.password_env} to the password of {spec.user!r}")
    try:
        driver = neo4j.GraphDatabase.driver(spec.uri, auth=(spec.user, password))
    except (ValueError, neo4j.exceptions.ConfigurationError) as exc:
        raise BridgeError(f"invalid Neo4j URI {spec.uri!r}: {exc}") from exc
    try:
        _with_retry(driver.verify_connectivity, "connecting", spec)
        yield driver
    finally:
        driver.close()


class _Reader:
    """Queries of one stream: a session per call, so a retry starts on a fresh connection."""

    def __init__(self, driver: Any, spec: Neo4jSpec) -> None:
        self.driver = driver
        self.spec = spec

    def rows(self, query: str, what: str, **params: Any) -> list[dict[str, Any]]:
        def run() -> list[dict[str, Any]]:
            with self.driver.session(database=self.spec.database) as session:
                return [record.data() for record in session.run(query, params)]

        return _with_retry(run, what, self.spec)

    def single(self, query: str, what: str, **params: Any) -> dict[str, Any]:
        rows = self.rows(query, what, **params)
        return rows[0] if rows else {}

    def stream(self, query: str, what: str, **params: Any) -> Iterator[tuple[Any, Any]]:
        """``(key, embedding)`` rows of a long query; retried only until its first row arrives."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            started = False
            try:
                with self.driver.session(database=self.spec.database, fetch_size=self.spec.page_size) as session:
                    for record in session.run(query, params):
                        started = True
                        yield record[0], record[1]
                return
            except Exception as exc:
                if started and _transient(exc):
                    raise BridgeError(
                        f"the connection to {self.spec.uri} broke while {what}; vectors from two runs of a "
                        "random algorithm cannot be mixed, so run the sync again"
                    ) from exc
                if not _transient(exc) or attempt == MAX_ATTEMPTS:
                    raise _explain(exc, self.spec) from exc
                time.sleep(BACKOFF_SECONDS * 2 ** (attempt - 1))


def _check_nodes(reader: _Reader, spec: Neo4jSpec) -> int:
    """Fail early, with counts and an example, when the label or a needed property is missing."""
    label = _quote(spec.label)
    where = spec.database or "the default database"
    count = reader.single(f"MATCH (n:{label}) RETURN count(n) AS n", "counting nodes").get("n", 0)
    if not count:
        raise BridgeError(f"no nodes with label {spec.label!r} in {where} at {spec.uri}; check 'label' in the spec")
    missing = reader.single(
        f"MATCH (n:{label}) WHERE n[$key] IS NULL RETURN count(n) AS n, collect(elementId(n))[0] AS example",
        "checking key properties",
        key=spec.key_property,
    )
    if missing.get("n"):
        raise BridgeError(
            f"{missing['n']} of {count} {spec.label!r} nodes have no key property {spec.key_property!r} "
            f"(e.g. node {missing['example']}); set it on every node or choose another 'key_property'"
        )
    if spec.property is not None:
        missing = reader.single(
            f"MATCH (n:{label}) WHERE n[$prop] IS NULL RETURN count(n) AS n, collect(n[$key])[0] AS example",
            "checking embedding properties",
            prop=spec.property,
            key=spec.key_property,
        )
        if missing.get("n"):
            raise BridgeError(
                f"{missing['n']} of {count} {spec.label!r} nodes have no embedding property {spec.property!r} "
                f"(e.g. the node with {spec.key_property} = {missing['example']!r}); compute it first"
            )
    return int(count)


def _dimension(config: dict[str, Any], key: str, dim: int, spec: Neo4jSpec) -> None:
    if key in config and int(config[key]) != dim:
        raise BridgeError(
            f"the algorithm config asks for {key}={config[key]} but the embedding's dim is {dim}; make them equal"
        )
    config[key] = dim


def _orientation(config: dict[str, Any]) -> str:
    orientation = str(config.pop("orientation", "UNDIRECTED")).upper()
    if orientation not in _ORIENTATIONS:
        raise BridgeError(f"orientation {orientation!r} is not one of {', '.join(_ORIENTATIONS)}")
    return orientation


def _arcadedb_rows(reader: _Reader, spec: Neo4jSpec, dim: int) -> Iterator[tuple[Any, Any]]:
    assert spec.algorithm is not None
    config = dict(spec.config)
    orientation = _orientation(config)
    known = _ARCADE_KEYS[spec.algorithm]
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise BridgeError(
            f"ArcadeDB's {_ARCADE_PROCEDURES[spec.algorithm]} does not support {', '.join(unknown)}; "
            f"supported: {', '.join(sorted(known))}"
        )
    _dimension(config, "embeddingDimension", dim, spec)
    arcade = {known[k]: v for k, v in config.items()}
    arcade["direction"] = _ORIENTATIONS[orientation]
    if spec.relationship_types != ["*"]:
        arcade["relTypes"] = list(spec.relationship_types)
    # `node` is a record id: `YIELD node ... SET node.x` does not persist and label filters on it
    # are ignored, so each row is matched again by elementId before its label and key are read.
    query = (
        f"CALL {_ARCADE_PROCEDURES[spec.algorithm]}($config) YIELD node, embedding "
        "WITH node, embedding MATCH (n) WHERE elementId(n) = elementId(node) "
        f"WITH n, embedding WHERE n:{_quote(spec.label)} RETURN n[$key] AS key, embedding"
    )
    yield from reader.stream(query, f"running {spec.algorithm} on ArcadeDB", config=arcade, key=spec.key_property)


def _gds_rows(reader: _Reader, spec: Neo4jSpec, dim: int) -> Iterator[tuple[Any, Any]]:
    assert spec.algorithm is not None
    config = dict(spec.config)
    orientation = _orientation(config)
    _dimension(config, "embeddingDimension", dim, spec)
    features = list(config.get("featureProperties", []))
    weight = config.get("relationshipWeightProperty")
    if spec.algorithm == "graphSage" and not features:
        raise BridgeError("GraphSAGE needs node features: set config.featureProperties to a list of node properties")
    version = reader.single("CALL gds.version() YIELD gdsVersion RETURN gdsVersion AS v", "checking GDS").get("v")
    log.info("Neo4j GDS %s: running %s", version, spec.algorithm)
    relationship = {"orientation": orientation, **({"properties": [weight]} if weight else {})}
    relationships = {t: {"type": t, **relationship} for t in spec.relationship_types}
    if spec.relationship_types == ["*"]:
        relationships = {"__ALL__": {"type": "*", **relationship}}
    graph = f"vectorsync_{uuid.uuid4().hex}"
    model = f"{graph}_model"
    reader.rows(
        "CALL gds.graph.project($graph, $nodes, $relationships) YIELD graphName RETURN graphName",
        "projecting the graph",
        graph=graph,
        nodes={spec.label: {"label": spec.label, "properties": features}},
        relationships=relationships,
    )
    try:
        stream_config = config
        if spec.algorithm == "graphSage":
            reader.rows(
                "CALL gds.beta.graphSage.train($graph, $config) YIELD modelInfo RETURN modelInfo.modelName AS m",
                "training GraphSAGE",
                graph=graph,
                config={**config, "modelName": model},
            )
            stream_config = {"modelName": model}
        query = (
            f"CALL {_GDS_PROCEDURES[spec.algorithm]}($graph, $config) YIELD nodeId, embedding "
            "RETURN gds.util.asNode(nodeId)[$key] AS key, embedding"
        )
        yield from reader.stream(
            query, f"streaming {spec.algorithm}", graph=graph, config=stream_config, key=spec.key_property
        )
    finally:
        try:
            reader.rows("CALL gds.graph.drop($graph, false) YIELD graphName RETURN graphName", "dropping", graph=graph)
            if spec.algorithm == "graphSage":
                reader.rows("CALL gds.model.drop($model, false) YIELD modelInfo RETURN 1", "dropping", model=model)
        except Exception as exc:  # the stream's own error matters more than a failed clean-up
            log.warning("could not drop the GDS projection %s: %s", graph, exc)


def _property_rows(reader: _Reader, spec: Neo4jSpec) -> Iterator[tuple[Any, Any]]:
    assert spec.property is not None
    query = f"MATCH (n:{_quote(spec.label)}) RETURN n[$key] AS key, n[$prop] AS embedding"
    yield from reader.stream(query, "reading stored embeddings", key=spec.key_property, prop=spec.property)


def _pages(rows: Iterator[tuple[Any, Any]], spec: Neo4jSpec, dim: int) -> Iterator[tuple[list[Any], np.ndarray]]:
    seen: set[Any] = set()
    keys: list[Any] = []
    vectors: list[Any] = []
    source = spec.property or spec.algorithm

    def flush() -> tuple[list[Any], np.ndarray]:
        matrix = np.asarray(vectors, dtype=np.float32)
        if matrix.ndim != 2 or matrix.shape[1] != dim:
            sizes = sorted({len(v) if isinstance(v, list | tuple) else 1 for v in vectors})
            raise BridgeError(
                f"the server's {source!r} vectors have dimension {', '.join(map(str, sizes))} but the spec's dim is "
                f"{dim}; make them equal"
            )
        bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
        if bad.size:
            raise BridgeError(f"the {source!r} vector of node {keys[bad[0]]!r} holds NaN or infinite values")
        return list(keys), matrix

    for key, vector in rows:
        if key is None:
            raise BridgeError(f"a {spec.label!r} node has no key property {spec.key_property!r}; set it on every node")
        if key in seen:
            raise BridgeError(
                f"key {key!r} appears on more than one {spec.label!r} node; {spec.key_property!r} must be unique"
            )
        if vector is None:
            raise BridgeError(f"node {key!r} has no {source!r} vector")
        seen.add(key)
        keys.append(key)
        vectors.append(vector)
        if len(keys) == spec.page_size:
            yield flush()
            keys.clear()
            vectors.clear()
    if keys:
        yield flush()


def fingerprint(spec: Neo4jSpec) -> dict[str, Any]:
    """A cheap summary of the label's subgraph that changes when nodes or relationships are added
    or removed: node and relationship counts and the largest element ids (two aggregate queries,
    no node data read)."""
    label = _quote(spec.label)
    with connect(spec) as driver:
        reader = _Reader(driver, spec)
        nodes = reader.single(
            f"MATCH (n:{label}) RETURN count(n) AS nodes, max(elementId(n)) AS max_node", "fingerprinting nodes"
        )
        relationships = reader.single(
            f"MATCH (:{label})-[r]-() RETURN count(r) AS relationships, max(elementId(r)) AS max_relationship",
            "fingerprinting relationships",
        )
    return {**nodes, **relationships}


def stream_embeddings(
    spec: Neo4jSpec, dim: int, info: dict[str, Any] | None = None
) -> Generator[tuple[list[Any], np.ndarray], None, None]:
    """Node embeddings of ``spec.label`` as pages of ``(keys, float32 (len(keys), dim))``.

    Keys are the values of ``spec.key_property``; at most ``spec.page_size`` rows per page.
    ``info``, when given, receives ``dialect``, ``agent`` and ``nodes`` (the label's node count)
    before the first page, for the caller's run record.
    """
    with connect(spec) as driver:
        dialect = detect_dialect(driver)
        reader = _Reader(driver, spec)
        count = _check_nodes(reader, spec)
        if info is not None:
            info.update(dialect=dialect, agent=driver.get_server_info().agent, nodes=count)
        log.info("reading %d %s node embeddings from %s (%s)", count, spec.label, spec.uri, dialect)
        if spec.property is not None:
            rows = _property_rows(reader, spec)
        elif dialect == "arcadedb":
            rows = _arcadedb_rows(reader, spec, dim)
        elif dialect == "neo4j-gds":
            rows = _gds_rows(reader, spec, dim)
        else:
            raise BridgeError(
                f"the server at {spec.uri} ({driver.get_server_info().agent}) has no supported graph algorithms; "
                "store the vectors on the nodes and set 'property' instead of 'algorithm'"
            )
        yield from _pages(rows, spec, dim)
