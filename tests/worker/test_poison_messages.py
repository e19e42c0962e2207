"""Messages from producers no one here wrote, built byte for byte as the protocols document them (Celery
message protocols 1 and 2 in kombu's Redis envelope) and pushed with plain redis-py: a real worker keeps
consuming, each unrunnable message is a dead letter with a failure row, the jobs behind it are answered, and
nothing is lost."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
import redis
from PIL import Image
from sqlalchemy import text

from benchmarks.harness import worker_environment
from tests.worker.processes import WorkerProcess, wait_until
from worker import db
from worker.broker import DELAYED_KEY

QUEUE = "detect"


def task_headers(task_id: str | None, *, task: str = "detect_image", eta: str | None = None,
                 expires: str | None = None) -> dict:
    """Protocol-2 headers as celery-node and celery-ts send them."""
    headers = {"lang": "js", "task": task, "id": task_id, "root_id": task_id, "parent_id": None, "group": None,
               "eta": eta, "expires": expires, "retries": 0, "timelimit": [None, None], "origin": "test"}
    if task_id is None:
        del headers["id"]
    return headers


def envelope(body: bytes | str, headers: dict | None, *, content_type: str = "application/json",
             body_encoding: str | None = "base64", delivery_tag: str | None = None) -> bytes:
    """kombu's Redis envelope: body (base64 by default), content type and encoding, headers, properties."""
    data = body.encode() if isinstance(body, str) else body
    encoded = base64.b64encode(data).decode() if body_encoding == "base64" else data.decode("latin-1")
    return json.dumps({
        "body": encoded, "content-encoding": "utf-8", "content-type": content_type, "headers": headers or {},
        "properties": {"correlation_id": (headers or {}).get("id"), "reply_to": "", "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": QUEUE}, "priority": 0,
                       "body_encoding": body_encoding, "delivery_tag": delivery_tag or str(uuid.uuid4())},
    }).encode()


