"""``ppl-worker health``: the liveness check passes only while the worker's broker heartbeat is fresh."""

from __future__ import annotations

import os
import re
import time

from worker import cli


def test_health_follows_the_heartbeat_file(tmp_path, monkeypatch, capsys):
    heartbeat = tmp_path / "heartbeat"
    monkeypatch.delenv("PPL_HEARTBEAT_FILE", raising=False)
    assert cli.main(["health"]) == 2  # no heartbeat configured: a usage error, not "healthy"
    assert "PPL_HEARTBEAT_FILE" in capsys.readouterr().err

    monkeypatch.setenv("PPL_HEARTBEAT_FILE", str(heartbeat))
    assert cli.main(["health"]) == 1  # the worker never consumed
    heartbeat.touch()
    assert cli.main(["health", "--max-age", "60"]) == 0
    stale = time.time() - 300
    os.utime(heartbeat, (stale, stale))  # alive but no longer hearing from the broker
    assert cli.main(["health", "--max-age", "60"]) == 1
    assert re.search(r"last heard from the broker (29[89]|30[01]) s ago", capsys.readouterr().err)
