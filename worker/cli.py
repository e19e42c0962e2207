"""``ppl-worker``: operations. Each subcommand parses its arguments and calls the worker library.

Settings come from ``PPL_*`` environment variables (worker.settings); nothing here reads them directly.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ppl_model.categories import Decision, Label, ProvenanceKind
from worker.errors import WorkerError
from worker.settings import Settings

_AGO = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class CliError(WorkerError, RuntimeError):
    """Reported in one line with exit status 2."""


def parse_when(text: str) -> datetime:
    """``24h``, ``30m``, ``7d`` (ago) or an ISO date-time (UTC when no zone is given)."""
    match = _AGO.match(text.strip())
    if match:
        return datetime.now(UTC) - timedelta(**{_UNITS[match[2]]: int(match[1])})
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a duration like 24h nor an ISO date-time") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def source_uris(items: Sequence[str]) -> list[str]:
    """URLs as given; files and folders (recursively, image files only) as absolute file:// URIs."""
    from ppl_model.imageio import list_images

    uris: list[str] = []
    for item in items:
        if "://" in item:
            uris.append(item)
            continue
        path = Path(item)
        if path.is_dir():
            uris.extend(p.resolve().as_uri() for p in list_images(path))
        elif path.exists():
            uris.append(path.resolve().as_uri())
        else:
            raise CliError(f"{item}: no such file or folder")
    return uris


def _submit(args: argparse.Namespace, settings: Settings) -> int:
    from worker.app import DETECT_QUEUE, DETECT_TASK, detect_kwargs, make_app

    uris = source_uris(args.sources)
    if not uris:
        raise CliError("nothing to submit: no image files found")
    metadata = json.loads(args.metadata) if args.metadata else None
    app = make_app(settings)
    started = time.monotonic()
    with app.producer_or_acquire() as producer:
        for index, uri in enumerate(uris):
            external_id = f"{args.external_id_prefix}{index}" if args.external_id_prefix else None
            app.send_task(DETECT_TASK, kwargs=detect_kwargs(uri, external_id, metadata), queue=DETECT_QUEUE,
                          producer=producer)
    print(f"submitted {len(uris)} job(s) to queue {DETECT_QUEUE} in {time.monotonic() - started:.2f} s")
    if args.wait:
        return _wait_for(uris, settings, args.timeout)
    return 0


def _content_hashes(uris: list[str]) -> dict[str, str]:
    """sha256 of each local file submitted: a file whose content was judged under another name is answered
    by that verdict, which keeps the other name as its source."""
    from urllib.parse import unquote, urlparse

    hashes = {}
    for uri in uris:
        if uri.startswith("file://"):
            with contextlib.suppress(OSError):  # the worker records it as missing
                hashes[uri] = hashlib.sha256(Path(unquote(urlparse(uri).path)).read_bytes()).hexdigest()
    return hashes


def _wait_for(uris: list[str], settings: Settings, timeout: float) -> int:
    """Until every submitted source has a verdict from the served model or a failure row."""
    from worker import db
    from worker.rescan import target_version

    engine = db.make_engine(settings.database_url)
    version = target_version(settings, engine, None)
    hashes = _content_hashes(uris)
    pending = set(uris)
    deadline = time.monotonic() + timeout
    while True:
        with engine.connect() as conn:
            pending -= db.answered_sources(conn, pending, version)
            judged = db.judged_contents(conn, {hashes[u] for u in pending if u in hashes}, version)
        pending = {u for u in pending if hashes.get(u) not in judged}
        if not pending:
            print(f"all {len(set(uris))} source(s) answered")
            return 0
        if time.monotonic() > deadline:
            print(f"timed out after {timeout:.0f} s: {len(pending)} source(s) not answered yet", file=sys.stderr)
            return 1
        time.sleep(0.5)


VERDICT_COLUMNS = ("created_at", "label", "decision", "score", "patch_max", "patch_frac_above", "top_patch_row",
                   "top_patch_col", "width", "height", "format", "frames", "provenance_kind", "declared_generator",
                   "c2pa_state", "external_id", "source", "model_version")
TABLE_COLUMNS = tuple(c for c in VERDICT_COLUMNS if c not in ("model_version", "frames", "c2pa_state"))  # narrow


SUBMISSION_COLUMNS = ("answered_at", "task_id", "external_id", "outcome", "label", "score", "reason", "source",
                      "model_version")
