"""Quarantine for messages the worker cannot turn into a job: kept whole in a bounded Redis store that operators
list, inspect, replay and delete (``ppl-worker dead-letters``).

A message from a producer no one here wrote can be anything: not JSON, a JSON list, an unknown body
encoding, invalid base64, a protocol-2 body that is not ``[args, kwargs, embed]``, no task id, a content type
other than JSON (pickle, YAML), an unknown task name, an unparseable ``eta`` or ``expires``. Before, each of
these either crashed every worker in turn (the message went back to the head of the queue) or left one log
line. Now each one is stored here, recorded as a ``malformed_message`` failure row (with a submission row, by
task id when it has one), and only then acknowledged off the queue: the jobs behind it run, and nothing is
lost (a worker killed before the acknowledgement gets the message back and quarantines it again; the store
keys letters by content, so that adds no second letter).

Layout: hash ``ppl:dead-letters`` (letter id → JSON) and sorted set ``ppl:dead-letters:index`` (letter id →
time stored), trimmed to the newest ``PPL_DEAD_LETTER_MAX`` letters in the same script that adds one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, cast

import redis

STORE_KEY = "ppl:dead-letters"
INDEX_KEY = "ppl:dead-letters:index"
MAX_DETAIL_CHARS = 1000

# KEYS: hash, index. ARGV: id, JSON, time, capacity. Adds (or refreshes) one letter, drops the oldest past capacity.
ADD_SCRIPT = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if excess > 0 then
  local oldest = redis.call('ZRANGE', KEYS[2], 0, excess - 1)
  for _, id in ipairs(oldest) do redis.call('HDEL', KEYS[1], id) end
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, excess - 1)
end
return excess
"""


@dataclass(frozen=True)
class DeadLetter:
    """A message as it was taken off ``queue``, whole: ``raw`` is its text, or base64 of its bytes where they are
    not UTF-8 (``raw_encoding``). ``task_id``/``task_name`` are whatever could be read from it."""

    id: str
    queue: str
    detail: str
    raw: str
    raw_encoding: str  # "text" | "base64"
    task_id: str | None
    task_name: str | None
    stored_at: float

    @classmethod
    def of(cls, raw: str | bytes, queue: str, detail: str, task_id: str | None = None,
           task_name: str | None = None) -> DeadLetter:
        data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else bytes(raw)
        try:
            text, encoding = data.decode("utf-8"), "text"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(data).decode("ascii"), "base64"
        # Keyed by content and queue: the same message quarantined twice (a redelivery) is one letter.
        letter_id = hashlib.sha256(queue.encode() + b"\n" + data).hexdigest()[:32]
        return cls(letter_id, queue, detail[:MAX_DETAIL_CHARS], text, encoding, _short(task_id), _short(task_name),
                   time.time())

    def raw_bytes(self) -> bytes:
        return base64.b64decode(self.raw) if self.raw_encoding == "base64" else self.raw.encode("utf-8")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> DeadLetter:
        return cls(**json.loads(text))


def _short(value: Any) -> str | None:
    return value[:256] if isinstance(value, str) and value else None


class DeadLetterStore:
    """The bounded store in Redis (the broker's Redis, so a letter lives and dies with the queue it left)."""

    def __init__(self, client: redis.Redis, capacity: int):
        self.client = client
        self.capacity = capacity
        self._add = client.register_script(ADD_SCRIPT)

    @classmethod
    def from_url(cls, broker_url: str, capacity: int) -> DeadLetterStore:
        return cls(redis.Redis.from_url(broker_url, socket_timeout=30, socket_connect_timeout=10), capacity)

    def add(self, letter: DeadLetter) -> None:
        self._add(keys=[STORE_KEY, INDEX_KEY], args=[letter.id, letter.to_json(), letter.stored_at, self.capacity])

    def count(self) -> int:
        return int(self.client.zcard(INDEX_KEY))

    def list(self, limit: int = 50) -> list[DeadLetter]:
        """Newest first."""
        # Without withscores the reply is the members alone; the stubs type every form zrevrange can return.
        ids = cast(list[bytes], self.client.zrevrange(INDEX_KEY, 0, max(0, limit - 1)))
        if not ids:
            return []
        return [DeadLetter.from_json(item) for item in self.client.hmget(STORE_KEY, ids) if item is not None]

    def get(self, letter_id: str) -> DeadLetter | None:
        item = self.client.hget(STORE_KEY, letter_id)
        return None if item is None else DeadLetter.from_json(item)

    def delete(self, letter_id: str) -> bool:
        with self.client.pipeline() as pipe:
            pipe.hdel(STORE_KEY, letter_id)  # one call per statement: the stubs type a pipeline's commands as
            pipe.zrem(INDEX_KEY, letter_id)  # their replies (int), not as the pipeline they return for chaining
            removed, _ = pipe.execute()
        return bool(removed)

    def replay(self, letter_id: str, queue: str | None = None) -> DeadLetter | None:
        """Put the message back on its queue (or ``queue``) as it was received, and remove the letter, in one
        transaction. For a message the producer has since fixed, or a task a newer worker knows."""
        letter = self.get(letter_id)
        if letter is None:
            return None
        with self.client.pipeline() as pipe:  # MULTI/EXEC: both or neither
            pipe.lpush(queue or letter.queue, letter.raw_bytes())
            pipe.hdel(STORE_KEY, letter_id)
            pipe.zrem(INDEX_KEY, letter_id)
            pipe.execute()
        return letter


def summary(letter: DeadLetter) -> Mapping[str, Any]:
    """One line's worth of a letter, for listings."""
    return {"id": letter.id, "stored_at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(letter.stored_at)),
            "queue": letter.queue, "task_id": letter.task_id, "task_name": letter.task_name,
            "detail": letter.detail[:120], "bytes": len(letter.raw_bytes())}