def protocol2(kwargs: dict, task_id: str | None = None, **header_options) -> bytes:
    task_id = task_id or str(uuid.uuid4())
    return envelope(json.dumps([[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]),
                    task_headers(task_id, **header_options))


def protocol1(kwargs: dict, task_id: str) -> bytes:
    """celery-node on protocol 1: everything in the body, no task headers."""
    body = {"task": "detect_image", "id": task_id, "args": [], "kwargs": kwargs, "retries": 0, "eta": None,
            "expires": None, "utc": True}
    return envelope(json.dumps(body), {})


@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "uploads"
    root.mkdir()
    rng = np.random.default_rng(11)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    return root


@pytest.fixture
def worker_env(database_url, redis_url, tiny_model_dir, image_root, tmp_path):
    return worker_environment(database_url, redis_url, tiny_model_dir, image_root,
                           PPL_HEARTBEAT_FILE=str(tmp_path / "heartbeat"))


@pytest.fixture
def worker(worker_env, tmp_path):
    process = WorkerProcess(worker_env, tmp_path / "worker.log").start()
    yield process
    process.stop()


def uri(image_root, i: int) -> str:
    return (image_root / f"img{i}.png").as_uri()


def rows(engine, sql: str, **params):
    with engine.connect() as conn:
        return conn.execute(text(sql), params).all()


def scalar(engine, sql: str, **params):
    with engine.connect() as conn:
        return conn.execute(text(sql), params).scalar()


def cli(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_poison_messages_are_quarantined_and_the_jobs_behind_them_answered(worker, worker_env, image_root,
                                                                          database_url):
    client = redis.Redis.from_url(worker_env["PPL_BROKER_URL"])
    engine = db.make_engine(database_url)
    kwargs_body_id = str(uuid.uuid4())
    poison = {
        # protocol 2, but the body is the kwargs object itself (crash-looped every worker before)
        "kwargs as body": envelope(json.dumps({"source": uri(image_root, 30), "external_id": "bad-body"}),
                                   task_headers(kwargs_body_id)),
        "list item not JSON": b"this is not json {",
        "JSON list as item": b'[1, 2, 3]',
        "unknown body_encoding": envelope(b"whatever", task_headers(str(uuid.uuid4())), body_encoding="rot13"),
        "invalid base64": envelope(b"", task_headers(str(uuid.uuid4())), body_encoding="base64").replace(
            b'"body": ""', b'"body": "%%%not base64%%%"'),
        "no headers.id": envelope(json.dumps([[], {"source": uri(image_root, 31)}, None]), task_headers(None)),
        "pickle": envelope(b"\x80\x04K\x01.", task_headers(str(uuid.uuid4())),
                           content_type="application/x-python-serialize"),
        "yaml": envelope(b"- []\n- {source: x}\n- {}\n", task_headers(str(uuid.uuid4())),
                         content_type="application/x-yaml"),
        "text": envelope(b"hello", task_headers(str(uuid.uuid4())), content_type="text/plain"),
        "unknown task": protocol2({"source": uri(image_root, 32)}, task="no_such_task"),
        "bad eta": protocol2({"source": uri(image_root, 33)}, eta="tomorrow"),
        "bad expires": protocol2({"source": uri(image_root, 34)}, expires="soon"),
        "not UTF-8": b'{"body": "\xff\xfe", "properties": 1}',
    }
    good_ids = [str(uuid.uuid4()) for _ in range(6)]
    # Poison first, at the head of the queue (the right end: the worker takes from there), good jobs behind.
    for message in poison.values():
        client.rpush(QUEUE, message)
    for i, task_id in enumerate(good_ids[:5]):
        client.lpush(QUEUE, protocol2({"source": uri(image_root, i), "external_id": f"good-{i}"}, task_id))
    client.lpush(QUEUE, protocol1({"source": uri(image_root, 5), "external_id": "good-5"}, good_ids[5]))

    wait_until(lambda: scalar(engine, "select count(*) from submissions") == len(poison) + len(good_ids),
               timeout=90, what="a submission row for every message")
    assert worker.alive, worker.log()[-3000:]
    assert scalar(engine, "select count(*) from verdicts") == len(good_ids)
    failures = dict(rows(engine, "select reason, sum(attempts) from detection_failures group by reason"))
    assert failures == {"malformed_message": len(poison)}
    answered = dict(rows(engine, "select task_id, outcome from submissions where task_id = any(:ids)", ids=good_ids))
    assert answered == dict.fromkeys(good_ids, "verdict")
    # The kwargs-as-body message is found by its task id, with what could be read of it.
    (source, external_id, reason, detail), = rows(engine, """
        select f.source, s.external_id, f.reason, f.detail from submissions s
        join detection_failures f on f.id = s.failure_id where s.task_id = :id""", id=kwargs_body_id)
    assert (source, external_id, reason) == (uri(image_root, 30), "bad-body", "malformed_message")
    assert "[args, kwargs, embed]" in detail

    # Every message is kept whole in the dead-letter store; nothing is left in the queue or unacknowledged.
    listed = cli(worker_env, "dead-letters", "list", "--format", "json", "--limit", "100")
    assert listed.returncode == 0, listed.stderr
    letters = json.loads(listed.stdout)
    assert len(letters) == len(poison)
    shown = json.loads(cli(worker_env, "dead-letters", "show", *(letter["id"] for letter in letters)).stdout
                       .replace("}\n{", "},{").join("[]"))
    raw = {base64.b64decode(s["raw"]) if s["raw_encoding"] == "base64" else s["raw"].encode() for s in shown}
    assert raw == set(poison.values())
    assert client.llen(QUEUE) == 0
    wait_until(lambda: client.hlen("unacked") == 0, timeout=10, what="every message acknowledged")

    # No traceback-driven restart happened: one start, still consuming, heartbeat fresh.
    assert "Unrecoverable error" not in worker.log()
    health = cli(worker_env, "health", "--max-age", "10")
    assert health.returncode == 0, health.stderr

    # A replayed letter comes back as a message, and is quarantined again.
    (letter,) = [s for s in shown if s["task_id"] == kwargs_body_id]
    assert cli(worker_env, "dead-letters", "replay", letter["id"]).returncode == 0
    wait_until(lambda: scalar(engine, "select attempts from detection_failures where source = :s",
                              s=uri(image_root, 30)) == 2, timeout=30, what="the replayed letter quarantined again")
    assert cli(worker_env, "dead-letters", "delete", letter["id"]).returncode == 0
    assert cli(worker_env, "dead-letters", "delete", letter["id"]).returncode == 1  # gone


def test_reused_delivery_tags_lose_nothing_across_a_graceful_restart(worker, worker_env, image_root, database_url):
    """celery-ts sends delivery_tag "celery" on every message; the worker's own tags keep them apart."""
    client = redis.Redis.from_url(worker_env["PPL_BROKER_URL"])
    engine = db.make_engine(database_url)
    ids = [str(uuid.uuid4()) for _ in range(24)]
    for i, task_id in enumerate(ids):
        message = json.loads(protocol2({"source": uri(image_root, i)}, task_id))
        message["properties"]["delivery_tag"] = "celery"
        client.lpush(QUEUE, json.dumps(message))
    wait_until(lambda: scalar(engine, "select count(*) from submissions") >= 4, timeout=60, what="some answers")
    assert worker.terminate() == 0  # warm shutdown mid-stream: what it held goes back to the queue
    worker.start()
    wait_until(lambda: scalar(engine, "select count(*) from submissions") == len(ids), timeout=90,
               what="every job answered after the restart")
    assert {r[0] for r in rows(engine, "select task_id from submissions")} == set(ids)


def test_expired_and_revoked_jobs_are_recorded_not_judged(worker, worker_env, image_root, database_url):
    from celery import Celery

    client = redis.Redis.from_url(worker_env["PPL_BROKER_URL"])
    engine = db.make_engine(database_url)
    revoked_id, expired_id, fresh_id = (str(uuid.uuid4()) for _ in range(3))
    control = Celery(broker=worker_env["PPL_BROKER_URL"])
    wait_until(lambda: control.control.ping(timeout=1), timeout=60, what="the worker answering control messages")
    # Broadcast: every running worker hears it; the reply says this one did before the job is sent.
    replies = control.control.revoke(revoked_id, reply=True, timeout=10)
    assert replies and all(revoked_id in str(reply) for reply in replies), replies
    past = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    client.lpush(QUEUE, protocol2({"source": uri(image_root, 0)}, revoked_id))
    client.lpush(QUEUE, protocol2({"source": uri(image_root, 1)}, expired_id, expires=past))
    client.lpush(QUEUE, protocol2({"source": uri(image_root, 2)}, fresh_id, expires=future))
    wait_until(lambda: scalar(engine, "select count(*) from submissions") == 3, timeout=60, what="three answers")
    outcomes = {task_id: (outcome, reason) for task_id, outcome, reason in rows(engine, """
        select s.task_id, s.outcome, f.reason from submissions s left join detection_failures f on f.id = s.failure_id
        """)}
    assert outcomes == {revoked_id: ("failure", "revoked"), expired_id: ("failure", "expired"),
                        fresh_id: ("verdict", None)}
    assert scalar(engine, "select count(*) from verdicts") == 1


def test_delayed_jobs_wait_in_redis_without_stalling_ready_ones_and_run_once(worker, worker_env, image_root,
                                                                            database_url):
    client = redis.Redis.from_url(worker_env["PPL_BROKER_URL"])
    engine = db.make_engine(database_url)
    # Past the visibility timeout (30 s here): held in the prefetch window, such a job was delivered twice.
    due = datetime.now(UTC) + timedelta(seconds=40)
    delayed_ids = [str(uuid.uuid4()) for _ in range(30)]
    ready_ids = [str(uuid.uuid4()) for _ in range(5)]
    for i, task_id in enumerate(delayed_ids):
        client.rpush(QUEUE, protocol2({"source": uri(image_root, i)}, task_id, eta=due.isoformat()))
    for i, task_id in enumerate(ready_ids):  # behind all the delayed ones
        client.lpush(QUEUE, protocol2({"source": uri(image_root, 30 + i)}, task_id))
    wait_until(lambda: scalar(engine, "select count(*) from submissions") == len(ready_ids), timeout=30,
               what="the ready jobs answered while the delayed ones wait")
    assert client.zcard(DELAYED_KEY) == len(delayed_ids)  # parked, not held in the worker
    wait_until(lambda: client.hlen("unacked") == 0, timeout=10, what="the ready jobs acknowledged after their commit")

    wait_until(lambda: scalar(engine, "select count(*) from submissions") == len(delayed_ids) + len(ready_ids),
               timeout=90, what="the delayed jobs answered once due")
    assert datetime.now(UTC) >= due
    answered_at = dict(rows(engine, "select task_id, answered_at from submissions where task_id = any(:ids)",
                            ids=delayed_ids))
    assert min(answered_at.values()) >= due - timedelta(seconds=1)
    # Each delayed job went through exactly one batch.
    runs = {task_id: 0 for task_id in delayed_ids + ready_ids}
    for line in worker.log().splitlines():
        if '"batch done"' in line:
            for task_id in re.findall(r'[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}',
                                      json.dumps(json.loads(line).get("task_ids"))):
                runs[task_id] = runs.get(task_id, 0) + 1
    assert set(runs.values()) == {1}, runs
    assert client.zcard(DELAYED_KEY) == 0


def test_repeated_content_gets_a_submission_per_job_and_one_verdict(worker, worker_env, image_root, database_url):
    client = redis.Redis.from_url(worker_env["PPL_BROKER_URL"])
    engine = db.make_engine(database_url)
    (image_root / "copy.png").write_bytes((image_root / "img0.png").read_bytes())
    client.lpush(QUEUE, protocol2({"source": uri(image_root, 0), "external_id": "post-123", "metadata": {"a": 1}}))
    wait_until(lambda: scalar(engine, "select count(*) from submissions") == 1, timeout=60, what="the first job")
    client.lpush(QUEUE, protocol2({"source": (image_root / "copy.png").as_uri(), "external_id": "post-456"}))
    wait_until(lambda: scalar(engine, "select count(*) from submissions") == 2, timeout=60, what="the repeat")
    assert scalar(engine, "select count(*) from verdicts") == 1
    for external_id, source in (("post-123", uri(image_root, 0)), ("post-456", (image_root / "copy.png").as_uri())):
        found = cli(worker_env, "verdicts", "--external-id", external_id, "--format", "json")
        assert found.returncode == 0, found.stderr
        (row,) = json.loads(found.stdout)
        assert (row["external_id"], row["source"], row["outcome"]) == (external_id, source, "verdict")
        assert row["label"] in ("real", "fake") and 0 <= row["score"] <= 1
