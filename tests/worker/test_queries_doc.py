"""Every ```sql block of docs/queries.md runs as written against realistic data, and the main ones return
exactly the rows they claim to."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from ppl_model.categories import C2paState, ProvenanceKind
from ppl_model.inference.verdict import make_verdict
from ppl_model.provenance import C2paManifest, Provenance, ProvenanceError, Signal, decide
from ppl_model.reasons import ProvenanceFault
from worker import db
from worker.db import FailureRow, RescanFilters, VerdictRow

QUERIES_MD = Path(__file__).resolve().parents[2] / "docs" / "queries.md"

# The literals the document uses.
OLD, NEW = "5f1c2a9e8b7d3c40", "9e4b7c1d2a3f5e60"
THRESHOLDS = {OLD: 0.5, NEW: 0.62}
LOOKUP_SHA = "1f7079780428051193deaebbe911170b85730a35a205abc5038d1c07f94c6e6d"
LOOKUP_EXTERNAL_ID = "listing-48213"
LOOKUP_URL = "https://images.example.com/listing-48213/photo-1.jpg"
GRID = 16


def sql_blocks() -> dict[str, str]:
    """``{"<section heading> #<n>": sql}`` for the n-th sql block under each ``##`` heading."""
    blocks: dict[str, str] = {}
    heading, count = "(top)", 0
    for match in re.finditer(r"^## (?P<heading>[^\n]+)$|^```sql\n(?P<sql>.*?)^```$", QUERIES_MD.read_text(),
                             re.MULTILINE | re.DOTALL):
        if match["heading"]:
            heading, count = match["heading"].strip(), 0
        else:
            count += 1
            blocks[f"{heading} #{count}"] = match["sql"]
    return blocks


BLOCKS = sql_blocks()


@dataclass
class Dataset:
    """What was inserted, to compute each query's expected answer the slow obvious way."""

    rows: dict[tuple[str, str], VerdictRow] = field(default_factory=dict)  # (sha256, version) -> row
    age_hours: dict[tuple[str, str], float] = field(default_factory=dict)
    failures: list[tuple[FailureRow, int, float]] = field(default_factory=list)  # row, attempts, age in hours

    def latest(self) -> dict[str, tuple[str, str]]:
        """sha256 -> key of its latest verdict (the youngest; no two verdicts of an image share an age)."""
        out: dict[str, tuple[str, str]] = {}
        for key, age in self.age_hours.items():
            if key[0] not in out or age < self.age_hours[out[key[0]]]:
                out[key[0]] = key
        return out


def verdict(sha256: str, version: str, score: float, rng: np.random.Generator, source: str,
            external_id: str | None) -> VerdictRow:
    """A row as the worker writes it: a patch grid whose values follow the score, summarised by make_verdict."""
    grid = np.clip(rng.normal(score, 0.15, (GRID, GRID)), 0, 1).astype(np.float32)
    grid[rng.integers(GRID), rng.integers(GRID)] = min(1.0, score + 0.3)  # a hot spot somewhere
    summary = make_verdict(score, grid, THRESHOLDS[version])
    return VerdictRow.of(summary, grid, sha256=sha256, model_version=version, source=source, external_id=external_id,
                         metadata={"uploader": int(rng.integers(1000))} if rng.random() < 0.5 else None,
                         width=int(rng.choice([640, 1024, 1920])), height=int(rng.choice([480, 768, 1080])),
                         format=str(rng.choice(["JPEG", "PNG", "WEBP"])),
                         timings_ms={stage: round(float(rng.gamma(shape, scale)), 2) for stage, shape, scale in
                                     (("fetch", 2, 20), ("decode", 2, 2), ("infer", 4, 2), ("db", 2, 1))})


SIGNER = "Example AI Labs"
GENERATOR = "Image Maker"
TYPES = "http://cv.iptc.org/newscodes/digitalsourcetype/"
HASH_MISMATCH, SIGNATURE_MISMATCH = "assertion.dataHash.mismatch", "claimSignature.mismatch"


