"""kombu's Redis transport, with its two delivery gaps closed: no message may vanish between the queue and
the worker, whichever of the two dies.

kombu delivers a message in two steps: ``BRPOP`` takes it off the queue, then a second command records it
as unacknowledged, so that it is redelivered if the worker never acknowledges it. Between the two the
message exists only in the worker's memory:

* a worker killed there (``kill -9``, the OOM killer, a lost node) loses it: it is no longer in the queue
  and Redis has no record that anyone held it (``tests/worker/test_faults.py`` lost jobs that way);
* when Redis dies there, the second command fails and kombu drops the message.

Here one Lua script takes the message off the queue *and* records it as unacknowledged, atomically (a
script runs whole or not at all, and reaches the append-only file as one transaction). The record has
kombu's own format (``unacked`` hash and ``unacked_index`` sorted set), so kombu's acknowledgement, its
sweep that redelivers a dead worker's messages after the visibility timeout, and its hand-back at shutdown
work unchanged. A script cannot block, so when the queues are empty the worker waits with ``BLMOVE q q
RIGHT RIGHT``, which blocks until the first queue has a message and leaves it where it is (a rotation onto
itself), then fetches with the script again. Messages in the channel's other lists (further queues, kombu's
priority lists) are fetched by the same script, found at the latest after ``brpop_timeout`` (1 s).

Where the script cannot be used, kombu's two-step delivery remains (Redis older than 6.2 has no BLMOVE; a
``global_keyprefix`` would need the keys rewritten) and a failed record keeps the message in the worker's
memory instead of dropping it, so a Redis crash alone loses nothing there either.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import base as virtual
from kombu.utils.json import loads
from kombu.utils.objects import cached_property

log = logging.getLogger(__name__)

# KEYS: the unacked hash, the unacked index, then the lists to take from, in order. ARGV: the time to index
# the record under (the caller's clock, as kombu's own records and its sweep use). The record is
# ``[payload, exchange, routing_key]`` as JSON, the payload spliced in as received rather than re-encoded
# (Lua's cjson would turn an empty list into an object). A payload that is not a kombu message is returned
# unrecorded, to fail in kombu as it would have anyway. Returns {list, payload[, delivery tag]} or nil.
FETCH_SCRIPT = """
for i = 3, #KEYS do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, payload = pcall(cjson.decode, item)
    if ok and type(payload) == 'table' and type(payload.properties) == 'table' then
      local tag = payload.properties.delivery_tag
      local info = payload.properties.delivery_info
      if type(tag) == 'string' and type(info) == 'table' then
        redis.call('HSET', KEYS[1], tag,
                   '[' .. item .. ',' .. cjson.encode(info.exchange) .. ',' .. cjson.encode(info.routing_key) .. ']')
        redis.call('ZADD', KEYS[2], ARGV[1], tag)
        return {KEYS[i], item, tag}
      end
    end
    return {KEYS[i], item}
  end
end
return false
"""

ATOMIC_FETCH_MIN_REDIS = (6, 2)  # BLMOVE


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


class QoS(kombu_redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending_acks: list[str] = []
        self._pending_lock = threading.Lock()

    def ack(self, delivery_tag: str) -> None:
        """In a worker's event loop, acknowledgements reach Redis together, in one round trip per loop turn,
        instead of one each: Celery schedules a batch's 32 acknowledgements onto the loop at once (kombu sends
        each as its own ZREM + HDEL). Without an event loop, kombu's own, at once."""
        loop = self.channel.connection.event_loop
        if loop is None:
            return super().ack(delivery_tag)
        virtual.QoS.ack(self, delivery_tag)  # the worker's own bookkeeping now (frees its prefetch slot)
        with self._pending_lock:
            self._pending_acks.append(delivery_tag)
            first = len(self._pending_acks) == 1
        if first:  # runs after the callbacks already scheduled for this turn, so it takes all of them
            loop.call_soon(self.flush_acks)

    def flush_acks(self) -> None:
        """Remove the pending acknowledged messages from Redis's unacked records. If Redis cannot be reached,
        they stay recorded and come back after the visibility timeout, as a failed acknowledgement of
        kombu's own leaves them (the worker answers them from their stored verdicts)."""
        with self._pending_lock:
            tags, self._pending_acks = self._pending_acks, []
        if not tags:
            return
        try:
            with self.pipe_or_acquire() as pipe:
                pipe.zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags).execute()
        except self.channel.connection_errors as exc:
            log.warning("broker unreachable while acknowledging %d messages (%s); they will be redelivered "
                        "after the visibility timeout and answered from their stored verdicts", len(tags),
                        type(exc).__name__)

    def restore_unacked(self, client: Any = None) -> None:
        self.flush_acks()  # at shutdown: what was acknowledged must not be handed back
        super().restore_unacked(client)

    def append(self, message: Any, delivery_tag: str) -> None:
        if self.channel.connection.recorded_tags.pop(delivery_tag, None):
            virtual.QoS.append(self, message, delivery_tag)  # the fetch script has recorded it in Redis
            return
        try:
            super().append(message, delivery_tag)
        except self.channel.connection_errors as exc:
            virtual.QoS.append(self, message, delivery_tag)  # in memory only: the worker still gets it
            log.warning("broker unreachable while recording a delivered message (%s); delivering it anyway",
                        type(exc).__name__)


