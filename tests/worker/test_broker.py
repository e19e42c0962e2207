"""worker.broker: a message leaves its queue only as a recorded delivery, and reaches the worker even when
recording it fails on the fallback path."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import time
from types import SimpleNamespace

import pytest
import redis
from kombu import Connection, Queue
from kombu.transport import redis as kombu_redis

from worker.app import make_app
from worker.broker import FETCH_SCRIPT, Transport, transport_for
from worker.doctor import delivery_mode
from worker.settings import Settings


def delivered_message(channel):
    raw = channel.prepare_message('{"source": "file:///x.png"}', content_type="application/json")
    raw["properties"]["delivery_info"] = {"exchange": "", "routing_key": "detect"}
    raw["properties"]["delivery_tag"] = "tag-1"
    return channel.Message(raw, channel=channel)


def broken_pipeline(*_, **__):
    raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


@pytest.mark.parametrize("transport, survives", [(Transport, True), (kombu_redis.Transport, False)])
def test_a_message_whose_record_fails_is_still_delivered(redis_url, monkeypatch, transport, survives):
    with Connection(redis_url, transport=transport) as conn:
        channel = conn.channel()
        message = delivered_message(channel)
        monkeypatch.setattr(channel.qos, "pipe_or_acquire", broken_pipeline)  # Redis dies after the BRPOP
        if survives:
            channel.qos.append(message, message.delivery_tag)
            assert channel.qos.get(message.delivery_tag) is message  # held, so the worker gets it
        else:  # kombu's own transport raises, and the message, already off the queue, is gone
            with pytest.raises(redis.ConnectionError):
                channel.qos.append(message, message.delivery_tag)
            assert message.delivery_tag not in channel.qos._delivered


def test_the_app_uses_it_for_redis_only():
    assert transport_for("rediss://cache:6380/0") == "worker.broker:Transport"
    assert transport_for("amqp://guest@rabbit//") is None
    assert make_app(Settings.from_env({}, broker_url="redis://127.0.0.1:6379/0")).conf.broker_transport == (
        "worker.broker:Transport")
    with make_app(Settings.from_env({}, broker_url="redis://127.0.0.1:6379/0")).connection_for_write() as conn:
        assert isinstance(conn.transport, Transport)


def publish(redis_url: str, bodies: list[str], **options) -> None:
    """Publish as a producer service would: kombu's stock transport, default exchange, queue ``detect``."""
    with Connection(redis_url, transport=kombu_redis.Transport) as conn:
        producer = conn.Producer(serializer="json")
        for body in bodies:
            producer.publish(body, routing_key="detect", declare=[Queue("detect")], **options)


def unacked(redis_url: str) -> tuple[int, int]:
    client = redis.Redis.from_url(redis_url)
    return client.hlen("unacked"), client.zcard("unacked_index")


def test_the_fetch_script_takes_and_records_a_message_in_one_step(redis_url):
    publish(redis_url, ["job-0"])
    client = redis.Redis.from_url(redis_url)
    key, raw, tag = client.eval(FETCH_SCRIPT, 5, "unacked", "unacked_index", "tags", "detect", "other",
                                "1700000000.5", "8", "detect", "other")
    assert (key, client.llen("detect")) == (b"detect", 0)
    # The record is kombu's own: [payload as published, exchange, routing key], indexed by the given time, under
    # a tag the script made (never the producer's).
    payload, exchange, routing_key = json.loads(client.hget("unacked", tag))
    assert payload == json.loads(raw) and tag.decode().startswith("ppl-")
    assert payload["properties"]["delivery_tag"] != tag.decode()
    assert (exchange, routing_key) == ("", "detect")
    assert client.zscore("unacked_index", tag) == 1700000000.5
    assert client.eval(FETCH_SCRIPT, 4, "unacked", "unacked_index", "tags", "detect", "0", "8", "detect") is None

    # The worker that fetched it dies: kombu's sweep puts the message back on its queue, marked redelivered.
    with Connection(redis_url, transport=Transport, transport_options={"visibility_timeout": 1}) as conn:
        conn.default_channel.qos.restore_visible(num=10, interval=1)
    (back,) = [json.loads(item) for item in client.lrange("detect", 0, -1)]
    assert back["body"] == payload["body"] and back["headers"]["redelivered"] is True
    assert unacked(redis_url) == (0, 0)


def test_one_fetch_takes_up_to_the_free_prefetch_slots_in_queue_order(redis_url):
    publish(redis_url, [f"job-{i}" for i in range(5)])
    client = redis.Redis.from_url(redis_url)
    client.lpush("other", json.dumps({"body": "", "headers": {}, "properties": {"delivery_info": {}}}))
    fetch = ("unacked", "unacked_index", "tags", "detect", "other")
    reply = client.eval(FETCH_SCRIPT, 5, *fetch, "1700000000.5", "3", "detect", "other")
    keys, tags = reply[0::3], [t.decode() for t in reply[2::3]]
    bodies = [json.loads(base64.b64decode(json.loads(raw)["body"])) for raw in reply[1::3]]
    assert keys == [b"detect"] * 3 and bodies == ["job-0", "job-1", "job-2"]  # FIFO, and no more than asked
    assert len(set(tags)) == 3 and client.hlen("unacked") == client.zcard("unacked_index") == 3
    reply = client.eval(FETCH_SCRIPT, 5, *fetch, "1700000000.5", "10", "detect", "other")
    assert reply[0::3] == [b"detect", b"detect", b"other"]  # the first list emptied before the next one
    assert client.hlen("unacked") == 6 and client.llen("detect") == client.llen("other") == 0