def _manifest(state: C2paState, source_type: str, signer: str = SIGNER, failures: tuple[str, ...] = ()) -> Provenance:
    return Provenance(c2pa=C2paManifest(state=state, claim_generator=f"{GENERATOR} 3.0", signer=signer,
                                        source_types=(TYPES + source_type,),
                                        generator=GENERATOR if source_type == "trainedAlgorithmicMedia" else "",
                                        failures=failures))


def _signal(kind: ProvenanceKind, value: str, trained: bool) -> Provenance:
    return Provenance(signals=(Signal(kind, "xmp" if kind is ProvenanceKind.IPTC else "png:parameters", value,
                                      trained),))


# Images the new model judged, with what their bytes said (name: provenance, score).
PROVENANCE_CASES: dict[str, tuple[Provenance, float]] = {
    "signed-ai-missed": (_manifest(C2paState.TRUSTED, "trainedAlgorithmicMedia"), 0.2),
    "signed-ai-missed-untrusted-root": (_manifest(C2paState.VALID, "trainedAlgorithmicMedia"), 0.4),
    "signed-ai-caught": (_manifest(C2paState.TRUSTED, "trainedAlgorithmicMedia"), 0.9),
    "camera-signed": (_manifest(C2paState.TRUSTED, "digitalCapture", signer="Camera Maker"), 0.3),
    "altered": (_manifest(C2paState.INVALID, "trainedAlgorithmicMedia", failures=(HASH_MISMATCH,)), 0.3),
    "altered-again": (_manifest(C2paState.INVALID, "trainedAlgorithmicMedia",
                                failures=(HASH_MISMATCH, SIGNATURE_MISMATCH)), 0.8),
    "damaged-manifest": (Provenance(c2pa=C2paManifest(state=C2paState.INVALID, failures=("Verify: bad box",))), 0.5),
    "a1111": (_signal(ProvenanceKind.GENERATOR_METADATA, "Stable Diffusion", True), 0.3),
    "comfyui": (_signal(ProvenanceKind.GENERATOR_METADATA, "ComfyUI", True), 0.7),
    "iptc-ai": (_signal(ProvenanceKind.IPTC, TYPES + "trainedAlgorithmicMedia", True), 0.1),
    "iptc-camera": (_signal(ProvenanceKind.IPTC, TYPES + "digitalCapture", False), 0.2),
    "xml-bomb": (Provenance(errors=(ProvenanceError(ProvenanceFault.XML_FORBIDDEN, "xmp", "EntitiesForbidden"),)),
                 0.5),
    "plain": (Provenance(), 0.3),
}


def provenance_verdict(name: str, rng: np.random.Generator) -> VerdictRow:
    """A new-model verdict for a ``PROVENANCE_CASES`` image, labelled as the worker labels it (``decide``, with
    unsigned metadata untrusted)."""
    provenance, score = PROVENANCE_CASES[name]
    grid = np.clip(rng.normal(score, 0.15, (GRID, GRID)), 0, 1).astype(np.float32)
    summary = make_verdict(score, grid, THRESHOLDS[NEW])
    ruling = decide(provenance, summary.label, trust_unsigned_metadata=False)
    return VerdictRow.of(summary, grid, sha256=provenance_sha(name), model_version=NEW,
                         source=f"https://images.example.com/{name}.jpg", external_id=name, metadata=None, width=1024,
                         height=768, format="JPEG", timings_ms={"fetch": 20.0, "decode": 4.0, "provenance": 0.3,
                                                                "infer": 8.0, "db": 2.0},
                         ruling=ruling, provenance=provenance, frames=1)


def provenance_sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def age(rng: np.random.Generator, low: float, high: float) -> float:
    """An age in hours kept clear of the 24-hour and 7-day window edges, so seconds of test runtime never
    move a row across one."""
    while True:
        hours = float(rng.uniform(low, high))
        if not (22 < hours < 26 or 166 < hours < 170):
            return hours


