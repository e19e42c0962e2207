"""The root of the errors ``worker`` raises for an operation it cannot carry out as asked.

Bad settings, a bad command line, a rescan that cannot start: each a subclass of ``WorkerError``, which
``ppl-worker`` prints in one line and exits with its ``exit_code`` (``--debug`` shows the traceback
instead). Per-job errors (``worker.sources.SourceError``) are not among them: they become failure rows.
"""

from __future__ import annotations


class WorkerError(Exception):
    exit_code: int = 2  # a usage error: what was asked for cannot be done as asked
