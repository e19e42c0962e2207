"""``ppl-worker doctor``: is this host ready to work? Each check says what is wrong in one line."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from worker.settings import Settings

CONNECT_TIMEOUT_S = 5


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def _check(name: str, probe: Callable[[], str]) -> Check:
    try:
        return Check(name, True, probe())
    except Exception as exc:  # each check reports its own failure; the next one still runs
        return Check(name, False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}")


def delivery_mode(channel: object) -> str:
    """How worker.broker hands out messages over this broker: atomically, or kombu's two steps (Redis < 6.2)."""
    atomic = getattr(channel, "atomic_fetch", None)
    if atomic is None:  # not Redis: the broker's own acknowledgements
        return ""
    if atomic:
        return "; atomic delivery"
    return ("; two-step delivery (Redis older than 6.2, or a key prefix): a worker killed mid-delivery can lose "
            "a message, see docs/OPERATIONS.md")


def run_checks(settings: Settings, *, check_model: bool = True) -> Iterator[Check]:
    redacted = settings.redacted()

    def broker() -> str:
        from worker.app import DETECT_QUEUE, make_app
        from worker.rescan import queue_length

        app = make_app(settings)
        try:
            with app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=CONNECT_TIMEOUT_S)
                delivery = delivery_mode(conn.default_channel)
        except Exception as exc:
            raise ConnectionError(f"{redacted['broker_url']} unreachable: {exc}") from exc
        return (f"{redacted['broker_url']} reachable, {queue_length(app)} job(s) waiting in {DETECT_QUEUE}"
                f"{delivery}")

    yield _check("broker", broker)

    def database() -> str:
        from sqlalchemy import text

        from worker import db

        engine = db.make_engine(settings.database_url, connect_timeout=CONNECT_TIMEOUT_S)
        try:
            with engine.connect() as conn:
                conn.execute(text("select 1"))
        except Exception as exc:
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
            raise ConnectionError(f"{redacted['database_url']} unreachable: {reason[0] if reason else exc}") from exc
        return f"{redacted['database_url']} reachable"

    database_check = _check("database", database)
    yield database_check

    def migrations() -> str:
        from worker import db

        if not database_check.ok:
            raise RuntimeError("database unreachable")
        engine = db.make_engine(settings.database_url, connect_timeout=CONNECT_TIMEOUT_S)
        with engine.connect() as conn:
            current = db.schema_revision(conn)
        head = db.head_revision()
        if current != head:
            raise RuntimeError(f"schema at revision {current or 'none'}, code expects {head}: run ppl-worker migrate")
        return f"schema at head ({head})"

    yield _check("migrations", migrations)

    def provenance() -> str:
        from worker.settings import provenance_policy

        policy = provenance_policy(settings)  # reads and checks PPL_C2PA_TRUST_ANCHORS, as a worker does at start
        anchors = policy.trust_anchors_pem.count("-----BEGIN CERTIFICATE-----")
        trust = (f"{anchors} C2PA trust anchor(s) from {settings.c2pa_trust_anchors}" if anchors else
                 "no C2PA trust anchors (a manifest is at best valid, never trusted)")
        unsigned = "decides" if policy.trust_unsigned_metadata else "is evidence only"
        return f"{trust}; unsigned metadata {unsigned}"

    yield _check("provenance", provenance)

    if check_model:
        def model() -> str:
            from worker.model import load_model

            served = load_model(settings)
            return f"{served.version_id} loads with the {served.backend.name} backend on {served.backend.device}"

        yield _check("model", model)
