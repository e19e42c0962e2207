"""The micro-batch pipeline against a real PostgreSQL, with the tiny model and no Celery."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text

from tests.helpers import run_concurrently
from worker import db
from worker.loading import make_loader
from worker.model import ServedModel, load_model
from worker.pipeline import BatchProcessor, DatabaseUnavailable, InvalidJob, JobRequest, parse_job
from worker.settings import Settings


class CountingBackend:
    """The real backend, recording the batch size of every inference call and whether two ever overlapped."""

    def __init__(self, backend):
        self.inner, self.calls = backend, []
        self.name, self.device, self.info = backend.name, backend.device, backend.info
        self.running, self.overlapped = 0, False

    def predict(self, pixels):
        self.running += 1
        self.overlapped |= self.running > 1
        try:
            time.sleep(0.02)  # long enough for another batch to try to infer meanwhile
            self.calls.append(len(pixels))
            return self.inner.predict(pixels)
        finally:
            self.running -= 1


class CountingLoader:
    """The processor's own loader, recording how many images each decode call was given."""

    def __init__(self, inner):
        self.inner, self.decoded = inner, []

    def fetch(self, sources):
        return self.inner.fetch(sources)

    def decode(self, handles, spec):
        self.decoded.append(len(handles))
        return self.inner.decode(handles, spec)

    def release(self, handles):
        self.inner.release(handles)

    def close(self):
        self.inner.close()


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    (root / "copy_of_img0.png").write_bytes((root / "img0.png").read_bytes())
    (root / "notes.png").write_text("<html>not an image</html>")
    return root


@pytest.fixture
def make_processor(tiny_model_dir, database_url, images):
    made = []

    def build(**overrides):
        settings = Settings.from_env({}, model_dir=tiny_model_dir, backend="torch", database_url=database_url,
                                     file_roots=(images,), decode_threads=2, metrics_port=0, **overrides)
        served = load_model(settings)
        counting = ServedModel(CountingBackend(served.backend), served.preprocessing)
        resent = []
        processor = BatchProcessor(settings, db.make_engine(settings.database_url),
                                   resend=lambda job, delay: resent.append((job, delay)),
                                   model_loader=lambda _: counting, sleep=lambda _: None,
                                   loader=CountingLoader(make_loader(settings)))
        made.append(processor)
        return processor, counting.backend, resent

    yield build
    for processor in made:
        processor.close()


def request(i, **kwargs):
    return JobRequest(task_id=f"t{i}", kwargs=kwargs)


def uri(path):
    return path.resolve().as_uri()


def test_a_batch_gives_verdicts_failures_and_one_inference_call(make_processor, images, database_url):
    processor, backend, _ = make_processor()
    batch = [request(i, source=uri(images / f"img{i}.png"), external_id=f"e{i}", metadata={"n": i})
             for i in range(4)]
    batch += [request(4, source=uri(images / "copy_of_img0.png")),  # same content as img0
              request(5, source=uri(images / "notes.png")),
              request(6, source=uri(images / "gone.png")),
              request(7, source=uri(images.parent / "outside.png")),
              request(8, source=42),
              request(9, source=uri(images / "img1.png"), colour="red")]
    report = processor.process(batch)

    assert backend.calls == [4]  # one call, the duplicate content inferred once
    assert report.inferred == 4 and report.cached == 1 and report.inserted == 4
    assert report.failed == {"not_an_image": 1, "missing": 1, "path_forbidden": 1, "invalid_arguments": 2}
    with db.make_engine(database_url).connect() as conn:
        rows = conn.execute(text("select * from verdicts order by external_id")).mappings().all()
        failures = dict(conn.execute(text("select reason, count(*) from detection_failures group by reason")).all())
    assert [r["external_id"] for r in rows] == ["e0", "e1", "e2", "e3"]
    assert failures == report.failed
    for row in rows:
        grid = db.dequantise_patch_grid(row["patch_grid"], row["grid_rows"], row["grid_cols"])
        assert grid.shape == (4, 4)
        assert row["patch_max"] == pytest.approx(grid.max(), abs=1 / 255)
        assert 0 <= row["top_patch_row"] < 4 and 0 <= row["top_patch_col"] < 4
        assert row["label"] == ("fake" if row["score"] >= row["threshold"] else "real")
        assert set(row["timings_ms"]) >= {"fetch", "decode", "infer"}
    assert rows[1]["metadata"] == {"n": 1} and rows[2]["height"] == 56


@pytest.mark.parametrize("decode_processes", [0, 2])
def test_content_already_judged_is_answered_from_its_hash_before_it_is_decoded(make_processor, images,
                                                                                database_url, decode_processes):
    processor, backend, _ = make_processor(decode_processes=decode_processes)
    processor.process([request(0, source=uri(images / "img0.png")), request(1, source=uri(images / "img0.png"))])
    report = processor.process([request(1, source=uri(images / "copy_of_img0.png")),
                                request(2, source=uri(images / "img0.png"))])
    assert processor.loader.decoded == [1, 0]  # the duplicate in the first batch and the second batch: no decode
    assert backend.calls == [1]
    assert report.cached == 2 and report.inferred == 0 and report.inserted == 0
    with db.make_engine(database_url).connect() as conn:
        assert conn.execute(text("select count(*) from verdicts")).scalar() == 1


def test_redelivered_batch_makes_no_second_row(make_processor, images, database_url):
    processor, _, _ = make_processor()
    batch = [request(i, source=uri(images / f"img{i}.png")) for i in range(3)]
    first = processor.process(batch)
    processor.close()
    again, _, _ = make_processor()  # a fresh process, as after a crash before the acknowledgement
    second = again.process(batch)
    assert first.inserted == 3 and second.inserted == 0 and second.cached == 3
    with db.make_engine(database_url).connect() as conn:
        assert conn.execute(text("select count(*) from verdicts")).scalar() == 3