class Channel(kombu_redis.Channel):
    QoS = QoS
    _fetch_next = True  # the next command sent on the polling connection: the fetch script, else the wait
    _sent: str | None = None  # which of the two is awaiting its reply

    @cached_property
    def atomic_fetch(self) -> bool:
        """Whether this channel takes messages with the fetch script (asked once, on first consumption)."""
        if self.global_keyprefix:
            log.warning("PPL broker: global_keyprefix is set; using kombu's two-step delivery, which a worker "
                        "killed mid-delivery can lose a message to (docs/OPERATIONS.md)")
            return False
        version = str(self.client.info("server").get("redis_version", "0"))
        if _version(version) < ATOMIC_FETCH_MIN_REDIS:
            log.warning("PPL broker: Redis %s has no BLMOVE (6.2+); using kombu's two-step delivery, which a "
                        "worker killed mid-delivery can lose a message to (docs/OPERATIONS.md)", version)
            return False
        return True

    def _brpop_start(self, timeout: float | None = None) -> None:
        if not self.atomic_fetch:
            return super()._brpop_start(timeout)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        connection = self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()  # kombu's health check: a reply is due within brpop_timeout
        if self._fetch_next:
            self._sent = "fetch"
            connection.send_command("EVAL", FETCH_SCRIPT, 2 + len(keys), self.unacked_key,
                                    self.unacked_index_key, *keys, repr(time.time()))
        else:
            self._sent = "wait"
            wait = self.brpop_timeout if timeout is None else timeout
            connection.send_command("BLMOVE", keys[0], keys[0], "RIGHT", "RIGHT", wait or 0)

    def _brpop_read(self, **options: Any) -> bool:
        if not self.atomic_fetch:
            return super()._brpop_read(**options)
        sent, self._sent = self._sent or "wait", None  # nothing sent: the read only finds a closed connection
        try:
            try:
                reply = self.client.parse_response(self.client.connection, sent.upper(), **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next round reconnects
                raise
            # After a wait, fetch whether it saw a message or timed out (others may be in the other lists);
            # after a fetch, fetch again while there are messages and wait once there are none.
            self._fetch_next = sent == "wait" or bool(reply)
            if sent == "wait" or not reply:
                raise kombu_redis.Empty()
            key, item = (kombu_redis.bytes_to_str(part) for part in reply[:2])
            tag = kombu_redis.bytes_to_str(reply[2]) if len(reply) > 2 else None
            queue = key.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            if tag is not None:
                self.connection.recorded_tags[tag] = True
            try:
                self.connection._deliver(loads(item), queue)  # calls QoS.append, which takes the tag back
            finally:
                if tag is not None:
                    self.connection.recorded_tags.pop(tag, None)
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()


class Transport(kombu_redis.Transport):
    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.event_loop: Any = None  # the worker's kombu Hub, once the consumer registers with it
        # Delivery tags the fetch script recorded, until QoS.append sees their message (kept on the transport:
        # the channel that polls is not always the one whose consumer receives).
        self.recorded_tags: dict[str, bool] = {}


    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)
        self.event_loop = loop


def transport_for(broker_url: str) -> str | None:
    """The transport to configure for ``broker_url``: this module's for Redis URLs, kombu's own otherwise."""
    if urlsplit(broker_url).scheme in ("redis", "rediss"):
        return f"{__name__}:Transport"
    return None
