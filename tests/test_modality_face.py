"""Face modality end to end through the database: face images in ``bytea`` → ``vectorsync migrate``,
``train``, ``sync`` → verification and similarity search on the stored vectors.

Data: scikit-image's ``lfw_subset`` (real faces) and photos for detection; procedurally drawn
labelled faces (``tests/face_data.py``) for identity training, since no labelled face set ships
offline.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import psycopg
import pytest
import skimage.data
from PIL import Image, ImageOps
from psycopg import sql
from sklearn.metrics import roc_auc_score

from tests.face_data import encoded, lfw, people

WORKER = """
[worker]
max_attempts = 1
"""

needs_dlib = pytest.mark.skipif(
    importlib.util.find_spec("dlib") is None or importlib.util.find_spec("face_recognition_models") is None,
    reason="the faces extra (dlib-bin, face_recognition_models) is not installed",
)


def insert(conn: psycopg.Connection, table: str, rows: list[tuple]) -> None:
    marks = sql.SQL(", ").join([sql.Placeholder()] * len(rows[0]))
    with conn.cursor() as cur:
        cur.executemany(sql.SQL("INSERT INTO {} VALUES ({})").format(sql.Identifier(table), marks), rows)


def run_ok(cli, *args: str, config) -> str:
    result = cli(*args, config=config)
    assert result.code == 0, result.err
    return result.err + result.out


def non_faces() -> list[bytes]:
    """Images with no face: a photo of coins, noise, a flat colour."""
    rng = np.random.default_rng(0)
    return [
        encoded(Image.fromarray(skimage.data.coins())),
        encoded(Image.fromarray(rng.integers(0, 255, (96, 96), dtype=np.uint8))),
        encoded(Image.new("RGB", (64, 64), (90, 120, 200))),
    ]


# --- identity CNN -------------------------------------------------------------------------------


def test_identity_cnn_trained_by_vectorsync_verifies_people_it_never_saw(conn, write_config, cli):
    conn.execute("CREATE TABLE portraits (id int PRIMARY KEY, photo bytea, person text)")
    seen = people(40, 10, seed=1, column="photo")
    insert(conn, "portraits", [(i, row.photo, row.person) for i, row in enumerate(seen.itertuples())])
    config = write_config(
        """
        [[embeddings]]
        name = "faces"
        table = "portraits"
        key = "id"
        modality = "face"
        dim = 64
        column = "photo"
        label_column = "person"
        detect_faces = false
        image_size = 32
        encoder = { seed = 0, epochs = 8, width = 16, batch_size = 32 }
        """
    )
    run_ok(cli, "migrate", config=config)
    run_ok(cli, "train", "faces", config=config)
    metrics = conn.execute("SELECT metrics FROM vectorsync.models WHERE embedding = 'faces'").fetchone()[0]
    assert metrics["identities"] == 40

    # New people arrive after training: the change trigger queues them, sync embeds them.
    unseen = people(20, 10, seed=2, first_id=1000, column="photo")
    insert(conn, "portraits", [(10_000 + i, row.photo, row.person) for i, row in enumerate(unseen.itertuples())])
    run_ok(cli, "sync", config=config)
    assert conn.execute("SELECT count(*) FROM faces_embeddings").fetchone()[0] == len(seen) + len(unseen)

    # Verification: every pair of unseen faces, scored by cosine similarity in SQL.
    pairs = conn.execute(
        """
        SELECT pa.person = pb.person, 1 - (a.embedding <=> b.embedding)
        FROM faces_embeddings a JOIN faces_embeddings b ON a.id < b.id
        JOIN portraits pa ON pa.id = a.id JOIN portraits pb ON pb.id = b.id
        WHERE a.id >= 10000 AND b.id >= 10000
        """
    ).fetchall()
    same = np.array([p[0] for p in pairs])
    auc = roc_auc_score(same, np.array([p[1] for p in pairs]))
    print(f"\nidentity CNN: verification ROC AUC on {len(unseen) // 10} unseen identities "
          f"({len(pairs)} pairs of stored vectors): {auc:.3f} (chance 0.5); "
          f"training holdout AUC {metrics.get('holdout_verification_auc', float('nan')):.3f}")
    assert auc > 0.8

    # The nearest stored face to an unseen person's photo is often another photo of that person.
    person = dict(conn.execute("SELECT id::text, person FROM portraits WHERE id >= 10000").fetchall())
    hits = sum(
        person.get(conn.execute("SELECT key FROM vectorsync.nearest('faces', %s, 1)", (key,)).fetchone()[0]) == name
        for key, name in person.items()
    )
    chance = 9 / (len(seen) + len(unseen) - 1)
    print(f"identity CNN: the nearest of all {len(seen) + len(unseen)} stored faces is the same unseen person "
          f"for {hits / len(person):.2f} of faces (chance {chance:.3f})")
    assert hits / len(person) > 0.3


def test_detection_finds_lfw_faces_and_a_photo_without_a_face_fails(conn, write_config, cli):
    faces, _ = lfw(upscale_to=64)
    conn.execute("CREATE TABLE snapshots (id int PRIMARY KEY, photo bytea, person int)")
    others = non_faces()
    insert(conn, "snapshots", [(i, face, i % 4) for i, face in enumerate(faces)])
    insert(conn, "snapshots", [(1000 + i, image, None) for i, image in enumerate(others)])
    config = write_config(
        WORKER
        + """
        [[embeddings]]
        name = "snaps"
        table = "snapshots"
        key = "id"
        modality = "face"
        dim = 16
        column = "photo"
        label_column = "person"
        image_size = 32
        encoder = { seed = 0, epochs = 1, width = 16, batch_size = 32 }
        """
    )
    run_ok(cli, "migrate", config=config)
    run_ok(cli, "train", "snaps", config=config)  # briefly: the detection path is under test here
    assert cli("sync", config=config).code == 1  # images without a face fail, and sync says so

    failed = dict(conn.execute(
        "SELECT key::int, error FROM vectorsync.failed WHERE embedding = 'snaps' AND column_name = 'photo'"
    ).fetchall())
    embedded = {row[0] for row in conn.execute("SELECT id FROM snaps_embeddings")}
    print(f"\nface detection through sync: {len(embedded)} of {len(faces)} lfw_subset faces embedded")
    assert len(embedded) >= 0.9 * len(faces)
    no_face = set(range(1000, 1000 + len(others)))
    assert set(failed) == (set(range(len(faces))) - embedded) | no_face  # no row lost, none embedded twice
    assert all("no face detected" in error for error in failed.values())


# --- pretrained dlib ----------------------------------------------------------------------------


@needs_dlib
def test_dlib_needs_no_training_and_puts_a_face_nearest_its_mirror_image(conn, write_config, cli):
    chips = [Image.fromarray((a * 255).astype(np.uint8)).resize((150, 150)) for a in skimage.data.lfw_subset()[:12]]
    conn.execute("CREATE TABLE headshots (id int PRIMARY KEY, photo bytea)")
    insert(conn, "headshots", [(i, encoded(chip)) for i, chip in enumerate(chips)])
    insert(conn, "headshots", [(100 + i, encoded(ImageOps.mirror(chip))) for i, chip in enumerate(chips)])
    config = write_config(
        WORKER
        + """
        [[embeddings]]
        name = "heads"
        table = "headshots"
        key = "id"
        modality = "face"
        dim = 128
        distance = "l2"
        column = "photo"
        detect_faces = false
        encoder = { type = "dlib" }

        [[embeddings]]
        name = "scenes"
        table = "scenes"
        key = "id"
        modality = "face"
        dim = 128
        column = "photo"
        encoder = { type = "dlib" }
        """
    )
    conn.execute("CREATE TABLE scenes (id int PRIMARY KEY, photo bytea)")
    insert(conn, "scenes", [(1, encoded(Image.fromarray(skimage.data.astronaut()))),
                            (2, encoded(Image.fromarray(skimage.data.coins())))])
    run_ok(cli, "migrate", config=config)
    # no `vectorsync train`: pretrained encoders register version 1; the coins have no face, so sync exits 1
    assert cli("sync", config=config).code == 1

    assert conn.execute(
        "SELECT embedding, version, encoder_type FROM vectorsync.models ORDER BY embedding"
    ).fetchall() == [("heads", 1, "dlib"), ("scenes", 1, "dlib")]
    assert conn.execute("SELECT count(*) FROM heads_embeddings").fetchone()[0] == 24
    for i in range(len(chips)):
        (nearest,) = conn.execute("SELECT key FROM vectorsync.nearest('heads', %s, 1)", (str(i),)).fetchone()
        assert nearest == str(100 + i)
    assert [r[0] for r in conn.execute("SELECT id FROM scenes_embeddings")] == [1]
    ((key, column, error),) = conn.execute(
        "SELECT key, column_name, error FROM vectorsync.failed WHERE embedding = 'scenes'"
    ).fetchall()
    assert (key, column) == ("2", "photo") and "no face detected" in error