@pytest.fixture(scope="module")
def filled(module_engine: Engine) -> tuple[Engine, Dataset]:
    """Two model versions (the newer active, a partial rescan done), 70 images, failures, a rescan run."""
    engine, data, rng = module_engine, Dataset(), np.random.default_rng(7)
    db.register_model_version(engine, OLD, {"arch": "clip", "size": "large"}, THRESHOLDS[OLD], {"ap": 0.95})
    db.register_model_version(engine, NEW, {"arch": "dinov2", "size": "large"}, THRESHOLDS[NEW], {"ap": 0.97})
    for i in range(70):
        sha = LOOKUP_SHA if i == 0 else f"{i:064x}"
        source = LOOKUP_URL if i == 0 else f"https://images.example.com/item-{i}/photo.jpg"
        external_id = LOOKUP_EXTERNAL_ID if i == 0 else (f"item-{i}" if i % 3 else None)
        old_score = float(rng.beta(0.6, 0.6))
        if i < 60:  # judged by the old model ...
            data.rows[sha, OLD] = verdict(sha, OLD, old_score, rng, source, external_id)
            data.age_hours[sha, OLD] = age(rng, 30, 240)
        if i < 35 or i >= 60:  # ... and (re)judged by the new one, after it
            new_score = float(np.clip(old_score + rng.normal(0, 0.2), 0, 1)) if i < 60 else float(rng.random())
            data.rows[sha, NEW] = verdict(sha, NEW, new_score, rng, source, external_id)
            data.age_hours[sha, NEW] = age(rng, 0.5, data.age_hours.get((sha, OLD), 60) - 1)
    for name in PROVENANCE_CASES:  # judged by the new model only, this week
        row = provenance_verdict(name, rng)
        data.rows[row.sha256, NEW] = row
        data.age_hours[row.sha256, NEW] = age(rng, 0.5, 150)
    db.upsert_verdicts(engine, list(data.rows.values()))
    failures = [(FailureRow("https://images.example.com/listing-48213/photo-2.jpg", LOOKUP_EXTERNAL_ID,
                            "not_an_image", "content-type text/html"), 2, 3.0),
                (FailureRow(LOOKUP_URL, LOOKUP_EXTERNAL_ID, "fetch_timeout", "read timed out after 15 s"), 1, 200.0),
                (FailureRow("https://cdn.example.net/a.svg", None, "not_an_image", "SVG is not supported"), 1, 30.0),
                (FailureRow("https://cdn.example.net/huge.tiff", "item-900", "too_large", "94 MB"), 3, 10.0),
                (FailureRow("https://cdn.example.net/bomb.png", None, "too_large", "400 Mpx"), 1, 100.0),
                (FailureRow("file:///data/uploads/gone.jpg", "item-901", "missing", "no such file"), 1, 240.0)]
    for row, attempts, _ in failures:
        for _ in range(attempts):
            db.record_failures(engine, [row])
    data.failures = failures
    with engine.begin() as conn:
        for (sha, version), hours in data.age_hours.items():
            conn.execute(text("UPDATE verdicts SET created_at = now() - make_interval(secs => :s) "
                              "WHERE sha256 = :sha AND model_version = :v"),
                         {"s": hours * 3600, "sha": sha, "v": version})
        for row, _, hours in failures:
            conn.execute(text("UPDATE detection_failures SET last_seen = now() - make_interval(secs => :s), "
                              "first_seen = now() - make_interval(secs => :s + 3600) WHERE source_sha256 = :h"),
                         {"s": hours * 3600, "h": db.source_sha256(row.source)})
    # Two posts carried the lookup image (one verdict, two jobs); one message was no runnable job.
    malformed = FailureRow("dead-letter:5d1f", None, "malformed_message", "the body is not [args, kwargs, embed]")
    db.record_failures(engine, [malformed])
    data.failures.append((malformed, 1, 0.0))
    now = datetime.now(UTC)
    db.record_submissions(engine, [
        db.SubmissionRow("task-a", LOOKUP_EXTERNAL_ID, LOOKUP_URL, None, now, verdict=(LOOKUP_SHA, NEW)),
        db.SubmissionRow("task-b", LOOKUP_EXTERNAL_ID, LOOKUP_URL + "?copy", None, now, verdict=(LOOKUP_SHA, NEW)),
        db.SubmissionRow("task-c", None, malformed.source, None, now, failure=malformed)])
    run = db.create_rescan_run(engine, RescanFilters(), NEW, total=25)
    db.update_rescan_run(engine, run.id, cursor=10, enqueued=5, status="paused")
    return engine, data


