"""The root of the errors ``ppl_model`` raises for a request it cannot carry out as asked.

A bad configuration, data folder, model directory, backend, export or training request raises a subclass
of ``PPLError``; the ``ppl`` command prints it in one line and exits with its ``exit_code`` (``--debug``
shows the traceback instead). Anything else escaping a command is a bug and keeps its traceback.
"""

from __future__ import annotations


class PPLError(Exception):
    exit_code: int = 2  # a usage error: what was asked for cannot be done as asked
