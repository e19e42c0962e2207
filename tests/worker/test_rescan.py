"""Rescans against real PostgreSQL and Redis: exactly the stale images, in chunks, resumable, with
back-pressure."""

from __future__ import annotations

import base64
import json
import time
import uuid

import pytest
import redis

from worker import db
from worker.app import DETECT_QUEUE, make_app
from worker.rescan import DetectMessages, ProgressTotal, QueueRoom, RescanError, RescanRequest, run_rescan
from worker.settings import Settings


@pytest.fixture
def stored(engine, verdict_row):
    """25 images judged by 'old' only (stale for 'new'), 5 by both, 3 by 'new' only."""
    with engine.begin() as conn:
        for version in ("old", "new"):
            db.register_model_version(conn, version, {}, 0.5, {}, activate=version == "new")
        rows = [verdict_row(f"stale{i}", "old", score=0.9 if i % 2 else 0.1) for i in range(25)]
        rows += [verdict_row(f"both{i}", v) for i in range(5) for v in ("old", "new")]
        rows += [verdict_row(f"fresh{i}", "new") for i in range(3)]
        db.upsert_verdicts(conn, rows)
    return engine


def queued_sources(redis_url: str) -> list[str]:
    client = redis.Redis.from_url(redis_url)
    messages = [json.loads(m) for m in client.lrange(DETECT_QUEUE, 0, -1)]
    assert all(m["headers"]["task"] == "detect_image" for m in messages)
    return [json.loads(base64.b64decode(m["body"]))[1]["source"] for m in messages]


def test_stale_images_are_enqueued_in_chunks_and_an_interrupted_run_resumes(stored, database_url, redis_url):
    settings = Settings.from_env({}, database_url=database_url, broker_url=redis_url, rescan_chunk=4)
    app = make_app(settings)
    first = run_rescan(settings, RescanRequest(target_model_version="new", limit=10), app=app, engine=stored)
    assert (first.enqueued, first.total, first.status) == (10, 25, "paused")
    second = run_rescan(settings, RescanRequest(target_model_version="new"), app=app, engine=stored)
    assert second.run_id == first.run_id and second.resumed_from > 0
    assert (second.enqueued, second.status) == (25, "done")
    sources = queued_sources(redis_url)
    assert sorted(sources) == sorted(f"https://images.example.com/stale{i}.jpg" for i in range(25))


def test_a_rescan_the_broker_fails_under_keeps_the_cursor_of_its_last_pushed_chunk_and_resumes_from_it(
        stored, database_url, redis_url, monkeypatch):
    import worker.rescan

    settings = Settings.from_env({}, database_url=database_url, broker_url=redis_url, rescan_chunk=4)
    app = make_app(settings)
    pushes, stopped = [], []
    real_push, real_stop = worker.rescan.push_messages, ProgressTotal.stop

    def failing_push(app_, producer, messages):
        if len(pushes) == 2:
            raise ConnectionError("broker gone")
        pushes.append(len(messages))
        real_push(app_, producer, messages)

    def recorded_stop(self):
        stopped.append(True)
        real_stop(self)

    monkeypatch.setattr(worker.rescan, "push_messages", failing_push)
    monkeypatch.setattr(ProgressTotal, "stop", recorded_stop)
    with pytest.raises(ConnectionError):
        run_rescan(settings, RescanRequest(target_model_version="new"), app=app, engine=stored)
    assert stopped == [True]  # the background count is not left running
    run = db.latest_unfinished_rescan_run(stored, "new", RescanRequest().filters())
    assert run is not None and (run.status, run.enqueued) == ("paused", 8)
    assert len(queued_sources(redis_url)) == 8

    monkeypatch.setattr(worker.rescan, "push_messages", real_push)
    resumed = run_rescan(settings, RescanRequest(target_model_version="new"), app=app, engine=stored)
    assert (resumed.run_id, resumed.resumed_from, resumed.enqueued, resumed.status) == (run.id, run.cursor, 25, "done")
    assert sorted(queued_sources(redis_url)) == sorted(f"https://images.example.com/stale{i}.jpg" for i in range(25))


def test_filters_narrow_the_rescan(stored, database_url, redis_url):
    settings = Settings.from_env({}, database_url=database_url, broker_url=redis_url)
    result = run_rescan(settings, RescanRequest(target_model_version="new", label="fake", min_score=0.5),
                        app=make_app(settings), engine=stored)
    assert result.enqueued == 12  # the odd-numbered stale images, scored 0.9
    assert all(int(s.split("stale")[1].split(".")[0]) % 2 for s in queued_sources(redis_url))