def test_transient_errors_are_resent_with_backoff_then_recorded(make_processor):
    processor, _, resent = make_processor(url_allowlist=("127.0.0.1/32",), max_retries=2, retry_backoff_s=1.0)
    closed = "http://127.0.0.1:9/image.png"  # discard port: connection refused
    processor.process([JobRequest("a", kwargs={"source": closed}, retries=1)])
    assert [(job.source, job.retries, delay) for job, delay in resent] == [(closed, 1, 2.0)]
    report = processor.process([JobRequest("b", kwargs={"source": closed}, retries=2)])
    assert report.failed == {"connection_failed": 1} and len(resent) == 1


def test_database_outage_hands_the_batch_back(tiny_model_dir, images):
    settings = Settings.from_env({}, model_dir=tiny_model_dir, backend="torch", file_roots=(images,),
                                 database_url="postgresql+psycopg://postgres@127.0.0.1:9/none",
                                 database_retry_s=0.5, metrics_port=0)
    waits = []
    processor = BatchProcessor(settings, db.make_engine(settings.database_url), resend=lambda *_: None,
                               sleep=waits.append)
    try:
        with pytest.raises(DatabaseUnavailable, match="database unreachable"):
            processor.process([request(0, source=uri(images / "img0.png"))])
    finally:
        processor.close()
    assert waits and waits == sorted(waits)  # backed off, increasingly


@pytest.mark.parametrize(("kwargs", "args", "message"), [
    ({"source": "file:///x.png", "external_id": 7}, (), "external_id must be a string"),
    ({"source": "file:///x.png", "metadata": [1, 2]}, (), "metadata must be a JSON object"),
    ({"source": "file:///x.png", "metadata": {"blob": "x" * 5000}}, (), "bytes of JSON"),
    ({"source": ""}, (), "non-empty string"),
    ({}, ("file:///x.png",), "keyword arguments only"),
    ("source=x", (), "must be an object"),
])
def test_malformed_arguments_are_refused_with_a_reason(kwargs, args, message):
    with pytest.raises(InvalidJob, match=message):
        parse_job(JobRequest("t", args=args, kwargs=kwargs), Settings.from_env({}))


def test_a_row_the_database_refuses_fails_alone_instead_of_blocking_its_batch(make_processor, images, engine,
                                                                              monkeypatch):
    # parse_job refuses NUL characters; let one through, as a future gap in validation would.
    monkeypatch.setattr("worker.pipeline._storable", lambda value: True)
    processor, _, _ = make_processor()
    batch = [request(i, source=uri(images / f"img{i}.png"), external_id=f"e{i}") for i in range(3)]
    batch.append(request(3, source=uri(images / "img3.png"), external_id="bad\x00id"))
    report = processor.process(batch)
    assert report.inserted == 3 and report.failed == {"unstorable": 1}
    with engine.connect() as conn:
        ids = set(conn.execute(text("select external_id from verdicts")).scalars())
        failure = conn.execute(text("select external_id, reason from detection_failures")).one()
    assert ids == {"e0", "e1", "e2"}
    assert tuple(failure) == ("bad\\x00id", "unstorable")


def test_decode_processes_store_the_same_verdicts_as_threads(make_processor, images, database_url):
    batch = [request(i, source=uri(images / f"img{i}.png")) for i in range(4)] + \
        [request(5, source=uri(images / "notes.png")), request(6, source=uri(images / "gone.png"))]
    scores = {}
    for processes in (0, 2):
        processor, _, _ = make_processor(decode_processes=processes)
        report = processor.process(batch)
        assert report.inferred == 4 and report.failed == {"not_an_image": 1, "missing": 1}
        with db.make_engine(database_url).connect() as conn:
            scores[processes] = conn.execute(text("select source, score, width, height from verdicts "
                                                  "order by source")).all()
            conn.execute(text("delete from submissions; delete from verdicts"))
            conn.commit()
    assert scores[0] == scores[2] and len(scores[0]) == 4


def test_batches_in_flight_overlap_but_infer_one_at_a_time(make_processor, images, database_url):
    processor, backend, _ = make_processor()
    batches = [[request(10 * b + i, source=uri(images / f"img{i}.png"), external_id=f"b{b}") for i in range(4)]
               for b in range(3)]
    reports = []
    errors = run_concurrently(lambda batch: reports.append(processor.process(batch)), batches)
    assert not errors and len(reports) == 3
    assert not backend.overlapped
    assert sum(r.inserted for r in reports) == 4 and sum(r.inferred for r in reports) >= 4
    with db.make_engine(database_url).connect() as conn:
        assert conn.execute(text("select count(*) from submissions")).scalar() == 12
        assert conn.execute(text("select count(*) from verdicts")).scalar() == 4


def test_a_loaded_model_takes_the_objects_alive_then_out_of_full_collections(tiny_model_dir):
    import gc

    from worker.model import clear_cache

    clear_cache()
    gc.unfreeze()
    try:
        assert gc.get_freeze_count() == 0
        served = load_model(Settings.from_env({}, model_dir=tiny_model_dir, backend="torch", metrics_port=0))
        frozen = gc.get_freeze_count()
        assert frozen > 1000  # the imports and the model, at least
        made_since = [[i] for i in range(5000)]  # alive and tracked (lists always are): a second freeze takes them
        assert load_model(Settings.from_env({}, model_dir=tiny_model_dir, backend="torch", metrics_port=0)) is served
        # A cached model freezes nothing more. (The count can fall: frozen objects are still freed when their last
        # reference goes.)
        assert gc.get_freeze_count() <= frozen and len(made_since) == 5000
    finally:
        gc.unfreeze()
        clear_cache()
