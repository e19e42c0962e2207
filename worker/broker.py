"""kombu's Redis transport, with one gap closed: a message must not vanish when Redis dies mid-delivery.

kombu delivers a message in two steps: ``BRPOP`` takes it off the queue, then a second command records it
as unacknowledged (so that it is redelivered if the worker never acknowledges it). When Redis dies between
the two, the second command fails and kombu drops the message: it is no longer in the queue, not recorded
anywhere, and never reaches the worker. ``tests/worker/test_faults.py`` (Redis killed mid-run) lost one
job in some runs that way.

Here a failed record keeps the message in the worker's memory and delivers it anyway: the worker judges
it once it has reconnected and commits its row (the acknowledgement then fails harmlessly: there is
nothing to remove). What stays open is a double failure: a worker that also dies before it commits such
a message loses it, because Redis never recorded that the worker held it.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import base as virtual

log = logging.getLogger(__name__)


class QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: str) -> None:
        try:
            super().append(message, delivery_tag)
        except self.channel.connection_errors as exc:
            virtual.QoS.append(self, message, delivery_tag)  # in memory only: the worker still gets it
            log.warning("broker unreachable while recording a delivered message (%s); delivering it anyway",
                        type(exc).__name__)


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel


def transport_for(broker_url: str) -> str | None:
    """The transport to configure for ``broker_url``: this module's for Redis URLs, kombu's own otherwise."""
    if urlsplit(broker_url).scheme in ("redis", "rediss"):
        return f"{__name__}:Transport"
    return None