SUBMISSION_TABLE_COLUMNS = tuple(c for c in SUBMISSION_COLUMNS if c != "model_version")


def _verdicts(args: argparse.Namespace, settings: Settings) -> int:
    from worker import db

    engine = db.make_engine(settings.database_url)
    by_job = bool(args.task_id or args.external_id)
    if by_job and (args.decision or args.provenance_kind or args.generator):
        raise CliError("--decision, --provenance-kind and --generator filter the latest verdicts; --task-id and "
                       "--external-id list jobs: use one or the other")
    rows: Sequence[Mapping[str, Any]]  # db.SubmissionAnswer or db.VerdictListing rows
    with engine.connect() as conn:
        if by_job:  # one row per job that carried these ids, whatever answered it
            rows = db.find_submissions(conn, task_ids=args.task_id or (), external_ids=args.external_id or (),
                                       limit=args.limit)
        else:
            rows = db.query_verdicts(conn, flagged_only=args.flagged, since=args.since, limit=args.limit,
                                     decision=args.decision, provenance_kind=args.provenance_kind,
                                     generator=args.generator)
    columns, table_columns = (SUBMISSION_COLUMNS, SUBMISSION_TABLE_COLUMNS) if by_job else \
        (VERDICT_COLUMNS, TABLE_COLUMNS)
    if args.format == "json":
        print(json.dumps(rows, default=str, indent=2))
    elif args.format == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    else:
        print(format_table(rows, table_columns))
        print(f"({len(rows)} row(s))")
    return 0


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        if isinstance(value, datetime):
            return value.strftime("%Y-%m-%d %H:%M:%S")
        text = "" if value is None else str(value)
        return text if len(text) <= 60 else "…" + text[-59:]

    table = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in table]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in table]
    return "\n".join(lines)


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from worker import db

    create = args.create_database or args.recreate_database
    if create and db.create_database_if_missing(settings.database_url, drop_first=args.recreate_database):
        print(f"created database {settings.redacted()['database_url']}")
    db.migrate(settings.database_url)
    print(f"database at revision {db.head_revision()}")
    return 0


def _rescan(args: argparse.Namespace, settings: Settings) -> int:
    from worker.app import make_app
    from worker.rescan import RescanRequest, run_rescan

    request = RescanRequest(stale_only=not args.all, since=args.since, until=args.until, label=args.label,
                            min_score=args.min_score, max_score=args.max_score,
                            target_model_version=args.model_version, resume=not args.restart, limit=args.limit)
    result = run_rescan(settings, request, app=make_app(settings), progress=not args.no_progress)
    print(json.dumps(result.as_dict(), default=str))
    return 0


def _doctor(args: argparse.Namespace, settings: Settings) -> int:
    from worker.doctor import run_checks

    failed = 0
    for check in run_checks(settings, check_model=not args.skip_model):
        print(f"[{'ok' if check.ok else 'FAIL':4s}] {check.name}: {check.detail}")
        failed += not check.ok
    if failed:
        print(f"{failed} check(s) failed", file=sys.stderr)
        return 1
    return 0


def _dead_letters(args: argparse.Namespace, settings: Settings) -> int:
    from worker.dead_letters import DeadLetterStore, summary

    store = DeadLetterStore.from_url(settings.broker_url, settings.dead_letter_max)
    if args.action == "list":
        letters = store.list(args.limit)
        if args.format == "json":
            print(json.dumps([summary(letter) for letter in letters], indent=2))
        else:
            print(format_table([dict(summary(letter)) for letter in letters],
                               ("id", "stored_at", "queue", "task_id", "task_name", "bytes", "detail")))
            print(f"({len(letters)} of {store.count()} dead letter(s))")
        return 0
    if not args.ids:
        raise CliError(f"dead-letters {args.action} needs one or more letter ids (see dead-letters list)")
    missing = 0
    for letter_id in args.ids:
        found = True
        if args.action == "show":
            letter = store.get(letter_id)
            found = letter is not None
            if letter is not None:
                print(json.dumps(dataclasses.asdict(letter), indent=2))
        elif args.action == "replay":
            letter = store.replay(letter_id, args.queue)
            found = letter is not None
            if letter is not None:
                print(f"replayed {letter_id} onto queue {args.queue or letter.queue}")
        elif found := store.delete(letter_id):
            print(f"deleted {letter_id}")
        if not found:
            print(f"no dead letter {letter_id}", file=sys.stderr)
            missing += 1
    return 1 if missing else 0


