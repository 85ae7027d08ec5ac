"""JSON-lines logging with a stable field set, and scrubbing of secrets and addresses."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from collections.abc import Iterable
from typing import Any

from pgnotify_worker.core.redact import Scrubber

LOG_LIMIT = 16_000  # characters of one message (with its traceback) after scrubbing

# Fields a log call may pass in `extra`; anything else is ignored, so no payload sneaks in.
FIELDS = (
    "action",
    "notification_id",
    "channel",
    "provider",
    "attempt",
    "outcome",
    "error_code",
    "recipient",
    "duration_ms",
    "count",
    "version",
    "worker_id",
)


def _scrub_message(record: logging.LogRecord, scrubber: Scrubber) -> None:
    """The message with its arguments, traceback and stack, scrubbed into record.msg (once)."""
    if record.__dict__.get("_pgnotify_scrubbed"):
        return
    try:
        message = record.getMessage()
    except (TypeError, ValueError):  # a bad format string: keep what there is
        message = f"{record.msg} {record.args}"
    if record.exc_info:
        message += "\n" + logging.Formatter().formatException(record.exc_info)
        record.exc_info = None
    if record.exc_text:
        message += "\n" + record.exc_text
        record.exc_text = None
    if record.stack_info:
        message += "\n" + record.stack_info
        record.stack_info = None
    record.msg = scrubber.clean(message, limit=LOG_LIMIT)
    record.args = None
    record.__dict__["_pgnotify_scrubbed"] = True


def _scrub_fields(record: logging.LogRecord, scrubber: Scrubber) -> None:
    """The extra fields a log call passed (they are set after the record is made)."""
    for name in FIELDS:
        value = record.__dict__.get(name)
        if isinstance(value, str):
            record.__dict__[name] = (
                scrubber.code(value) if name == "error_code" else scrubber.clean(value, LOG_LIMIT)
            )


class ScrubFilter(logging.Filter):
    """Removes secrets (in any encoding), credentials, emails and phone numbers from every
    record: the message with its arguments, the traceback, and the extra fields."""

    def __init__(self, secrets: Iterable[str] | Scrubber = ()) -> None:
        super().__init__()
        self.scrubber = secrets if isinstance(secrets, Scrubber) else Scrubber(secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        _scrub_message(record, self.scrubber)
        _scrub_fields(record, self.scrubber)
        return True


def scrub_every_record(scrubber: Scrubber) -> None:
    """Scrub each record's message as it is made, so that every handler (a test's capture, an
    error tracker added later) sees it clean, not only ours. Replaces an earlier call's."""
    current = logging.getLogRecordFactory()
    base = getattr(current, "_pgnotify_base", current)

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        _scrub_message(record, scrubber)
        return record

    factory._pgnotify_base = base  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, worker_id and the FIELDS given."""

    def __init__(self, worker_id: str) -> None:
        super().__init__()
        self.worker_id = worker_id

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "worker_id": self.worker_id,
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(
    level: str,
    fmt: str,
    worker_id: str,
    secrets: Iterable[str] | Scrubber = (),
    stream: object = None,
) -> None:
    """Configure the root logger once (idempotent)."""
    scrubber = secrets if isinstance(secrets, Scrubber) else Scrubber(secrets)
    scrub_every_record(scrubber)
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.addFilter(ScrubFilter(scrubber))
    if fmt == "json":
        handler.setFormatter(JsonFormatter(worker_id))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_pgnotify", False):
            root.removeHandler(old)
    handler._pgnotify = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
