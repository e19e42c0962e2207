"""Provenance through a real worker on real Redis and PostgreSQL: files signed at test time with c2pa-python and a
throw-away ES256 chain, XMP and generator chunks, hostile metadata, HEIC and AVIF, sent by a producer process; the
rows' decision and provenance columns, and ``ppl-worker verdicts`` filtering on them."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from benchmarks.harness import worker_environment
from tests.provenance_files import (
    CAPTURE,
    TRAINED,
    a1111_png,
    altered_after_signing,
    billion_laughs,
    encode,
    heic_10_bit,
    photo,
    plain,
    sign,
    signing_chain,
    stripped,
    truncated_manifest,
    with_xmp,
    xmp_packet,
)
from tests.worker.processes import WorkerProcess, produce, wait_until
from worker import db

SIZE = (96, 72)
SIGNED_GENERATOR = "PPL Diffusion 2"  # the softwareAgent of the signed files' c2pa.created action
A1111 = "Stable Diffusion web UI (AUTOMATIC1111)"


def animated_gif(frames: int) -> bytes:
    images = [photo(SIZE, seed=i) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    return buffer.getvalue()


def make_files(root: Path) -> dict[str, bytes]:
    """The uploads: name → bytes, written under ``root``."""
    unsigned = plain("JPEG", SIZE)
    signed_ai = sign(unsigned, "JPEG", TRAINED)
    files = {
        "unsigned.jpg": unsigned,  # the signed files' pixels: the model's score of those, without a manifest
        "signed_ai.jpg": signed_ai,
        "signed_camera.jpg": sign(plain("JPEG", (80, 60)), "JPEG", CAPTURE, claim_generator="PPL Test Camera",
                                  software_agent=None),
        "altered.jpg": altered_after_signing(signed_ai, "JPEG"),
        "truncated_manifest.jpg": truncated_manifest(signed_ai),
        "xmp_ai.png": with_xmp("PNG", xmp_packet(TRAINED), SIZE),
        "a1111.png": a1111_png(),
        "stripped.png": stripped(a1111_png()),
        "xml_bomb.jpg": with_xmp("JPEG", billion_laughs(), SIZE),
        "photo.heic": encode(photo(SIZE, seed=3), "HEIF", quality=90),
        "photo_10bit.heic": heic_10_bit(photo(SIZE, seed=4)),
        "photo.avif": encode(photo(SIZE, seed=5), "AVIF", quality=90),
        "animated.gif": animated_gif(3),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


@pytest.fixture
def uploads(tmp_path: Path) -> Path:
    root = tmp_path / "uploads"
    root.mkdir()
    make_files(root)
    return root


@pytest.fixture
def trust_anchors(tmp_path: Path) -> Path:
    path = tmp_path / "c2pa-trust-anchors.pem"
    path.write_text(signing_chain().root_pem)  # the root of the chain the files were signed with
    return path


Judge = Callable[[list[str]], dict[str, dict[str, Any]]]


def judge_with(env: dict[str, str], uploads: Path, log: Path) -> Judge:
    """A function that sends files to a worker started with ``env`` and returns their verdict rows by file name."""
    engine = db.make_engine(env["PPL_DATABASE_URL"])

    def judge(names: list[str]) -> dict[str, dict[str, Any]]:
        with WorkerProcess(env, log) as worker:
            produce(env["PPL_BROKER_URL"], [{"source": (uploads / name).as_uri(), "external_id": name}
                                            for name in names])

            def rows() -> dict[str, dict[str, Any]] | None:
                with engine.connect() as conn:
                    found = {r["job"]: dict(r) for r in conn.execute(text(
                        "SELECT v.*, s.external_id AS job FROM submissions s JOIN verdicts v ON v.id = s.verdict_id"
                    )).mappings()}
                    failed = conn.execute(text("SELECT source, reason, detail FROM detection_failures")).all()
                assert not failed, f"jobs failed: {failed}"
                return found if set(names) <= set(found) else None

            return wait_until(rows, timeout=180, what=f"verdicts of {names}", worker=worker)

    return judge


def test_provenance_decides_where_it_may_and_is_stored_beside_the_score(
        database_url: str, redis_url: str, tiny_model_dir: Path, uploads: Path, trust_anchors: Path,
        tmp_path: Path) -> None:
    env = worker_environment(database_url, redis_url, tiny_model_dir, uploads, PPL_DECODE_PROCESSES="0",
                             PPL_C2PA_TRUST_ANCHORS=str(trust_anchors))
    rows = judge_with(env, uploads, tmp_path / "worker.log")(sorted(p.name for p in uploads.iterdir()))

    # Signed as AI-generated, the chain trusted: fake whatever the model scored; the score is the model's own
    # (the manifest adds a segment, the pixels are those of unsigned.jpg).
    signed, unsigned = rows["signed_ai.jpg"], rows["unsigned.jpg"]
    assert (signed["decision"], signed["label"], signed["c2pa_state"]) == ("c2pa", "fake", "trusted")
    assert signed["score"] == pytest.approx(unsigned["score"], abs=1e-5)
    assert unsigned["decision"] == "model" and unsigned["provenance_kind"] == "none"
    assert unsigned["label"] == ("fake" if unsigned["score"] >= unsigned["threshold"] else "real")
    assert (signed["provenance_kind"], signed["declared_generator"], signed["frames"]) == ("c2pa", SIGNED_GENERATOR, 1)
    assert signed["c2pa_signer"] == "PPL Test Generator Inc."
    assert signed["provenance"]["c2pa"]["source_types"] == [TRAINED]
    assert signed["timings_ms"]["provenance"] > 0

    def model_decided(row: dict[str, Any]) -> bool:
        return row["decision"] == "model" and row["label"] == ("fake" if row["score"] >= row["threshold"] else "real")

    camera = rows["signed_camera.jpg"]  # a camera's signature is recorded and never clears or flags an image
    assert model_decided(camera) and (camera["c2pa_state"], camera["declared_generator"]) == ("trusted", None)
    assert camera["provenance"]["c2pa"]["source_types"] == [CAPTURE]

    altered = rows["altered.jpg"]  # altered after signing: invalid, recorded, never trusted
    assert model_decided(altered) and altered["c2pa_state"] == "invalid" and altered["declared_generator"] is None
    assert altered["provenance"]["c2pa"]["failures"]
    truncated = rows["truncated_manifest.jpg"]
    assert model_decided(truncated) and truncated["c2pa_state"] == "invalid"
    assert [e["fault"] for e in truncated["provenance"]["errors"]] == ["c2pa_unreadable"]

    xmp = rows["xmp_ai.png"]  # unsigned metadata is evidence only: PPL_TRUST_UNSIGNED_METADATA is off
    assert model_decided(xmp) and xmp["provenance_kind"] == "iptc" and xmp["provenance"]["source_types"] == [TRAINED]

    a1111 = rows["a1111.png"]
    assert model_decided(a1111) and (a1111["provenance_kind"], a1111["declared_generator"]) == (
        "generator_metadata", A1111)
    bare = rows["stripped.png"]
    assert model_decided(bare) and bare["provenance_kind"] == "none" and bare["provenance"]["signals"] == []

    bomb = rows["xml_bomb.jpg"]  # hostile XMP: refused unexpanded, recorded, and the image judged all the same
    assert model_decided(bomb) and bomb["provenance_kind"] == "none"
    assert [(e["reason"], e["part"], e["fault"]) for e in bomb["provenance"]["errors"]] == [
        ("provenance_error", "xmp", "xml_forbidden")]

    for name, image_format in (("photo.heic", "HEIF"), ("photo_10bit.heic", "HEIF"), ("photo.avif", "AVIF")):
        assert (rows[name]["format"], rows[name]["width"], rows[name]["height"], rows[name]["frames"]) == (
            image_format, *SIZE, 1), name
    assert (rows["animated.gif"]["format"], rows["animated.gif"]["frames"]) == ("GIF", 3)

    # ppl-worker verdicts filters on what decided and on what the bytes declared.
    def verdicts(*options: str) -> list[dict[str, Any]]:
        listed = subprocess.run([sys.executable, "-m", "worker.cli", "verdicts", "--format", "json", *options],
                                env=env, capture_output=True, text=True, timeout=60, check=True)
        return json.loads(listed.stdout)

    assert [r["external_id"] for r in verdicts("--decision", "c2pa")] == ["signed_ai.jpg"]
    assert {r["external_id"] for r in verdicts("--provenance-kind", "iptc")} == {"xmp_ai.png"}
    assert {r["external_id"] for r in verdicts("--generator", A1111)} == {"a1111.png"}
    assert len(verdicts("--decision", "model")) == len(rows) - 1
    table = subprocess.run([sys.executable, "-m", "worker.cli", "verdicts", "--decision", "c2pa"], env=env,
                           capture_output=True, text=True, timeout=60, check=True).stdout
    header, _, line, count = table.splitlines()
    assert header.split()[:3] == ["created_at", "label", "decision"]
    assert line.split()[2:4] == ["fake", "c2pa"] and SIGNED_GENERATOR in line and count == "(1 row(s))"
    refused = subprocess.run([sys.executable, "-m", "worker.cli", "verdicts", "--decision", "oracle"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "invalid choice: 'oracle'" in refused.stderr


def test_trusted_unsigned_metadata_decides_in_decode_processes(
        database_url: str, redis_url: str, tiny_model_dir: Path, uploads: Path, tmp_path: Path) -> None:
    """PPL_TRUST_UNSIGNED_METADATA on, provenance read in two decode processes; no trust anchors, so the signed
    file is valid (not trusted) and still decides: a manifest that validates is enough."""
    env = worker_environment(database_url, redis_url, tiny_model_dir, uploads, PPL_DECODE_PROCESSES="2",
                             PPL_TRUST_UNSIGNED_METADATA="true")
    names = ["xmp_ai.png", "a1111.png", "stripped.png", "signed_ai.jpg", "altered.jpg", "photo.avif"]
    rows = judge_with(env, uploads, tmp_path / "worker.log")(names)
    for name in ("xmp_ai.png", "a1111.png"):
        assert (rows[name]["decision"], rows[name]["label"]) == ("metadata", "fake"), name
    assert (rows["xmp_ai.png"]["provenance_kind"], rows["a1111.png"]["declared_generator"]) == ("iptc", A1111)
    assert rows["stripped.png"]["decision"] == "model"  # nothing to trust
    assert (rows["signed_ai.jpg"]["decision"], rows["signed_ai.jpg"]["c2pa_state"]) == ("c2pa", "valid")
    assert (rows["altered.jpg"]["decision"], rows["altered.jpg"]["c2pa_state"]) == ("model", "invalid")
    assert rows["photo.avif"]["format"] == "AVIF" and rows["photo.avif"]["decision"] == "model"


def test_a_bad_trust_anchor_file_stops_the_worker_and_doctor_says_why(
        database_url: str, redis_url: str, tiny_model_dir: Path, uploads: Path, tmp_path: Path) -> None:
    bad = tmp_path / "anchors.pem"
    bad.write_text("this is not a certificate\n")
    env = worker_environment(database_url, redis_url, tiny_model_dir, uploads, PPL_C2PA_TRUST_ANCHORS=str(bad))
    run = subprocess.run([sys.executable, "-m", "worker.cli", "run"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    assert "PPL_C2PA_TRUST_ANCHORS" in run.stderr and "no PEM certificate" in run.stderr
    doctor = subprocess.run([sys.executable, "-m", "worker.cli", "doctor", "--skip-model"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert doctor.returncode == 1 and "[FAIL] provenance" in doctor.stdout and "no PEM certificate" in doctor.stdout
