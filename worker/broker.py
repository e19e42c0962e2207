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

Messages come from producers no one here wrote, so nothing in one is trusted:

* **Delivery tags are the worker's.** The script records each message under a tag it makes (``ppl-`` and a
  counter in Redis), and ``Message`` gives one to every message that arrives otherwise. A producer that sends
  the same ``delivery_tag`` on every message (celery-ts does) no longer has its unacknowledged records
  overwrite each other, which lost jobs at a restart.
* **A message kombu cannot read becomes a dead letter, not an exception.** Not JSON, not an object, no
  ``properties``, an unknown ``body_encoding``, invalid base64: each used to raise inside the event loop and
  stop the worker with the message back at the head of the queue, for every worker in turn. The script and
  ``Message`` turn it into a well-formed envelope of content type ``DEAD_LETTER_CONTENT_TYPE`` that carries
  the original bytes; Celery refuses that content type, and ``worker.consumer`` quarantines the message
  (``worker.dead_letters``) before acknowledging it.
* **Delayed jobs wait in Redis, not in the worker.** A job whose ``eta`` is in the future is moved, in the
  transaction that acknowledges it, to the sorted set ``DELAYED_KEY`` (``QoS.defer``), and ``DelayedJobs``
  puts it back at the head of its queue once due. Held in the prefetch window instead, such jobs stalled the
  jobs behind them and, past the visibility timeout, were delivered again and ran twice.

