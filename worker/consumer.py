"""Celery's consumer, with its four refusals turned into quarantines (``app.conf.worker_consumer``).

Celery handles a message it cannot run in one of four callbacks (an unknown message shape, an unknown task
name, an invalid task message, a body that cannot be decoded, e.g. a pickle or YAML content type) by logging
it and acknowledging or rejecting it: the job disappears with one log line. Here each one is quarantined by
``worker.tasks.DetectBatches.quarantine``: kept whole as a dead letter, recorded as a ``malformed_message``
failure with a submission row, and only then acknowledged. These callbacks are Celery's public Consumer
methods (no underscore); the pin in pyproject.toml keeps them to the releases the tests ran on.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.message import Message

from worker.app import DETECT_TASK

log = logging.getLogger(__name__)


class Consumer(CeleryConsumer):
    def _quarantine(self, message: Message, detail: str) -> None:
        self.app.tasks[DETECT_TASK].quarantine(message, detail)

    def on_unknown_message(self, body: Any, message: Message) -> None:
        self._quarantine(message, "not a task message: no task name in its headers or body")

    def on_unknown_task(self, body: Any, message: Message, exc: Exception) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        name = headers.get("task")
        if name is None and isinstance(body, dict):
            name = body.get("task")
        self._quarantine(message, f"no task named {str(name)[:200]!r} is registered in this worker")

    def on_invalid_task(self, body: Any, message: Message, exc: Exception) -> None:
        self._quarantine(message, f"invalid task message: {type(exc).__name__}: {exc}"[:500])

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        dead_letter = getattr(message, "dead_letter", None)  # set by worker.broker.Message
        if dead_letter is not None:
            detail = dead_letter[1]
        else:
            detail = f"the body cannot be decoded ({message.content_type}): {type(exc).__name__}: {exc}"[:500]
        self._quarantine(message, detail)
