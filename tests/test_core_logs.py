"""JSON-lines log format with a fixed field set, and scrubbing of secrets from every record."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from pgnotify_worker.core.redact import Scrubber
from pgnotify_worker.logs import FIELDS, JsonFormatter, ScrubFilter, scrub_every_record

SECRET = "sk_live_Zx81bQ0pLm"


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A private logger writing JSON lines through the scrub filter into a buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ScrubFilter([SECRET, ""]))
    handler.setFormatter(JsonFormatter("worker-7"))
    logger = logging.getLogger(f"pgnotify_test.{id(stream)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield logger, stream
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    raw = stream.getvalue().splitlines()
    return [json.loads(line) for line in raw]


def test_one_json_object_per_line_with_the_base_fields(
    capture: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = capture
    logger.info("claimed %d rows", 3)
    logger.warning("second\nline")  # a newline in a message stays inside one JSON line
    first, second = lines(stream)
    assert set(first) == {"ts", "level", "logger", "message", "worker_id"}
    assert first["level"] == "info"
    assert first["logger"] == logger.name
    assert first["message"] == "claimed 3 rows"
    assert first["worker_id"] == "worker-7"
    assert str(first["ts"]).endswith("+00:00")
    assert second["level"] == "warning"
    assert second["message"] == "second\nline"


def test_only_whitelisted_extra_fields_are_emitted(
    capture: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = capture
    logger.error(
        "failed",
        extra={
            "notification_id": 42,
            "channel": "webhook",
            "attempt": 2,
            "error_code": "http_503",
            "duration_ms": 12.5,
            "payload": {"card": "4242424242424242"},
            "password": "nope",
            "outcome": None,  # None fields are left out
        },
    )
    (entry,) = lines(stream)
    assert entry["notification_id"] == 42
    assert entry["channel"] == "webhook"
    assert entry["attempt"] == 2
    assert entry["error_code"] == "http_503"
    assert entry["duration_ms"] == 12.5
    assert "payload" not in entry
    assert "password" not in entry
    assert "outcome" not in entry
    assert set(entry) <= {"ts", "level", "logger", "message", *FIELDS}
    assert "4242424242424242" not in json.dumps(entry)


def test_non_json_extra_values_are_stringified() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.version = object()
    entry = json.loads(JsonFormatter("w").format(record))
    assert str(entry["version"]).startswith("<object object")


def test_scrub_filter_removes_secret_and_email_from_the_message(
    capture: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = capture
    logger.warning("auth with %s for %s refused", SECRET, "alice@example.com")
    (entry,) = lines(stream)
    message = str(entry["message"])
    assert SECRET not in message
    assert "alice@example.com" not in message
    assert "a***@e***.com" in message
    assert "refused" in message


def test_scrub_filter_removes_secret_and_email_from_a_traceback(
    capture: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = capture
    try:
        raise RuntimeError(f"provider said: bad key {SECRET} for bob@mail.example.org")
    except RuntimeError:
        logger.exception("send failed")
    raw = stream.getvalue()
    assert len(raw.splitlines()) == 1  # the traceback is inside the one JSON line
    (entry,) = lines(stream)
    message = str(entry["message"])
    assert message.startswith("send failed\n")
    assert "Traceback" in message
    assert "RuntimeError: provider said: bad key *** for b***@m***.org" in message
    assert SECRET not in raw
    assert "bob@mail.example.org" not in raw


def test_scrub_filter_handles_exc_info_tuples_directly() -> None:
    try:
        raise ValueError(SECRET)
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom %s", ("x",), exc_info)
    assert ScrubFilter([SECRET]).filter(record) is True
    assert record.exc_info is None
    assert record.args is None
    assert SECRET not in record.getMessage()
    assert record.getMessage().startswith("boom x\n")


def test_every_handler_sees_a_scrubbed_record_and_extra_fields_are_scrubbed() -> None:
    """scrub_every_record: a handler that is not ours (a test's capture, an error tracker)
    gets the record already clean; ScrubFilter cleans the extra fields set after it is made."""
    seen: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    factory = logging.getLogRecordFactory()
    logger = logging.getLogger("pgnotify_test.factory")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    foreign, stream = Collect(), io.StringIO()
    ours = logging.StreamHandler(stream)
    scrubber = Scrubber([SECRET])
    ours.addFilter(ScrubFilter(scrubber))
    ours.setFormatter(JsonFormatter("w"))
    logger.addHandler(foreign)  # before ours: it sees the record first
    logger.addHandler(ours)
    try:
        scrub_every_record(scrubber)
        scrub_every_record(scrubber)  # again: replaces, does not stack
        logger.warning(
            "key %s to %s",
            SECRET,
            "ada@example.com",
            extra={"error_code": f"resend_{SECRET} x", "recipient": "ada@example.com"},
        )
    finally:
        logging.setLogRecordFactory(factory)
        logger.removeHandler(foreign)
        logger.removeHandler(ours)
    (record,) = seen
    assert record.getMessage() == "key *** to a***@e***.com"
    (entry,) = lines(stream)
    assert entry["error_code"] == "resend_x"
    assert entry["recipient"] == "a***@e***.com"
    assert SECRET not in stream.getvalue()