def run_block(engine: Engine, name: str) -> list[dict[str, Any]]:
    """The block exactly as written, through the driver (no parameter or colon processing), read-only."""
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        try:
            raw.execute("SET TRANSACTION READ ONLY")
            cursor = raw.execute(BLOCKS[name])
            columns = [c.name for c in cursor.description or []]
            return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
        finally:
            raw.rollback()


def test_the_document_has_the_promised_queries() -> None:
    sections = {name.rsplit(" #", 1)[0] for name in BLOCKS}
    assert {"Images flagged in the last 24 hours", "Fake rate per day", "Score distribution per model version",
            "Images whose verdict changed between two versions", "Failures by reason in a window",
            "Where flagged images look most generated (top-patch heatmap)", "Decoding the patch grid",
            "Looking up one item", "Stale images awaiting a rescan", "Jobs by task id or external id",
            "Provenance: signed as AI but scored real", "Provenance: declared generators this week",
            "Provenance: invalid manifests by signer",
            "Provenance: metadata-only evidence the model disagrees with"} <= sections
    assert len(BLOCKS) >= 21


@pytest.mark.parametrize("name", list(BLOCKS))
def test_every_block_runs(filled: tuple[Engine, Dataset], name: str) -> None:
    engine, _ = filled
    rows = run_block(engine, name)
    assert rows, f"{name} returned nothing on a database full of verdicts"


def test_flagged_in_the_last_24_hours(filled: tuple[Engine, Dataset]) -> None:
    engine, data = filled
    expected = {key for key in data.latest().values() if data.rows[key].label == "fake" and data.age_hours[key] < 24}
    rows = run_block(engine, "Images flagged in the last 24 hours #1")
    assert {(r["sha256"], r["model_version"]) for r in rows} == expected
    assert len(rows) == len(expected) > 3
    assert [r["created_at"] for r in rows] == sorted((r["created_at"] for r in rows), reverse=True)
    # The old model's fake verdicts of the same window are not listed where a newer verdict exists.
    assert all(r["model_version"] == NEW for r in rows)


def test_fake_rate_and_score_distribution(filled: tuple[Engine, Dataset]) -> None:
    engine, data = filled
    per_day = run_block(engine, "Fake rate per day #1")
    assert sum(r["judged"] for r in per_day) == len(data.rows)
    assert sum(r["flagged"] for r in per_day) == sum(row.label == "fake" for row in data.rows.values())
    distribution = {r["model_version"]: r for r in run_block(engine, "Score distribution per model version #1")}
    for version in (OLD, NEW):
        rows = [row for row in data.rows.values() if row.model_version == version]
        assert distribution[version]["verdicts"] == len(rows)
        assert float(distribution[version]["fake_rate"]) == pytest.approx(
            sum(r.label == "fake" for r in rows) / len(rows), abs=1e-4)
        assert distribution[version]["p10_p50_p90_p99"][1] == pytest.approx(np.median([r.score for r in rows]))
    assert distribution[NEW]["active"] and not distribution[OLD]["active"]
    histogram = run_block(engine, "Score distribution per model version #2")
    assert sum(r["verdicts"] for r in histogram) == len(data.rows)
    assert {r["bucket"] for r in histogram} <= set(range(1, 11))


