"""The least CPU a consumer of the ``detect`` queue outside Celery would spend on each message.

``ppl-worker bench --parts emulated`` splits the worker's CPU per image into Celery's consumer thread (fetch,
parse, batch, acknowledge) and the rest. Whether a consumer of our own would be worth writing depends on what
such a consumer could not avoid: this measures that floor on real ``detect_image`` messages (made by
``send_task``, as ``ppl-worker submit`` sends them), in one thread, with nothing but the steps every consumer
needs and the broker guarantees the worker keeps:

* take up to ``FETCH_MAX`` messages per round trip with the worker's own fetch script (``worker.broker``:
  each message recorded as unacknowledged in the same script, so a consumer killed mid-batch loses nothing);
* decode each envelope, its base64 body and the body's JSON, and check the task's shape (protocol 2: task
  name and id in the headers, ``[args, kwargs, embed]`` body);
* acknowledge each batch of ``batch`` messages once, as the worker does after its commit (one transaction
  removing the records).

No database, no pool, no decode: the CPU of this thread (``time.thread_time``) per message is the figure,
next to the consumer thread's ``consumer_cpu_ms_per_image`` of the emulated part. Redis's own CPU is not
counted, in either.

``python -m benchmarks.consumer_floor`` from the repository root. Figures in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kombu.transport.redis import Channel as RedisChannel

from benchmarks.harness import DEFAULT_BROKER_URL, HarnessError, bench_redis, load_average, redacted, send_jobs
from worker.app import DETECT_QUEUE
from worker.broker import FETCH_MAX, FETCH_SCRIPT, TAG_COUNTER_KEY

UNACKED, UNACKED_INDEX = RedisChannel.unacked_key, RedisChannel.unacked_index_key  # kombu's, as the worker's


class ConsumerFloorError(HarnessError):
    """Messages lost or malformed on the way: the figure would not mean what it says."""


def consume(client: Any, queue: str, total: int, batch: int) -> tuple[float, int]:
    """Take ``total`` messages off ``queue`` as a minimal consumer would: (CPU seconds of this thread, messages
    acknowledged)."""
    fetch = client.register_script(FETCH_SCRIPT)
    keys = [UNACKED, UNACKED_INDEX, TAG_COUNTER_KEY, queue]
    pending: list[bytes] = []
    acknowledged = 0
    started = time.thread_time()
    while acknowledged + len(pending) < total:
        reply = fetch(keys=keys, args=[repr(time.time()), FETCH_MAX, queue])
        if not reply:
            raise ConsumerFloorError(f"the queue ran dry after {acknowledged + len(pending)} of {total} messages")
        for at in range(0, len(reply), 3):
            envelope = json.loads(reply[at + 1])
            headers = envelope["headers"]
            args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
            if not (isinstance(headers.get("id"), str) and isinstance(headers.get("task"), str)
                    and isinstance(args, list) and isinstance(kwargs, dict) and isinstance(kwargs.get("source"), str)):
                raise ConsumerFloorError(f"not a detect_image message: {reply[at + 1][:200]!r}")
            pending.append(reply[at + 2])
        while len(pending) >= batch or (pending and acknowledged + len(pending) >= total):
            tags, pending = pending[:batch], pending[batch:]
            with client.pipeline(transaction=True) as pipe:
                pipe.hdel(UNACKED, *tags)
                pipe.zrem(UNACKED_INDEX, *tags)
                pipe.execute()
            acknowledged += len(tags)
    return time.thread_time() - started, acknowledged


def run_consumer_floor(broker_url: str, messages: int, batch: int, rounds: int,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fill the queue with ``messages`` jobs and consume them, ``rounds`` times; CPU per message each round."""
    per_round = []
    with bench_redis(broker_url) as client:
        for index in range(rounds):
            send_jobs(broker_url, [Path(f"/consumer-floor/{index}/{i}.jpg") for i in range(messages)])
            cpu, acknowledged = consume(client, DETECT_QUEUE, messages, batch)
            left = client.hlen(UNACKED) + client.llen(DETECT_QUEUE)
            if acknowledged != messages or left:
                raise ConsumerFloorError(f"round {index + 1}: {acknowledged} of {messages} acknowledged, {left} "
                                         "left in the queue or unacknowledged")
            per_round.append(round(1000 * cpu / messages, 4))
            log(f"round {index + 1}: {messages} messages, {1000 * cpu / messages:.4f} ms of CPU each")
    return {"broker_url": redacted(broker_url), "messages": messages, "batch": batch,
            "cpu_ms_per_message": per_round, "load_average": load_average()}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.consumer_floor``: 0 when it ran, 1 when a step could not."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.consumer_floor",
        description="CPU per message of a minimal detect-queue consumer outside Celery (the worker's fetch script, "
                    "envelope and body decode, one acknowledgement per batch). Flushes its Redis database.")
    parser.add_argument("--broker-url", default=DEFAULT_BROKER_URL, help="a Redis database of its own (flushed)")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=128, help="messages per acknowledgement (PPL_BATCH_SIZE)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.messages < 1 or args.batch < 1 or args.rounds < 1:
        parser.error("--messages, --batch and --rounds must be positive")

    def log(message: str) -> None:
        print(f"[bench consumer-floor {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    try:
        result = run_consumer_floor(args.broker_url, args.messages, args.batch, args.rounds, log)
    except HarnessError as exc:
        print(f"consumer-floor bench: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
