"""worker.broker: a message Redis handed out must reach the worker even when recording it fails."""

from __future__ import annotations

import pytest
import redis
from kombu import Connection
from kombu.transport import redis as kombu_redis

from worker.app import make_app
from worker.broker import Transport, transport_for
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
