"""A real worker process over real Redis and PostgreSQL, fed by a producer process that does not import
this package (as other services do): verdicts, duplicates, bad input, rescans, and `doctor`."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text

from benchmarks.harness import worker_environment
from tests.worker.processes import WorkerProcess, produce, wait_until
from worker import db


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "uploads"
    root.mkdir()
    rng = np.random.default_rng(7)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (48, 40 + 4 * i, 3), dtype=np.uint8)).save(root / f"photo{i}.png")
    shutil.copy(root / "photo0.png", root / "photo0_again.png")
    (root / "page.jpg").write_text("<!doctype html><title>not an image</title>")
    (root / "truncated.png").write_bytes((root / "photo1.png").read_bytes()[:120])
    outside = tmp_path / "secret.png"
    shutil.copy(root / "photo2.png", outside)
    (root / "escape.png").symlink_to(outside)
    return root


@pytest.fixture
def worker_env(database_url, redis_url, tiny_model_dir, image_root):
    return worker_environment(database_url, redis_url, tiny_model_dir, image_root)


@pytest.fixture
def running_worker(worker_env, tmp_path):
    worker = WorkerProcess(worker_env, tmp_path / "worker.log").start()
    yield worker.proc
    worker.stop()


def counts(engine) -> tuple[int, int]:
    with engine.connect() as conn:
        return (conn.execute(text("select count(*) from verdicts")).scalar(),
                conn.execute(text("select count(*) from detection_failures")).scalar())


def test_jobs_from_another_process_become_verdicts_and_failures(running_worker, worker_env, image_root,
                                                                database_url):
    engine = db.make_engine(database_url)
    good = [{"source": (image_root / f"photo{i}.png").as_uri(), "external_id": f"post-{i}", "metadata": {"i": i}}
            for i in range(6)]
    duplicates = [{"source": (image_root / "photo0_again.png").as_uri()}, good[1]]
    bad = [{"source": (image_root / "page.jpg").as_uri()}, {"source": (image_root / "truncated.png").as_uri()},
           {"source": (image_root / "escape.png").as_uri()}, {"source": "file:///etc/passwd"},
           {"source": "http://169.254.169.254/latest/meta-data/"}, {"source": 12}, {"src": "x"}]
    produce(worker_env["PPL_BROKER_URL"], good + duplicates + bad)

    wait_until(lambda: counts(engine) == (6, 7), what="6 verdicts and 7 failures")
    with engine.connect() as conn:
        rows = conn.execute(text("select * from verdicts order by external_id")).mappings().all()
        reasons = dict(conn.execute(text("select reason, count(*) from detection_failures group by reason")).all())
    assert [r["external_id"] for r in rows] == [f"post-{i}" for i in range(6)]
    assert all(r["grid_rows"] == 4 and r["grid_cols"] == 4 and len(r["patch_grid"]) == 16 for r in rows)
    assert all(0 <= r["patch_mean"] <= r["patch_max"] <= 1 for r in rows)
    assert rows[3]["metadata"] == {"i": 3} and rows[3]["format"] == "PNG"
    assert reasons == {"not_an_image": 1, "corrupt": 1, "path_forbidden": 2, "blocked_address": 1,
                       "invalid_arguments": 2}

    # The worker is still healthy: a new job after all that is answered (submitted and awaited by the CLI).
    Image.new("RGB", (50, 50), (10, 200, 30)).save(image_root / "late.png")
    submit = subprocess.run([sys.executable, "-m", "worker.cli", "submit", str(image_root / "late.png"), "--wait",
                             "--timeout", "60"], env=worker_env, capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    assert counts(engine)[0] == 7 and running_worker.poll() is None

    listed = subprocess.run([sys.executable, "-m", "worker.cli", "verdicts", "--format", "json", "--since", "1h"],
                            env=worker_env, capture_output=True, text=True, timeout=60, check=True)
    shown = json.loads(listed.stdout)
    assert len(shown) == 7 and {r["source"] for r in shown} >= {g["source"] for g in good}
    flagged = subprocess.run([sys.executable, "-m", "worker.cli", "verdicts", "--flagged", "--format", "csv"],
                             env=worker_env, capture_output=True, text=True, timeout=60, check=True)
    assert len(flagged.stdout.strip().splitlines()) - 1 == sum(r["label"] == "fake" for r in shown)


def test_rescan_enqueues_exactly_the_stale_images(running_worker, worker_env, image_root, database_url):
    engine = db.make_engine(database_url)
    produce(worker_env["PPL_BROKER_URL"], [{"source": (image_root / f"photo{i}.png").as_uri()} for i in range(3)])
    wait_until(lambda: counts(engine)[0] == 3, what="3 verdicts from the served model")
    with engine.begin() as conn:
        current = db.active_model_version(conn)
        conn.execute(text("insert into model_versions (id, architecture, threshold, metrics, active) "
                          "values ('old-model', '{}', 0.5, '{}', false)"))
        # photo0..2 were judged by both versions; photo3..5 only by the old one: those are stale.
        conn.execute(text("""
            insert into verdicts (sha256, model_version, score, label, threshold, source, width, height, format,
                                  patch_mean, patch_max, patch_p90, patch_frac_above, top_patch_row, top_patch_col,
                                  patch_grid, grid_rows, grid_cols, timings_ms)
            select h, 'old-model', 0.9, 'fake', 0.5, s, 1, 1, 'PNG', 0, 0, 0, 0, 0, 0, '\\x00', 1, 1, '{}'
            from unnest(cast(:sources as text[]), cast(:digests as text[])) as t(s, h)"""),
                     {"sources": [(image_root / f"photo{i}.png").as_uri() for i in range(3, 6)],
                      "digests": [hashlib.sha256((image_root / f"photo{i}.png").read_bytes()).hexdigest()
                                  for i in range(3, 6)]})
        conn.execute(text("""
            insert into verdicts (sha256, model_version, score, label, threshold, source, width, height, format,
                                  patch_mean, patch_max, patch_p90, patch_frac_above, top_patch_row, top_patch_col,
                                  patch_grid, grid_rows, grid_cols, timings_ms)
            select sha256, 'old-model', 0.1, 'real', 0.5, source, 1, 1, 'PNG', 0, 0, 0, 0, 0, 0, '\\x00', 1, 1, '{}'
            from verdicts where model_version = :current"""), {"current": current})
    result = subprocess.run([sys.executable, "-m", "worker.cli", "rescan", "--no-progress"], env=worker_env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["enqueued"] == 3 and summary["total"] == 3 and summary["status"] == "done"

    def current_sources():
        with engine.connect() as conn:
            return conn.execute(text("select source from verdicts where model_version = :v order by source"),
                                {"v": current}).scalars().all()

    wait_until(lambda: len(current_sources()) == 6, what="the stale images judged by the current model")
    # Nothing stale is left, so a second rescan enqueues nothing.
    again = subprocess.run([sys.executable, "-m", "worker.cli", "rescan", "--no-progress", "--restart"],
                           env=worker_env, capture_output=True, text=True, timeout=120)
    assert json.loads(again.stdout.strip().splitlines()[-1])["enqueued"] == 0


def test_doctor_passes_then_fails_clearly_when_the_database_is_down(worker_env, database_url):
    ok = subprocess.run([sys.executable, "-m", "worker.cli", "doctor"], env=worker_env, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "[ok  ] migrations" in ok.stdout and "[ok  ] model" in ok.stdout
    assert "atomic delivery" in ok.stdout  # this machine's Redis has BLMOVE (worker/broker.py)
    down = dict(worker_env, PPL_DATABASE_URL="postgresql+psycopg://postgres@127.0.0.1:9/ppl")
    bad = subprocess.run([sys.executable, "-m", "worker.cli", "doctor", "--skip-model"], env=down,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert "[FAIL] database" in bad.stdout and "127.0.0.1:9" in bad.stdout
    assert "[ok  ] broker" in bad.stdout