Every completed poll of the broker touches ``heartbeat_file`` (a transport option), so a health check can
tell a worker that consumes from one that is alive but stuck (``ppl-worker health``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kombu
import redis
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import base as virtual
from kombu.utils.objects import cached_property

log = logging.getLogger(__name__)

# This module overrides private parts of kombu's Redis transport (the BRPOP start/read pair, the queue cycle,
# the delivery callback). They change between releases, so only the releases the broker tests passed on are
# accepted: after a kombu upgrade, run tests/worker/test_broker.py, test_faults.py and test_poison_messages.py,
# then widen this range (and the pin in pyproject.toml).
TESTED_KOMBU = ((5, 7), (5, 7))  # (lowest, highest) major.minor


def _check_kombu_version(version: str = kombu.__version__) -> None:
    major_minor = tuple(int(part) for part in version.split(".")[:2])
    if not TESTED_KOMBU[0] <= major_minor <= TESTED_KOMBU[1]:
        raise ImportError(f"worker.broker overrides kombu internals and was tested with kombu "
                          f"{'.'.join(map(str, TESTED_KOMBU[0]))}.x to {'.'.join(map(str, TESTED_KOMBU[1]))}.x, "
                          f"not {version}: install the pinned version (pip install -e .) or run the broker tests "
                          f"against this one and widen TESTED_KOMBU")


_check_kombu_version()

DEAD_LETTER_CONTENT_TYPE = "application/x-ppl-dead-letter"  # never in accept_content: Celery refuses it
DEAD_LETTER_ENCODING = "ppl-hex"  # the original bytes, hex-encoded (Lua has no base64)
TAG_COUNTER_KEY = "ppl:delivery-tags"
DELAYED_KEY = "ppl:delayed"  # sorted set: "<queue>\n<message>" scored by when it is due (epoch seconds)
FETCH_MAX = 64  # messages one fetch may take, at most (fewer when the prefetch window has less room)

# KEYS: the unacked hash, the unacked index, the tag counter, then the lists to take from, in order. ARGV: the
# time to index the records under (the caller's clock, as kombu's own records and its sweep use), the most
# messages to take (the consumer's free prefetch slots: one round trip brings a batch's worth, not one
# message), then the queue name of each list. Each record is ``[payload, exchange, routing_key]`` as JSON under
# a tag made here, the payload spliced in as received rather than re-encoded (Lua's cjson would turn an empty
# list into an object). A payload that kombu could not restore (not a JSON object with
# ``properties.delivery_info``, or headers that are not an object) is first wrapped in a dead-letter envelope
# carrying its bytes, so that it too is recorded, restorable and delivered. Returns {list, payload, delivery
# tag, list, payload, tag, ...} (the first list's messages before the next list's), or nil.
FETCH_SCRIPT = """
local function hex(s)
  return (string.gsub(s, '.', function(c) return string.format('%02x', string.byte(c)) end))
end
local taken = {}
local most = tonumber(ARGV[2])
for i = 4, #KEYS do
  while #taken < 3 * most do
    local item = redis.call('RPOP', KEYS[i])
    if not item then break end
    local queue = ARGV[i - 1]
    local tag = 'ppl-' .. redis.call('INCR', KEYS[3])
    local ok, payload = pcall(cjson.decode, item)
    local info = nil
    if ok and type(payload) == 'table' and type(payload.properties) == 'table'
        and type(payload.properties.delivery_info) == 'table'
        and (payload.headers == nil or payload.headers == cjson.null or type(payload.headers) == 'table') then
      info = payload.properties.delivery_info
    end
    local exchange, routing_key = '', queue
    if info then
      if type(info.exchange) == 'string' then exchange = info.exchange end
      if type(info.routing_key) == 'string' then routing_key = info.routing_key end
    else
      item = cjson.encode({body = hex(item), ['content-type'] = '""" + DEAD_LETTER_CONTENT_TYPE + """',
                           ['content-encoding'] = 'binary', headers = {},
                           properties = {delivery_tag = tag, body_encoding = '""" + DEAD_LETTER_ENCODING + """',
                                         delivery_info = {exchange = '', routing_key = queue}}})
    end
    local record = '[' .. item .. ',' .. cjson.encode(exchange) .. ',' .. cjson.encode(routing_key) .. ']'
    redis.call('HSET', KEYS[1], tag, record)
    redis.call('ZADD', KEYS[2], ARGV[1], tag)
    taken[#taken + 1] = KEYS[i]
    taken[#taken + 1] = item
    taken[#taken + 1] = tag
  end
end
if #taken == 0 then return false end
return taken
"""

# KEYS: the delayed set. ARGV: now, the most to move. Each due job goes to the head of its queue (RPUSH: the
# fetch takes from the right) and leaves the set, atomically. Returns how many moved.
RELEASE_SCRIPT = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local cut = string.find(member, '\\n', 1, true)
  if cut then
    redis.call('RPUSH', string.sub(member, 1, cut - 1), string.sub(member, cut + 1))
  end
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""


def envelope_problem(payload: Any) -> str | None:
    """What makes ``payload`` (a decoded broker item) something kombu cannot deliver, or None."""
    if not isinstance(payload, dict):
        return f"the message is a JSON {type(payload).__name__}, not an object"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "the message has no properties object"
    if not isinstance(properties.get("delivery_info"), dict):
        return "the message has no properties.delivery_info object"
    if payload.get("headers") is not None and not isinstance(payload["headers"], dict):
        return "the message's headers are not an object"
    if not isinstance(payload.get("body", ""), str | type(None)):
        return "the message's body is not a string"
    return None


def dead_letter_envelope(raw: bytes, tag: str, queue: str) -> dict[str, Any]:
    """The well-formed envelope a message kombu cannot read travels in (the same the fetch script makes)."""
    return {"body": raw.hex(), "content-type": DEAD_LETTER_CONTENT_TYPE, "content-encoding": "binary",
            "headers": {}, "properties": {"delivery_tag": tag, "body_encoding": DEAD_LETTER_ENCODING,
                                          "delivery_info": {"exchange": "", "routing_key": queue}}}


class Message(virtual.Message):
    """kombu's message, made safe for any payload: a worker-made delivery tag, and a dead letter (``dead_letter``:
    the original bytes and what is wrong) instead of an exception when the envelope or its body cannot be read.

    ``raw`` is the message as taken off ``queue`` (what a dead letter keeps, a deferral parks and a replay
    pushes back)."""

    def __init__(self, payload: Any, channel: Any = None, **kwargs: Any) -> None:
        connection = channel.connection
        problem = envelope_problem(payload)
        self.dead_letter: tuple[bytes, str] | None = None
        if problem is not None:  # kombu's two-step delivery (the script wraps these itself)
            raw = json.dumps(payload, default=str).encode()
            payload = dead_letter_envelope(raw, f"ppl-{uuid.uuid4().hex}", "")
        properties = payload["properties"]
        tag = properties.get("delivery_tag")
        recorded = connection.recorded_tags.get(tag) if isinstance(tag, str) else None
        if recorded is None:
            properties["delivery_tag"] = f"ppl-{uuid.uuid4().hex}"  # never the producer's
        self.queue: str = recorded[0] if recorded else (properties["delivery_info"].get("routing_key") or "")
        self.raw: bytes = recorded[1] if recorded else json.dumps(payload).encode()
        encoding = properties.get("body_encoding")
        if encoding != DEAD_LETTER_ENCODING:
            try:
                super().__init__(payload, channel=channel, **kwargs)  # decodes the body (once)
                return
            except Exception as exc:  # unknown encoding (AttributeError inside kombu), invalid base64, ...
                self.dead_letter = (self.raw, f"the body cannot be decoded with body_encoding {encoding!r}: "
                                              f"{type(exc).__name__}: {exc}"[:500])
        else:
            try:
                self.raw = bytes.fromhex(payload.get("body") or "")
            except ValueError:
                self.raw = str(payload.get("body")).encode()
            self.dead_letter = (self.raw, problem or _raw_problem(self.raw))
        # A dead letter is delivered with no body: Celery refuses its content type unread.
        super().__init__({**payload, "body": None, "content-type": DEAD_LETTER_CONTENT_TYPE,
                          "properties": {**properties, "body_encoding": None}}, channel=channel, **kwargs)


def _raw_problem(raw: bytes) -> str:
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        return f"the message is not JSON: {exc}"[:300]
    return envelope_problem(payload) or "the message is not a kombu message"


ATOMIC_FETCH_MIN_REDIS = (6, 2)  # BLMOVE


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


class QoS(kombu_redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending_acks: list[str] = []
        self._pending_defers: dict[str, tuple[bytes, float]] = {}  # tag → (delayed-set member, due time)
        self._pending_lock = threading.Lock()

    def ack(self, delivery_tag: str) -> None:
        """In a worker's event loop, acknowledgements reach Redis together, in one round trip per loop turn,
        instead of one each: Celery schedules a batch's 32 acknowledgements onto the loop at once (kombu sends
        each as its own ZREM + HDEL). Without an event loop, at once."""
        virtual.QoS.ack(self, delivery_tag)  # the worker's own bookkeeping now (frees its prefetch slot)
        with self._pending_lock:
            self._pending_acks.append(delivery_tag)
            first = len(self._pending_acks) == 1
        loop = self.channel.connection.event_loop
        if loop is None:
            self.flush_acks()
        elif first:  # runs after the callbacks already scheduled for this turn, so it takes all of them
            loop.call_soon(self.flush_acks)

    def defer(self, message: Message, due: float) -> None:
        """Acknowledge ``message`` and, in the same transaction, park it in the delayed set until ``due``
        (epoch seconds), as it was taken off its queue; ``DelayedJobs`` returns it to the queue then."""
        member = message.queue.encode() + b"\n" + message.raw
        with self._pending_lock:
            self._pending_defers[message.delivery_tag] = (member, due)
        message.ack()

    def flush_acks(self) -> None:
        """Remove the pending acknowledged messages from Redis's unacked records (and park the deferred ones)
        in one transaction. If Redis cannot be reached, they stay recorded and come back after the visibility
        timeout, as a failed acknowledgement of kombu's own leaves them (the worker answers them from their
        stored verdicts, and defers a delayed job again)."""
        with self._pending_lock:
            tags, self._pending_acks = self._pending_acks, []
            defers = {tag: self._pending_defers.pop(tag) for tag in tags if tag in self._pending_defers}
        if not tags:
            return
        try:
            with self.pipe_or_acquire() as pipe:
                if defers:
                    pipe.zadd(DELAYED_KEY, {member: due for member, due in defers.values()})
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
    Message = Message
    _fetch_next = True  # the next command sent on the polling connection: the fetch script, else the wait
    _sent: str | None = None  # which of the two is awaiting its reply
    # kombu declares these as False and None at class level, then stores a connection and a monotonic time in
    # them itself; redeclared (as loosely as kombu's own declarations allow) so doing the same here type-checks.
    _in_poll: Any
    _brpop_sent_at: Any

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
        pairs = [(self._q_for_pri(queue, pri), queue) for pri in self.priority_steps for queue in queues]
        keys = [key for key, _ in pairs]
        connection = self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()  # kombu's health check: a reply is due within brpop_timeout
        if self._fetch_next:
            self._sent = "fetch"
            room = self.qos.can_consume_max_estimate() or 1  # None: no prefetch limit
            connection.send_command("EVAL", FETCH_SCRIPT, 3 + len(keys), self.unacked_key,
                                    self.unacked_index_key, TAG_COUNTER_KEY, *keys, repr(time.time()),
                                    str(max(1, min(FETCH_MAX, room))), *(queue for _, queue in pairs))
        else:
            self._sent = "wait"
            wait = self.brpop_timeout if timeout is None else timeout
            connection.send_command("BLMOVE", keys[0], keys[0], "RIGHT", "RIGHT", wait or 0)

    def _brpop_read(self, **options: Any) -> bool:
        if not self.atomic_fetch:
            try:
                delivered: bool = super()._brpop_read(**options)
            except kombu_redis.Empty:
                self.connection.mark_alive()  # heard from the broker: nothing to take
                raise
            self.connection.mark_alive()
            return delivered
        sent, self._sent = self._sent or "wait", None  # nothing sent: the read only finds a closed connection
        try:
            try:
                reply = self.client.parse_response(self.client.connection, sent.upper(), **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next round reconnects
                raise
            self.connection.mark_alive()
            # After a wait, fetch whether it saw a message or timed out (others may be in the other lists);
            # after a fetch, fetch again while there are messages and wait once there are none.
            self._fetch_next = sent == "wait" or bool(reply)
            if sent == "wait" or not reply:
                raise kombu_redis.Empty()
            failure: Exception | None = None
            for start in range(0, len(reply), 3):  # every message taken is delivered, whatever one of them does
                key = kombu_redis.bytes_to_str(reply[start])
                tag = kombu_redis.bytes_to_str(reply[start + 2])
                queue = key.rsplit(self.sep, 1)[0]
                self._queue_cycle.rotate(queue)
                payload = _payload(reply[start + 1], tag, queue)
                self.connection.recorded_tags[tag] = (queue, bytes(reply[start + 1]))
                try:
                    self.connection._deliver(payload, queue)  # calls QoS.append, which takes the tag back
                except Exception as exc:  # recorded as unacknowledged in Redis: redelivered, never lost
                    failure = failure or exc
                finally:
                    self.connection.recorded_tags.pop(tag, None)
            if failure is not None:
                raise failure
            return True
        finally:
            self._in_poll = None
            self._flush_brpop_reauth()


def _payload(item: bytes, tag: str, queue: str) -> dict[str, Any]:
    """The fetched item as the envelope to deliver, under the script's tag. The script already wrapped what it
    could not parse; what Python cannot (bytes that are not UTF-8, a shape cjson accepted but kombu would not)
    is wrapped here the same way."""
    try:
        payload = json.loads(item)
        problem = envelope_problem(payload)
    except ValueError:  # UnicodeDecodeError included
        problem = "unreadable"
    if problem is not None:
        return dead_letter_envelope(bytes(item), tag, queue)
    if payload.get("content-type") == DEAD_LETTER_CONTENT_TYPE:
        payload = _unwrapped(payload)
    payload["properties"]["delivery_tag"] = tag
    return payload


def _unwrapped(wrapped: dict[str, Any]) -> dict[str, Any]:
    """The message inside a dead-letter envelope when Python can read it after all: Lua's cjson refuses some
    JSON that Python (and Celery) accept, e.g. a lone surrogate escape like "\\ud800" in a job's arguments,
    which must reach the task's own checks (an ``invalid_arguments`` failure), not the quarantine."""
    try:
        inner = json.loads(bytes.fromhex(wrapped.get("body") or ""))
    except (ValueError, TypeError):
        return wrapped
    return inner if envelope_problem(inner) is None else wrapped


class Transport(kombu_redis.Transport):
    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.event_loop: Any = None  # the worker's kombu Hub, once the consumer registers with it
        # Delivery tags the fetch script recorded → (queue, message as fetched), until QoS.append sees their
        # message (kept on the transport: the channel that polls is not always the one whose consumer receives).
        self.recorded_tags: dict[str, tuple[str, bytes]] = {}
        options = self.client.transport_options if self.client is not None else None  # kombu's Connection
        heartbeat = (options or {}).get("heartbeat_file")
        self.heartbeat_file = Path(heartbeat) if heartbeat else None
        self._alive_marked = 0.0

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)
        self.event_loop = loop

    def mark_alive(self) -> None:
        """Touch the heartbeat file (at most once a second): this worker has just heard from the broker."""
        now = time.monotonic()
        if self.heartbeat_file is None or now - self._alive_marked < 1.0:
            return
        self._alive_marked = now
        try:
            self.heartbeat_file.touch()
        except OSError as exc:
            log.warning("cannot touch the heartbeat file %s: %s", self.heartbeat_file, exc)


class DelayedJobs:
    """Returns jobs parked by ``QoS.defer`` to their queues once due. Every worker runs it about once a
    second; the move is one script, so workers racing over the same job move it once."""

    def __init__(self, client: redis.Redis, batch: int = 500):
        self.client = client
        self.batch = batch
        self._release = client.register_script(RELEASE_SCRIPT)

    @classmethod
    def from_url(cls, broker_url: str) -> DelayedJobs:
        return cls(redis.Redis.from_url(broker_url, socket_timeout=10, socket_connect_timeout=5))

    def release_due(self, now: float | None = None) -> int:
        moved = total = int(self._release(keys=[DELAYED_KEY], args=[now or time.time(), self.batch]))
        while moved == self.batch:
            moved = int(self._release(keys=[DELAYED_KEY], args=[now or time.time(), self.batch]))
            total += moved
        return total

    def waiting(self) -> int:
        return int(self.client.zcard(DELAYED_KEY))


def heartbeat_age(path: Path) -> float | None:
    """Seconds since the worker last heard from the broker, or None when it never has."""
    try:
        return max(0.0, time.time() - os.stat(path).st_mtime)
    except FileNotFoundError:
        return None


def transport_for(broker_url: str) -> str | None:
    """The transport to configure for ``broker_url``: this module's for Redis URLs, kombu's own otherwise."""
    if urlsplit(broker_url).scheme in ("redis", "rediss"):
        return f"{__name__}:Transport"
    return None