def test_rescan_waits_while_the_detect_queue_is_long(stored, database_url, redis_url):
    settings = Settings.from_env({}, database_url=database_url, broker_url=redis_url, rescan_chunk=10,
                                 rescan_max_queue=100)
    lengths = iter([500, 300, 50, 0, 0, 0])
    waited = []
    result = run_rescan(settings, RescanRequest(target_model_version="new"), app=make_app(settings),
                        engine=stored, queue_length_fn=lambda: next(lengths), sleep=waited.append)
    assert result.enqueued == 25 and result.waits == 2 and len(waited) == 2


def test_queue_room_asks_the_broker_only_when_the_rescan_could_have_filled_the_queue():
    lengths, slept, now = iter([40, 70, 90, 300, 10]), [], [0.0]
    asked = []

    def length() -> int:
        asked.append(now[0])
        return next(lengths)

    room = QueueRoom(length, limit=100, sleep=slept.append, clock=lambda: now[0], recheck_s=1.0)
    assert room.has_room() and asked == [0.0]  # 40 waiting
    room.used(50)
    assert room.has_room() and asked == [0.0]  # at most 90: no need to ask
    room.used(50)
    assert room.has_room() and asked == [0.0, 0.0]  # could be 140: asked again, 70
    now[0] = 1.0
    assert room.has_room() and asked == [0.0, 0.0, 1.0]  # a second on: other producers count too (90)
    room.used(20)
    assert not room.has_room() and asked[-1] == 1.0  # could be 110: asked, 300
    room.wait()
    assert slept == [1.0] and room.has_room()  # asked again after the wait: 10


def test_the_progress_total_is_counted_in_the_background_and_its_errors_surface(engine):
    total = ProgressTotal(engine, lambda conn: int(conn.exec_driver_sql("SELECT 41 + 1").scalar_one()))
    assert total.result() == 42 and total.ready()

    def failing(conn):
        raise LookupError("no such run")

    with pytest.raises(LookupError, match="no such run"):
        ProgressTotal(engine, failing).result()


def test_stopping_the_progress_total_cancels_its_query_on_the_server(engine):
    import sqlalchemy.exc

    total = ProgressTotal(engine, lambda conn: int(conn.exec_driver_sql("SELECT 1 FROM pg_sleep(60)").scalar_one()))
    deadline = time.monotonic() + 10
    with engine.connect() as conn:  # wait until the count's query runs on the server
        while not conn.exec_driver_sql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%%pg_sleep(60)' "
                                       "AND state = 'active' AND pid <> pg_backend_pid()").scalar_one():
            assert time.monotonic() < deadline, "the count never started"
            time.sleep(0.05)
            conn.rollback()
    total.stop()
    with pytest.raises(sqlalchemy.exc.OperationalError, match="cancel"):
        total.result()  # well before the 60 s sleep would end: the test run's timeout would say otherwise


def test_bad_rescan_arguments_are_refused():
    with pytest.raises(RescanError, match="unknown rescan argument"):
        RescanRequest.from_kwargs({"stale": True})
    with pytest.raises(RescanError, match="ISO date-time"):
        RescanRequest.from_kwargs({"since": "yesterday"})
    assert RescanRequest.from_kwargs({"since": "2026-01-01T00:00:00"}).since.tzinfo is not None


KWARGS_CASES = [
    {"source": "https://images.example.com/a.jpg"},
    {"source": "file:///srv/ünïcode/☃.png", "external_id": "post-1", "metadata": {"k": [1, 2.5, None], "s": "é\n"}},
    {"source": "https://x.example/" + "long/" * 400, "metadata": {"nested": {"deep": True}}},  # kwargsrepr is cut
]


def _normalised(message: dict) -> dict:
    """A message with its per-message random values (task id, delivery tag) and sender identity replaced, and
    its base64 body decoded (the rescan's JSON may differ from kombu's in escapes and spacing, not in value)."""
    message = json.loads(json.dumps(message))
    tid = message["headers"]["id"]
    assert message["headers"]["root_id"] == message["properties"]["correlation_id"] == tid
    for where, key in (("headers", "id"), ("headers", "root_id"), ("headers", "origin"),
                       ("properties", "correlation_id"), ("properties", "delivery_tag")):
        message[where][key] = "-"
    # The display-only kwargsrepr is JSON in the rescan's messages, Celery's saferepr in send_task's (checked
    # on its own).
    del message["headers"]["kwargsrepr"]
    message["body"] = json.loads(base64.b64decode(message["body"]))
    return message


