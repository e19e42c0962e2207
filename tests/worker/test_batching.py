"""``detect_image``'s micro-batching strategy (``worker.tasks.DetectBatches``), driven the way Celery's consumer
drives it (one call per message, a timer, a pool) by fakes of those three: when a batch is handed to the pool,
what its jobs carry, and which messages are acknowledged or handed back. The real consumer, broker and pool run
in test_worker_integration.py, test_poison_messages.py and test_faults.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery.worker import state as worker_state
from kombu.message import Message

from ppl_model.reasons import Reason
from worker.tasks import BATCH_DONE, detect_image


class FakeTimer:
    def __init__(self) -> None:
        self.pending: list[FakeTimer.Entry] = []

    class Entry:
        def __init__(self, secs: float, fun: Any, args: tuple) -> None:
            self.secs, self.fun, self.args, self.cancelled = secs, fun, args, False

        def cancel(self) -> None:
            self.cancelled = True

    def call_after(self, secs: float, fun: Any, args: tuple = ()) -> Entry:
        entry = FakeTimer.Entry(secs, fun, args)
        self.pending.append(entry)
        return entry

    def call_repeatedly(self, secs: float, fun: Any, args: tuple = ()) -> Entry:
        return FakeTimer.Entry(secs, fun, args)  # the delayed-job release: not what these tests drive

    def fire(self) -> None:
        due, self.pending = [e for e in self.pending if not e.cancelled], []
        for entry in due:
            entry.fun(*entry.args)


class FakePool:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple, Any]] = []

    def apply_async(self, target: Any, args: tuple, callback: Any = None) -> None:
        self.calls.append((target, args, callback))


class FakeConsumer:
    connection_errors = (ConnectionError,)

    def __init__(self) -> None:
        self.pool, self.timer = FakePool(), FakeTimer()


class Promise:
    """Celery's ack/reject promises: called with (logger, connection errors[, requeue])."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def __call__(self, *args: Any) -> None:
        self.calls.append(args[2:])


def task_message(task_id: str, *, retries: Any = 0, expires: datetime | None = None) -> Message:
    headers = {"lang": "py", "task": "detect_image", "id": task_id, "retries": retries, "eta": None,
               "expires": expires.isoformat() if expires else None}
    body = json.dumps([[], {"source": f"file:///images/{task_id}.jpg"}, {}])
    return Message(body=body, content_type="application/json", content_encoding="utf-8", headers=headers)


@pytest.fixture
def strategy(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, FakeConsumer]:
    monkeypatch.setattr(detect_image, "flush_every", 3)
    monkeypatch.setattr(detect_image, "flush_interval", 0.25)
    consumer = FakeConsumer()
    return detect_image.Strategy(detect_image, detect_image.app, consumer), consumer


def deliver(on_message: Any, message: Message) -> tuple[Promise, Promise]:
    ack, reject = Promise(), Promise()
    on_message(message, None, ack, reject, set())
    return ack, reject


def test_a_full_buffer_goes_to_the_pool_at_once_and_is_acknowledged_after_its_commit(strategy):
    on_message, consumer = strategy
    promises = [deliver(on_message, task_message(f"t{i}", retries="2" if i == 1 else 0)) for i in range(3)]
    (target, (jobs,), on_return), = consumer.pool.calls
    assert target is detect_image.run
    assert [job.task_id for job in jobs] == ["t0", "t1", "t2"]
    assert [job.retries for job in jobs] == [0, 2, 0]
    assert jobs[0].kwargs == {"source": "file:///images/t0.jpg"} and jobs[0].args == ()
    assert all(job.refused is None for job in jobs)
    assert all(entry.cancelled for entry in consumer.timer.pending)  # the interval flush is off once flushed
    assert all(not ack.calls and not reject.calls for ack, reject in promises)  # nothing before the commit

    on_return(BATCH_DONE)
    assert all(ack.calls == [()] and not reject.calls for ack, reject in promises)


def test_a_batch_that_does_not_commit_hands_every_message_back(strategy):
    on_message, consumer = strategy
    promises = [deliver(on_message, task_message(f"t{i}")) for i in range(3)]
    (_, _, on_return), = consumer.pool.calls
    on_return(None)
    assert all(not ack.calls and reject.calls == [(True,)] for ack, reject in promises)  # requeue=True


def test_a_part_batch_goes_after_the_interval_from_its_first_message(strategy):
    on_message, consumer = strategy
    deliver(on_message, task_message("a"))
    deliver(on_message, task_message("b"))
    assert consumer.pool.calls == []
    (entry,) = consumer.timer.pending  # one timer, started by the first message
    assert entry.secs == 0.25
    consumer.timer.fire()
    (_, (jobs,), _), = consumer.pool.calls
    assert [job.task_id for job in jobs] == ["a", "b"]
    deliver(on_message, task_message("c"))  # the next batch starts its own interval
    assert len(consumer.timer.pending) == 1


def test_revoked_and_expired_jobs_are_batched_as_refusals(strategy, monkeypatch):
    on_message, consumer = strategy
    monkeypatch.setattr(worker_state, "revoked", {"gone"})
    deliver(on_message, task_message("gone"))
    deliver(on_message, task_message("late", expires=datetime.now(UTC) - timedelta(seconds=1)))
    deliver(on_message, task_message("fine", expires=datetime.now(UTC) + timedelta(hours=1)))
    (_, (jobs,), _), = consumer.pool.calls
    assert [job.refused.reason if job.refused else None for job in jobs] == [Reason.REVOKED, Reason.EXPIRED, None]


def test_garbage_in_the_retries_header_counts_as_no_retry(strategy):
    on_message, consumer = strategy
    for value in ("many", None, -4):
        deliver(on_message, task_message(f"t{value}", retries=value))
    (_, (jobs,), _), = consumer.pool.calls
    assert [job.retries for job in jobs] == [0, 0, 0]
