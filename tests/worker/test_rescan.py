"""Rescans against real PostgreSQL and Redis: exactly the stale images, in chunks, resumable, with
back-pressure."""

from __future__ import annotations

import base64
import json

import pytest
import redis

from worker import db
from worker.app import DETECT_QUEUE, make_app
from worker.rescan import RescanError, RescanRequest, run_rescan
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


def test_bad_rescan_arguments_are_refused():
    with pytest.raises(RescanError, match="unknown rescan argument"):
        RescanRequest.from_kwargs({"stale": True})
    with pytest.raises(RescanError, match="ISO date-time"):
        RescanRequest.from_kwargs({"since": "yesterday"})
    assert RescanRequest.from_kwargs({"since": "2026-01-01T00:00:00"}).since.tzinfo is not None