def test_verdicts_changed_between_versions(filled: tuple[Engine, Dataset]) -> None:
    engine, data = filled
    both = [sha for sha, version in data.rows if version == NEW and (sha, OLD) in data.rows]
    changed = {sha for sha in both if data.rows[sha, OLD].label != data.rows[sha, NEW].label}
    rows = run_block(engine, "Images whose verdict changed between two versions #1")
    assert {r["sha256"] for r in rows} == changed and changed
    matrix = {(r["old_label"], r["new_label"]): r["images"]
              for r in run_block(engine, "Images whose verdict changed between two versions #2")}
    assert sum(matrix.values()) == len(both)
    assert matrix.get(("fake", "real"), 0) + matrix.get(("real", "fake"), 0) == len(changed)


def test_failures_by_reason(filled: tuple[Engine, Dataset]) -> None:
    engine, data = filled
    expected: dict[str, list[int]] = {}
    for row, attempts, hours in data.failures:
        if hours < 7 * 24:
            expected.setdefault(row.reason, [0, 0])
            expected[row.reason][0] += 1
            expected[row.reason][1] += attempts
    rows = run_block(engine, "Failures by reason in a window #1")
    assert {r["reason"]: [r["sources"], r["attempts"]] for r in rows} == expected
    assert "missing" not in expected and "fetch_timeout" not in expected  # outside the window


def test_top_patch_heatmap(filled: tuple[Engine, Dataset]) -> None:
    engine, data = filled
    fakes = [row for row in data.rows.values() if row.model_version == NEW and row.label == "fake"]
    expected = Counter((row.top_patch_row, row.top_patch_col) for row in fakes)
    rows = run_block(engine, "Where flagged images look most generated (top-patch heatmap) #1")
    assert {(r["top_patch_row"], r["top_patch_col"]): r["images"] for r in rows} == expected
    drawn = run_block(engine, "Where flagged images look most generated (top-patch heatmap) #2")
    assert [r["patch_row"] for r in drawn] == list(range(GRID))
    cells = [[int(cell) for cell in r["images_per_patch_column"].split()] for r in drawn]
    assert all(len(line) == GRID for line in cells)
    assert {(i, j): n for i, line in enumerate(cells) for j, n in enumerate(line) if n} == expected


def test_patch_grid_decoding_matches_dequantise(filled: tuple[Engine, Dataset]) -> None:
    engine, data = filled
    row = data.rows[LOOKUP_SHA, NEW]
    grid = db.dequantise_patch_grid(row.patch_grid, row.grid_rows, row.grid_cols)
    decoded = run_block(engine, "Decoding the patch grid #1")
    assert len(decoded) == GRID * GRID
    for r in decoded:
        assert float(r["probability"]) == pytest.approx(grid[r["patch_row"], r["patch_col"]], abs=5e-4)
    assert max(decoded, key=lambda r: r["probability"])["probability"] == round(grid.max(), 3)
    mean_map = run_block(engine, "Decoding the patch grid #2")
    assert len(mean_map) == GRID * GRID


def test_lookups_by_external_id_and_url(filled: tuple[Engine, Dataset]) -> None:
    engine, _ = filled
    by_id = run_block(engine, "Looking up one item #1")
    assert sorted((r["kind"], r["model_version"] or r["reason"]) for r in by_id) == sorted([
        ("failure", "fetch_timeout"), ("failure", "not_an_image"), ("verdict", NEW), ("verdict", OLD)])
    assert [r["at"] for r in by_id] == sorted((r["at"] for r in by_id), reverse=True)
    by_url = run_block(engine, "Looking up one item #2")
    # The SQL sha256 of the URL finds the failure the worker keyed with Python's hashlib.
    assert sorted((r["kind"], r["model_version"] or r["reason"]) for r in by_url) == sorted([
        ("failure", "fetch_timeout"), ("verdict", NEW), ("verdict", OLD)])


def test_stale_images_match_what_a_rescan_would_enqueue(filled: tuple[Engine, Dataset]) -> None:
    engine, data = filled
    rows = run_block(engine, "Stale images awaiting a rescan #1")
    stale = {sha for sha, version in data.latest().values() if version != NEW}
    assert sum(r["images"] for r in rows) == len(stale) == db.count_rescan_candidates(engine, RescanFilters(), NEW)
    assert {r["last_judged_by"] for r in rows} == {OLD}
    runs = run_block(engine, "Stale images awaiting a rescan #2")
    assert [(r["status"], r["enqueued"], r["total"], float(r["percent"])) for r in runs] == [("paused", 5, 25, 20.0)]


