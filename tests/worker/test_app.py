"""The Celery app's configuration and the metrics endpoint."""

from __future__ import annotations

import os
import socket
import urllib.request

from worker import metrics
from worker.app import DETECT_QUEUE, DETECT_TASK, RESCAN_QUEUE, RESCAN_TASK, make_app
from worker.settings import Settings


def test_app_accepts_json_only_and_acknowledges_late():
    conf = make_app(Settings.from_env({}, batch_size=16, visibility_timeout_s=900)).conf
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    # Celery prefetches multiplier × concurrency: the batches in flight and one more, rounded up to a whole multiplier
    settings = Settings.from_env({}, batch_size=16)
    assert conf.worker_prefetch_multiplier * settings.batches_in_flight == settings.prefetch_count
    assert 4 * 16 <= settings.prefetch_count < 4 * 16 + settings.batches_in_flight
    assert conf.broker_transport_options["visibility_timeout"] == 900
    assert conf.task_routes[DETECT_TASK]["queue"] == DETECT_QUEUE
    assert conf.task_routes[RESCAN_TASK]["queue"] == RESCAN_QUEUE


def test_abandoned_messages_are_swept_within_a_fraction_of_the_visibility_timeout():
    def sweep(visibility_s: int) -> int:
        options = make_app(Settings.from_env({}, visibility_timeout_s=visibility_s)).conf.broker_transport_options
        assert options["unacked_restore_throttle"] == 1  # else kombu scans only every 10th sweep
        return options["unacked_restore_interval"]

    assert sweep(8) == 2 and sweep(3600) == 60 and sweep(2) == 1


def test_beat_schedules_a_stale_rescan_only_when_asked():
    assert make_app(Settings.from_env({})).conf.beat_schedule == {}
    schedule = make_app(Settings.from_env({"PPL_RESCAN_INTERVAL_S": "3600"})).conf.beat_schedule
    (entry,) = schedule.values()
    assert entry["task"] == RESCAN_TASK and entry["schedule"] == 3600.0
    assert entry["kwargs"] == {"stale_only": True} and entry["options"]["queue"] == RESCAN_QUEUE


def test_the_registered_task_batches_as_configured():
    from worker.tasks import detect_image

    assert detect_image.name == DETECT_TASK and detect_image.acks_late
    assert detect_image.flush_every >= 1 and detect_image.flush_interval > 0


def test_metrics_are_served_over_http():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics.serve(port)
    metrics.FAILURES.labels("corrupt").inc()
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'ppl_failures_total{reason="corrupt"}' in body
    assert "ppl_stage_seconds_bucket" in body or "ppl_stage_seconds" in body


def test_ppl_worker_run_starts_a_threads_worker_with_openmp_not_spinning(monkeypatch):
    from worker import cli
    from worker.app import app

    started = []
    exit_status = 0

    def start(argv):  # Celery's app.start runs the worker and returns its exit status
        started.append(argv)
        return exit_status

    monkeypatch.setattr(app, "start", start)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert cli.main(["run", "--hostname", "gpu0@%h"]) == 0
    (argv,) = started
    assert argv[0] == "worker"
    assert argv[argv.index("--pool") + 1] == "threads" and argv[argv.index("--queues") + 1] == "detect"
    assert argv[argv.index("--hostname") + 1] == "gpu0@%h"
    assert argv[argv.index("--concurrency") + 1] == str(Settings.from_env({}).batches_in_flight)  # overlapping batches
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert cli.main(["run", "--queues", "rescan"]) == 0  # one rescan at a time
    assert started[-1][started[-1].index("--concurrency") + 1] == "1"
    assert cli.main(["run", "--queues", "detect,rescan", "--concurrency", "2"]) == 0
    assert started[-1][started[-1].index("--concurrency") + 1] == "2"
    del started[1:]

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the operator's choice wins
    assert cli.main(["run"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"

    exit_status = 1  # an unrecoverable error: the status reaches the supervisor (worker_main dropped it)
    assert cli.main(["run"]) == 1