def consume(redis_url: str, count: int, *, acknowledge: str | None, timeout: float = 10.0) -> tuple[list, tuple]:
    """Receive ``count`` messages from ``detect`` over worker.broker's transport; then acknowledge them one by
    one (``"each"``), together at the event loop's next turn (``"together"``), or not at all (killed)."""
    received = []
    with (Connection(redis_url, transport=Transport) as conn,
          conn.Consumer(Queue("detect"), callbacks=[lambda body, message: received.append((body, message))],
                        accept=["json"])):
        deadline = time.monotonic() + timeout
        while len(received) < count and time.monotonic() < deadline:
            with contextlib.suppress(socket.timeout):
                conn.drain_events(timeout=0.5)
        held = unacked(redis_url)
        qos = conn.default_channel.qos
        if acknowledge == "each":
            for _, message in received:
                message.ack()
        elif acknowledge == "together":  # as in a worker: kombu's event loop runs the acknowledgements
            scheduled = []
            conn.transport.event_loop = SimpleNamespace(call_soon=lambda callback, *args: scheduled.append(callback))
            for _, message in received:
                message.ack()
            assert unacked(redis_url) == held and len(scheduled) == 1  # one flush, not yet run
            scheduled[0]()
            conn.transport.event_loop = None
        else:
            qos.restore_at_shutdown = False  # killed: no hand-back at shutdown
    return [body for body, _ in received], held


def test_the_worker_receives_in_order_with_each_message_recorded_until_acknowledged(redis_url):
    bodies = [f"job-{i}" for i in range(5)]
    publish(redis_url, bodies[:2])
    publish(redis_url, ["urgent"], priority=9)  # kombu puts it on the queue's priority list, not found by BLMOVE
    got, held = consume(redis_url, 3, acknowledge="each")
    assert sorted(got) == sorted([*bodies[:2], "urgent"]) and got.index("job-0") < got.index("job-1")
    assert held == (3, 3)
    assert unacked(redis_url) == (0, 0)

    # Published while the consumer waits on the empty queue: the wait leaves them in place, in order.
    import threading

    timer = threading.Timer(1.5, publish, (redis_url, bodies[2:]))
    timer.start()
    got, _ = consume(redis_url, 3, acknowledge="together")
    timer.join()
    assert got == bodies[2:]
    assert unacked(redis_url) == (0, 0) and redis.Redis.from_url(redis_url).llen("detect") == 0


def test_messages_a_killed_worker_held_stay_recorded_for_redelivery(redis_url):
    publish(redis_url, ["a", "b", "c"])
    got, held = consume(redis_url, 2, acknowledge=None)
    client = redis.Redis.from_url(redis_url)
    # Every message is in the queue or recorded as held: none only in the dead worker's memory.
    assert len(got) >= 2 and held[0] >= len(got) and held[0] + client.llen("detect") == 3


def test_old_redis_falls_back_to_kombus_two_step_delivery(redis_url, monkeypatch):
    publish(redis_url, ["a"])
    monkeypatch.setattr(redis.Redis, "info", lambda self, *a, **k: {"redis_version": "6.0.16"})
    with Connection(redis_url, transport=Transport) as conn:
        assert conn.default_channel.atomic_fetch is False
    got, held = consume(redis_url, 1, acknowledge="each")
    assert got == ["a"] and held == (1, 1) and unacked(redis_url) == (0, 0)
    with Connection(redis_url, transport=Transport) as conn:  # and doctor says so
        assert "two-step delivery" in delivery_mode(conn.default_channel)


@pytest.mark.parametrize("redis_version", [None, "6.0.16"])  # the atomic fetch, and kombu's two steps
def test_every_poll_that_hears_from_the_broker_touches_the_heartbeat(redis_url, monkeypatch, tmp_path, redis_version):
    if redis_version:
        monkeypatch.setattr(redis.Redis, "info", lambda self, *a, **k: {"redis_version": redis_version})
    heartbeat = tmp_path / "heartbeat"
    with (Connection(redis_url, transport=Transport, transport_options={"heartbeat_file": str(heartbeat)}) as conn,
          conn.Consumer(Queue("detect"), callbacks=[lambda body, message: message.ack()], accept=["json"])):
        deadline = time.monotonic() + 10
        while not heartbeat.exists() and time.monotonic() < deadline:  # an empty queue: polls that take nothing
            with contextlib.suppress(socket.timeout):
                conn.drain_events(timeout=0.5)
    assert heartbeat.exists(), "an idle worker that hears from the broker must keep its heartbeat fresh"