def test_latency_and_throughput(filled: tuple[Engine, Dataset]) -> None:
    engine, data = filled
    recent = [key for key, hours in data.age_hours.items() if hours < 24]
    latency = {r["model_version"]: r for r in run_block(engine, "Throughput and latency #1")}
    assert sum(r["verdicts"] for r in latency.values()) == len(recent)
    infer = [data.rows[key].timings_ms["infer"] for key in recent if key[1] == NEW]
    assert latency[NEW]["infer_p50"] == pytest.approx(float(np.median(infer)))
    hourly = run_block(engine, "Throughput and latency #2")
    assert sum(r["verdicts"] for r in hourly) == len(recent)
    assert all(isinstance(r["hour"], datetime) for r in hourly)


def test_jobs_by_external_id_and_refusals(filled: tuple[Engine, Dataset]) -> None:
    engine, data = filled
    jobs = run_block(engine, "Jobs by task id or external id #1")
    assert sorted(r["task_id"] for r in jobs) == ["task-a", "task-b"]
    assert {(r["outcome"], r["label"]) for r in jobs} == {("verdict", data.rows[LOOKUP_SHA, NEW].label)}
    refused = run_block(engine, "Jobs by task id or external id #2")
    assert [(r["reason"], r["jobs"]) for r in refused] == [("malformed_message", 1)]


def test_signed_as_ai_but_scored_real(filled: tuple[Engine, Dataset]) -> None:
    engine, data = filled
    rows = run_block(engine, "Provenance: signed as AI but scored real #1")
    assert {r["sha256"] for r in rows} == {provenance_sha("signed-ai-missed"),
                                           provenance_sha("signed-ai-missed-untrusted-root")}
    assert all(r["score"] < r["threshold"] and r["claim_generator"] == f"{GENERATOR} 3.0" for r in rows)
    recall = run_block(engine, "Provenance: signed as AI but scored real #2")
    assert [(r["model_version"], r["signed_as_ai"], r["model_flagged"]) for r in recall] == [(NEW, 3, 1)]
    assert all(row.label == "fake" for row in data.rows.values() if row.decision == "c2pa")


def test_declared_generators_this_week(filled: tuple[Engine, Dataset]) -> None:
    engine, _ = filled
    rows = run_block(engine, "Provenance: declared generators this week #1")
    assert {r["declared_generator"]: (r["images"], r["decided_by_c2pa"], r["decided_by_metadata"], r["model_flagged"])
            for r in rows} == {GENERATOR: (3, 3, 0, 1), "Stable Diffusion": (1, 0, 0, 0), "ComfyUI": (1, 0, 0, 1)}


def test_invalid_manifests_by_signer(filled: tuple[Engine, Dataset]) -> None:
    engine, _ = filled
    rows = run_block(engine, "Provenance: invalid manifests by signer #1")
    assert {r["signer"]: (r["images"], sorted(r["failure_codes"])) for r in rows} == {
        SIGNER: (2, [HASH_MISMATCH, SIGNATURE_MISMATCH]), "(unreadable)": (1, ["Verify: bad box"])}


def test_metadata_only_evidence_the_model_disagrees_with(filled: tuple[Engine, Dataset]) -> None:
    engine, _ = filled
    rows = run_block(engine, "Provenance: metadata-only evidence the model disagrees with #1")
    assert {r["sha256"] for r in rows} == {provenance_sha("a1111"), provenance_sha("iptc-ai")}
    assert {(r["decision"], r["label"]) for r in rows} == {("model", "real")}  # unsigned metadata untrusted
    errors = run_block(engine, "Provenance: metadata-only evidence the model disagrees with #2")
    assert [(r["part"], r["fault"], r["images"]) for r in errors] == [("xmp", "xml_forbidden", 1)]