def _health(args: argparse.Namespace, settings: Settings) -> int:
    """Liveness: the worker has heard from the broker within --max-age seconds (its heartbeat file)."""
    from worker.broker import heartbeat_age

    if settings.heartbeat_file is None:
        raise CliError("PPL_HEARTBEAT_FILE is not set, so the worker keeps no heartbeat to check")
    age = heartbeat_age(settings.heartbeat_file)
    if age is None:
        print(f"unhealthy: no heartbeat at {settings.heartbeat_file} (the worker has not consumed yet)",
              file=sys.stderr)
        return 1
    if age > args.max_age:
        print(f"unhealthy: the worker last heard from the broker {age:.0f} s ago (limit {args.max_age:.0f} s)",
              file=sys.stderr)
        return 1
    print(f"healthy: heard from the broker {age:.1f} s ago")
    return 0


def _run(args: argparse.Namespace, settings: Settings) -> int:
    # torch's OpenMP threads spin-wait after every parallel region by default, taking the CPU that this
    # process's decode threads need (docs/PERFORMANCE.md: up to 3× fewer images/s on a busy CPU host).
    # OpenMP reads the variable when torch loads, so it is set before the app (and torch) is imported; a
    # value set by the operator wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from worker.settings import provenance_policy

    provenance_policy(settings)  # a bad PPL_C2PA_TRUST_ANCHORS stops the worker here, in one line, before any job
    from worker.app import DETECT_QUEUE, app

    # A detect worker overlaps its batches; a rescan worker runs one rescan at a time (two at once would
    # enqueue the same images twice over).
    detects = DETECT_QUEUE in [queue.strip() for queue in args.queues.split(",")]
    concurrency = args.concurrency or (settings.batches_in_flight if detects else 1)
    argv = ["worker", "--queues", args.queues, "--pool", "threads", "--concurrency", str(concurrency),
            "--loglevel", settings.log_level]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    # app.start returns the worker's exit status (worker_main drops it): non-zero after an unrecoverable
    # error, so that a supervisor or an alert on exit codes sees it.
    return int(app.start(argv) or 0)