def test_rescan_messages_are_those_send_task_publishes(monkeypatch, engine, verdict_row, redis_url):
    """The messages rendered from the rescan's template and the database's rows equal, field for field, what
    kombu publishes for app.send_task with the same keyword arguments (captured before it reaches Redis), but
    for the random ids and the display-only kwargsrepr."""
    from kombu.transport import redis as kombu_redis

    from worker.app import DETECT_TASK, detect_kwargs

    published: list[tuple[str, dict]] = []
    monkeypatch.setattr(kombu_redis.Channel, "_put",
                        lambda self, queue, message, **kw: published.append((queue, message)))
    app = make_app(Settings.from_env({}, broker_url=redis_url))
    jobs = [detect_kwargs(**case) for case in KWARGS_CASES]
    for kwargs in jobs:
        app.send_task(DETECT_TASK, kwargs=kwargs, queue=DETECT_QUEUE)
    with engine.begin() as conn:
        for version in ("old", "new"):
            db.register_model_version(conn, version, {}, 0.5, {}, activate=version == "new")
        db.upsert_verdicts(conn, [verdict_row(f"case{i}", "old", source=case["source"],
                                              external_id=case.get("external_id"), metadata=case.get("metadata"))
                                  for i, case in enumerate(KWARGS_CASES)])
    messages = DetectMessages(app)
    rows = messages.render(db.RescanPages(db.RescanFilters(), "new").page(engine, 0, 100))
    assert [queue for queue, _ in published] == [DETECT_QUEUE] * len(jobs) == [DETECT_QUEUE] * len(rows)
    maxsize = app.amqp.kwargsrepr_maxsize
    # upsert_verdicts stores rows in key order: match the rendered messages to the jobs by source.
    by_source = {json.loads(base64.b64decode(json.loads(item)["body"]))[1]["source"]: item for item in rows}
    for (_, expected), kwargs in zip(published, jobs, strict=True):
        ours = json.loads(by_source[kwargs["source"]])
        assert _normalised(ours) == _normalised(expected)
        shown = ours["headers"]["kwargsrepr"]
        assert len(shown) <= maxsize
        assert json.loads(shown) == kwargs if len(shown) < maxsize else shown.endswith("...")
    ids = [json.loads(item)["headers"]["id"] for item in rows]
    tags = [json.loads(item)["properties"]["delivery_tag"] for item in rows]
    assert len(set(ids + tags)) == 2 * len(ids)
    assert all(str(uuid.UUID(i, version=4)) == i for i in ids + tags)


def test_a_kwargsrepr_too_short_to_cut_is_refused():
    app = make_app(Settings.from_env({}))
    app.amqp.kwargsrepr_maxsize = 2  # no room for the "..." that marks a cut
    with pytest.raises(ValueError, match="kwargsrepr_maxsize"):
        DetectMessages(app)


def test_the_broker_fetch_script_delivers_rescan_messages_as_detect_image_jobs(stored, database_url, redis_url):
    """What the rescan pushed, taken by the worker's own fetch script (worker.broker) as a worker takes it:
    recorded as unacknowledged, not a dead letter, a detect_image job whose body decodes to the kwargs."""
    from worker.broker import FETCH_SCRIPT, _payload

    settings = Settings.from_env({}, database_url=database_url, broker_url=redis_url, rescan_chunk=7)
    app = make_app(settings)
    client = redis.Redis.from_url(redis_url)
    # Keys of this test's own (a worker of another test run may consume the shared "detect" list meanwhile).
    prefix = f"rescan-test-{uuid.uuid4().hex}:"
    result = run_rescan(settings, RescanRequest(target_model_version="new"), app=app, engine=stored)
    assert result.enqueued == 25
    items = client.lrange(DETECT_QUEUE, 0, -1)
    client.delete(DETECT_QUEUE)
    if len(items) < 25:
        pytest.skip("another test's worker consumed the shared detect queue")
    client.lpush(prefix + DETECT_QUEUE, *reversed(items))  # same order as in the queue
    keys = [prefix + "unacked", prefix + "unacked_index", prefix + "tags", prefix + DETECT_QUEUE]
    sources = []
    try:
        # ARGV: the time, the most messages to take (one at a time here), the queue name.
        while reply := client.eval(FETCH_SCRIPT, 4, *keys, "0", "1", DETECT_QUEUE):
            payload = _payload(reply[1], reply[2].decode(), DETECT_QUEUE)
            assert payload["content-type"] == "application/json" and payload["headers"]["task"] == "detect_image"
            args, kwargs, embed = json.loads(base64.b64decode(payload["body"]))
            assert args == [] and set(kwargs) <= {"source", "external_id", "metadata"}
            assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
            sources.append(kwargs["source"])
        assert client.hlen(prefix + "unacked") == 25  # each recorded as held, as for any message
    finally:
        client.delete(*keys)
    assert sorted(sources) == sorted(f"https://images.example.com/stale{i}.jpg" for i in range(25))