def _bench(args: argparse.Namespace, settings: Settings) -> int:
    """The worker benchmark, benchmarks/worker_bench.py: a source checkout's, outside the shipped packages, so
    it runs as ``python -m benchmarks.worker_bench`` from the repository root and this package never imports it."""
    import signal
    import subprocess

    from worker.db import REPO_ROOT

    if not (REPO_ROOT / "benchmarks" / "worker_bench.py").is_file():
        raise CliError(f"the worker benchmark comes with a source checkout (benchmarks/ in the repository); there "
                       f"is none at {REPO_ROOT}: clone the repository and install it with pip install -e .")
    env = {**os.environ, "PPL_BENCH_CWD": os.getcwd()}  # relative paths are read from where this was started
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.worker_bench", *args.bench_args], cwd=REPO_ROOT,
                            env=env)
    # SIGTERM is passed on, so that the benchmark stops its workers and drops its databases; Ctrl-C reaches it
    # directly (same process group), and this process waits for it to finish cleaning up.
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppl-worker", description="PPL moderation worker: operations")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line (before the command)")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="start a worker process (Celery, threads pool)")
    run.add_argument("--queues", default="detect",
                     help="detect (default) or rescan: give rescans their own worker, or a long rescan task "
                          "holds the slot that detection needs")
    run.add_argument("--concurrency", type=int,
                     help="tasks at once: for detect, the batches in flight (default PPL_BATCHES_IN_FLIGHT; their "
                          "stages overlap, one inference runs at a time); for a rescan-only worker, 1")
    run.add_argument("--hostname", help="Celery node name, e.g. gpu0@%%h")
    run.set_defaults(handler=_run)

    submit = commands.add_parser("submit", help="enqueue detect_image jobs for files, folders or URLs")
    submit.add_argument("sources", nargs="+", help="image files, folders (recursively) or http(s):// URLs")
    submit.add_argument("--external-id-prefix", help="external_id of each job: PREFIX + its index")
    submit.add_argument("--metadata", help="a small JSON object attached to every job")
    submit.add_argument("--wait", action="store_true", help="wait until every job has a verdict or a failure")
    submit.add_argument("--timeout", type=float, default=600.0, help="seconds --wait waits at most")
    submit.set_defaults(handler=_submit)

    verdicts = commands.add_parser("verdicts", help="the latest verdicts, newest first")
    verdicts.add_argument("--flagged", action="store_true", help="only images judged fake")
    verdicts.add_argument("--since", type=parse_when, help="24h, 30m, 7d or an ISO date-time")
    verdicts.add_argument("--decision", choices=[d.value for d in Decision],
                          help="what decided the label: a C2PA manifest, unsigned metadata or the model")
    verdicts.add_argument("--provenance-kind", choices=[k.value for k in ProvenanceKind],
                          help="the strongest provenance signal the image carries")
    verdicts.add_argument("--generator", help="the generator the image declares (exactly, e.g. 'Stable Diffusion')")
    verdicts.add_argument("--limit", type=int, default=50)
    verdicts.add_argument("--format", default="table", choices=["table", "json", "csv"])
    verdicts.add_argument("--task-id", action="append",
                          help="the job with this Celery task id, and what answered it (repeatable)")
    verdicts.add_argument("--external-id", action="append",
                          help="the jobs sent with this external_id, and what answered each (repeatable)")
    verdicts.set_defaults(handler=_verdicts)

    dead = commands.add_parser("dead-letters", help="messages the worker could not run, kept whole in Redis")
    dead.add_argument("action", choices=["list", "show", "replay", "delete"],
                      help="list (newest first), show IDS, replay IDS onto their queue, delete IDS")
    dead.add_argument("ids", nargs="*", help="dead letter ids (from list)")
    dead.add_argument("--queue", help="replay onto this queue instead of the one the message came from")
    dead.add_argument("--limit", type=int, default=50)
    dead.add_argument("--format", default="table", choices=["table", "json"])
    dead.set_defaults(handler=_dead_letters)

    health = commands.add_parser("health", help="liveness: exit 1 unless the worker heard from the broker lately")
    health.add_argument("--max-age", type=float, default=60.0, help="seconds (default 60)")
    health.set_defaults(handler=_health)

    migrate = commands.add_parser("migrate", help="upgrade the database schema to the newest revision")
    migrate.add_argument("--create-database", action="store_true", help="create the database first if it is missing")
    migrate.add_argument("--recreate-database", action="store_true",
                         help="DROP the database, every verdict in it, and create it afresh (demo, development)")
    migrate.set_defaults(handler=_migrate)

    rescan = commands.add_parser("rescan", help="re-enqueue stored images the current model has not judged")
    rescan.add_argument("--all", action="store_true", help="every matching image, not only stale ones")
    rescan.add_argument("--since", type=parse_when, help="verdicts created from (24h, 7d or ISO)")
    rescan.add_argument("--until", type=parse_when, help="verdicts created before")
    rescan.add_argument("--label", choices=[label.value for label in Label])
    rescan.add_argument("--min-score", type=float)
    rescan.add_argument("--max-score", type=float)
    rescan.add_argument("--model-version", help="target version (default: PPL_MODEL_DIR's model, else the active)")
    rescan.add_argument("--restart", action="store_true", help="start afresh instead of resuming an unfinished run")
    rescan.add_argument("--limit", type=int, help="enqueue at most this many jobs")
    rescan.add_argument("--no-progress", action="store_true")
    rescan.set_defaults(handler=_rescan)

    doctor = commands.add_parser("doctor", help="check broker, database, migrations and model; exit 1 on failure")
    doctor.add_argument("--skip-model", action="store_true", help="do not load the model (for non-worker hosts)")
    doctor.set_defaults(handler=_doctor)

    # Every argument, options and --help included, goes to the benchmark's own parser (a prefix that no
    # argument uses keeps this one from reading them); its options are those of the old ppl bench worker.
    bench = commands.add_parser("bench", add_help=False, prefix_chars="+",
                                help="worker benchmark from a source checkout: end to end vs ppl scan and a naive "
                                     "worker, upserts, rescan, soak (ppl-worker bench --help)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(handler=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        return args.handler(args, settings)
    except (WorkerError, json.JSONDecodeError) as exc:  # asked for what cannot be done as asked
        if args.debug:
            raise
        print(f"ppl-worker {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, WorkerError) else 2
    except Exception as exc:  # services down etc.: one clear line for operators, the traceback with --debug
        if args.debug:
            raise
        print(f"ppl-worker {args.command}: failed: {type(exc).__name__}: {exc} (--debug shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
