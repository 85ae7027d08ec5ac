"""Command line: run, migrate, enqueue, status, show, tail, cancel, retry, replay, purge,
send-test, psql. Output is for people: quiet unless something is wrong, text by default (`run`
keeps the configured log format)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import gc
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import SecretStr

from pgnotify_worker import __version__
from pgnotify_worker.adapters import db, migrate, queries
from pgnotify_worker.adapters.embedded import EmbeddedPostgres, start_embedded
from pgnotify_worker.adapters.providers.webhook import WebhookSettings
from pgnotify_worker.config import Settings, load_settings
from pgnotify_worker.core.redact import Scrubber
from pgnotify_worker.errors import ConfigError, PgnotifyError
from pgnotify_worker.logs import setup_logging

log = logging.getLogger("pgnotify_worker")


@contextlib.contextmanager
def database(settings: Settings) -> Iterator[tuple[str, EmbeddedPostgres | None]]:
    """The DSN to use: PGNOTIFY_DATABASE_URL, or the embedded server (started if needed)."""
    if settings.database_url is not None:
        yield settings.database_url.get_secret_value(), None
        return
    embedded = start_embedded(settings.data_dir)
    try:
        yield embedded.uri, embedded
    finally:
        embedded.stop()


def dev_webhook_secret(data_dir: Path) -> tuple[str, Path]:
    """A signing secret kept in the embedded data dir, so `make run` signs webhooks too."""
    path = data_dir / "webhook-secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("whsec_" + base64.b64encode(os.urandom(32)).decode() + "\n")
        path.chmod(0o600)
    return path.read_text().strip(), path


def dev_console_password(data_dir: Path) -> tuple[str, Path]:
    """A console password kept in the embedded data dir, so `make run` opens the console."""
    path = data_dir / "console-password"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(base64.urlsafe_b64encode(os.urandom(15)).decode() + "\n")
        path.chmod(0o600)
    return path.read_text().strip(), path


def command() -> str:
    """How to call this CLI again from the current directory: `pgnotify-worker` when that is what
    PATH finds, else the script's path (`.venv/bin/pgnotify-worker` after `make run`)."""
    argv0 = Path(sys.argv[0])
    if argv0.name != "pgnotify-worker":  # python -m pgnotify_worker
        return f"{shlex.quote(_short(Path(sys.executable)))} -m pgnotify_worker"
    found = shutil.which("pgnotify-worker")
    if found and Path(found).resolve() == argv0.resolve():
        return "pgnotify-worker"
    return shlex.quote(_short(argv0))


def _short(path: Path) -> str:
    """A path relative to the current directory when it lies below it, else absolute."""
    absolute = path if path.is_absolute() else Path.cwd() / path
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(absolute)


# Allocations between gen-0 collections in a running worker (Python's default is 700: under a
# drain that was a collection every ~2 notifications).
GC_GEN0 = 10_000

TRY_ARGS = (
    "enqueue --channel email --to ada@example.com --subject 'Hello {{ name }}' "
    "--body 'Welcome aboard, {{ name }}!' --payload '{\"name\": \"Ada\"}'"
)


def banner(
    settings: Settings,
    dsn: str,
    embedded: EmbeddedPostgres | None,
    secret_file: Path | None,
    console_file: Path | None = None,
) -> str:
    """What `run` prints first: where things are and how to send a first notification. Every
    line is true of this run, and the commands work when pasted (no secret is printed)."""
    shown = dsn if embedded else db_display(dsn)
    host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::") else settings.http_host  # noqa: S104
    providers = " ".join(f"{c}={'+'.join(settings.providers_for(c))}" for c in settings.channels)
    cli = command()
    lines = [
        f"pgnotify-worker {__version__}",
        f"  database   {shown}"
        + (f"  (embedded; data in {embedded.data_dir})" if embedded else ""),
        f"  http       http://{host}:{settings.http_port}/metrics  /healthz  /readyz  /status",
        f"  providers  {providers}",
    ]
    if settings.console_admin_password and settings.console_admin_password.get_secret_value():
        url = f"http://{host}:{settings.http_port}/console/"
        if console_file is not None:  # generated for this dev run: show it (it is in the file)
            password = settings.console_admin_password.get_secret_value()
            lines.append(f"  console    {url}  password {password}  (kept in {console_file})")
        else:
            lines.append(f"  console    {url}  (password: PGNOTIFY_CONSOLE_ADMIN_PASSWORD)")
    if settings.simulate:
        inbox = "inapp" in settings.channels and "inapp" in settings.providers_for("inapp")
        lines.append(
            "  simulate   on: what would leave this machine is printed here"
            + ("; in-app messages go to pgnotify.inbox" if inbox else "")
        )
    webhooks = "webhook" in settings.channels and "webhook" in settings.providers_for("webhook")
    if webhooks and secret_file:
        lines.append(f"  webhooks   signed with the dev secret in {secret_file}")
    if webhooks and settings.webhook_allowed_networks:
        lines.append(f"  webhooks   may reach {', '.join(settings.webhook_allowed_networks)}")
    if not embedded:  # the commands below find the database the way this worker did
        lines.append("  shell      the commands below need PGNOTIFY_DATABASE_URL set there too")
    lines.append(f"  try        {cli} {TRY_ARGS}")
    lines.append(f"  psql       {cli} psql")
    return "\n".join(lines)


def db_display(dsn: str) -> str:
    """A DSN with its password hidden."""
    if "://" in dsn and "@" in dsn:
        scheme, rest = dsn.split("://", 1)
        userinfo, host = rest.split("@", 1)
        user = userinfo.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in userinfo else dsn
    return dsn


def cmd_run(settings: Settings) -> int:
    if settings.processes > 1:
        if settings.database_url is None:
            raise ConfigError(
                "PGNOTIFY_PROCESSES/--processes above 1 needs PGNOTIFY_DATABASE_URL (the embedded "
                "PostgreSQL serves one worker process)"
            )
        from pgnotify_worker.processes import supervise  # noqa: PLC0415

        named = settings.worker_id if "worker_id" in settings.model_fields_set else None
        return supervise(settings.processes, settings.http_port, named)
    from pgnotify_worker.service import Service  # noqa: PLC0415 - keeps `--help` fast

    with database(settings) as (dsn, embedded):
        secret_file = console_file = None
        if embedded is not None:
            # Dev mode: sign with a kept secret, and let webhooks reach a receiver on this machine.
            webhook = WebhookSettings.model_validate(
                settings, from_attributes=True
            )  # the same object
            if webhook.webhook_secret is None:
                secret, secret_file = dev_webhook_secret(settings.data_dir)
                webhook.webhook_secret = SecretStr(secret)
            if "webhook_allowed_networks" not in settings.model_fields_set:
                settings.webhook_allowed_networks = ["127.0.0.0/8", "::1/128"]
            if "simulate" not in settings.model_fields_set:
                settings.simulate = True  # trying it: what would leave the machine prints here
            if settings.console_admin_password is None:
                password, console_file = dev_console_password(settings.data_dir)
                settings.console_admin_password = SecretStr(password)
        print(banner(settings, dsn, embedded, secret_file, console_file), flush=True)
        listen_dsn = (
            settings.listen_database_url.get_secret_value()
            if settings.listen_database_url
            else None
        )
        service = Service(settings, dsn, listen_dsn)
        if secret_file or console_file:  # dev secrets came after logging was set up: scrub them
            assert settings.worker_id is not None
            setup_logging(
                settings.log_level, settings.log_format, settings.worker_id, service.scrubber
            )
        # What start-up built lives as long as the process: out of the collector's way (a full
        # collection walked it all, a latency spike), and fewer gen-0 collections under load.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_GEN0, 20, 20)
        asyncio.run(service.run())
    return 0


async def _with_conn(dsn: str, fn: Any, statement_cache_size: int = 100) -> Any:
    conn = await asyncpg.connect(dsn, statement_cache_size=statement_cache_size)
    try:
        await db._init_connection(conn)
        return await fn(conn)
    finally:
        await conn.close()


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    if args.dry_run:

        async def pending(conn: asyncpg.Connection) -> list[migrate.Migration]:
            current = await migrate.applied_version(conn)
            return [m for m in migrate.load_migrations() if m.version > current]

        with database(settings) as (dsn, _embedded):
            todo = asyncio.run(_with_conn(dsn, pending, settings.statement_cache_size))
        if not todo:
            print("schema is up to date")
        for m in todo:
            print(f"would apply {m.version:04d}_{m.name}")
        return 0
    with database(settings) as (dsn, _embedded):
        applied = asyncio.run(_with_conn(dsn, migrate.migrate, settings.statement_cache_size))
    if applied:
        print("applied migrations: " + ", ".join(f"{v:04d}" for v in applied))
    else:
        print("schema is up to date")
    return 0


def _parse_payload(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--payload is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError("--payload must be a JSON object")
    return value


def cmd_enqueue(settings: Settings, args: argparse.Namespace) -> int:
    payload = _parse_payload(args.payload)
    run_at = None
    if args.at:
        run_at = dt.datetime.fromisoformat(args.at)
        if run_at.tzinfo is None:
            raise ConfigError("--at needs a time zone, e.g. 2030-01-01T09:00:00+00:00")
    for name in ("to", "subject", "body", "html"):
        value = getattr(args, name)
        if value is not None and "\x00" in value:
            raise ConfigError(f"--{name} contains a NUL byte, which PostgreSQL text cannot hold")

    async def go(conn: asyncpg.Connection) -> int:
        when = run_at
        if args.delay is not None:
            when = await conn.fetchval(queries.IN_SECONDS, args.delay)
        value: int = await conn.fetchval(
            queries.ENQUEUE,
            args.channel,
            args.to,
            args.template,
            payload,
            args.subject,
            args.body,
            args.html,
            args.user_id,
            args.category,
            args.locale,
            args.priority,
            when,
            args.max_attempts,
            args.idempotency_key,
        )
        return value

    with database(settings) as (dsn, _embedded):
        notification_id = asyncio.run(_with_conn(dsn, go, settings.statement_cache_size))
    print(notification_id)
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    async def go(conn: asyncpg.Connection) -> dict[str, Any]:
        await migrate.check_version(conn)
        queue = [dict(r) for r in await conn.fetch(queries.QUEUE_STATUS)]
        errors = [dict(r) for r in await conn.fetch(queries.RECENT_ERRORS, 10)]
        # rows written before scrubbing existed, or by another tool, are scrubbed on display
        scrubber = Scrubber(settings.secret_values(), settings.secret_pairs())
        return {"queue": queue, "recent_errors": scrubber.tree(errors)}

    with database(settings) as (dsn, _embedded):
        report = asyncio.run(_with_conn(dsn, go, settings.statement_cache_size))
    if args.json:
        print(json.dumps(report, default=str, indent=2))
        return 0
    columns = ("channel", "ready", "scheduled", "processing", "retrying", "held", "dead", "failed")
    print(" ".join(f"{c:>10}" for c in columns) + "  oldest ready")
    for row in report["queue"]:
        print(
            " ".join(f"{row[c]!s:>10}" for c in columns) + f"  {row['oldest_ready_seconds']:.1f}s"
        )
    if report["recent_errors"]:
        print("\nrecent errors:")
        for e in report["recent_errors"]:
            print(
                f"  {e['last_seen']:%Y-%m-%d %H:%M:%S}  {e['channel']:<8} "
                f"{e['occurrences']:>6}x  {e['error']}"
            )
    return 0


def cmd_cancel_or_retry(settings: Settings, args: argparse.Namespace, sql: str, verb: str) -> int:
    async def go(conn: asyncpg.Connection) -> bool:
        done: bool = await conn.fetchval(sql, args.id)
        return done

    with database(settings) as (dsn, _embedded):
        done = asyncio.run(_with_conn(dsn, go, settings.statement_cache_size))
    if done:
        print(f"notification {args.id} {verb}")
        return 0
    print(
        f"notification {args.id} was not {verb}: unknown, or not in a state that allows it",
        file=sys.stderr,
    )
    return 1


FINAL = ("sent", "failed", "dead", "cancelled", "skipped", "expired", "held", "digested")


def _scrubber(settings: Settings) -> Scrubber:
    return Scrubber(settings.secret_values(), settings.secret_pairs())


def _when(value: Any) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S.%f}"[:-3] if isinstance(value, dt.datetime) else str(value)


def cmd_show(settings: Settings, args: argparse.Namespace) -> int:
    async def go(conn: asyncpg.Connection) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        row = await conn.fetchrow(queries.SHOW_NOTIFICATION, args.id)
        if row is None:
            return None, []
        steps = [dict(r) for r in await conn.fetch(queries.SHOW_TIMELINE, args.id)]
        return dict(row), steps

    with database(settings) as (dsn, _embedded):
        row, steps = asyncio.run(_with_conn(dsn, go, settings.statement_cache_size))
    if row is None:
        print(f"notification {args.id} does not exist", file=sys.stderr)
        return 1
    scrub = _scrubber(settings)
    row, steps = scrub.tree(row), scrub.tree(steps)
    if args.json:
        print(json.dumps({"notification": row, "timeline": steps}, default=str, indent=2))
        return 0
    width = max(len(k) for k in row)
    for key, value in row.items():
        if value is None or value in ("", {}):
            continue
        text = json.dumps(value) if isinstance(value, dict | list) else _when(value)
        print(f"{key:<{width}}  {text}")
    print("\ntimeline:")
    for step in steps:
        extra = "  ".join(
            str(part)
            for part in (
                step["provider"],
                f"{step['duration_ms']:.1f}ms" if step["duration_ms"] is not None else None,
                step["error"],
            )
            if part
        )
        attempt = f"attempt {step['attempt']}" if step["attempt"] else ""
        print(f"  {_when(step['at'])}  {step['event']:<16} {attempt:<10} {extra}".rstrip())
    return 0


def _event_line(e: dict[str, Any]) -> str:
    parts = [
        _when(e["created_at"]),
        f"#{e['notification_id']}",
        e["channel"],
        e["event"],
        f"attempt {e['attempt']}" if e["attempt"] else "",
        e["provider"] or "",
        f"{e['duration_ms']:.1f}ms" if e["duration_ms"] is not None else "",
        e["error"] or "",
    ]
    return "  ".join(p for p in parts if p)


def cmd_tail(settings: Settings, args: argparse.Namespace) -> int:
    """Print events as they are written, until Ctrl-C, --count events or --timeout seconds."""
    scrub = _scrubber(settings)

    async def go(conn: asyncpg.Connection) -> int:
        cursor: int = await conn.fetchval(queries.EVENTS_CURSOR)
        if args.last:
            cursor = max(0, cursor - args.last)
        print(f"following events after #{cursor} (Ctrl-C stops)", file=sys.stderr, flush=True)
        seen = 0
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        while args.count is None or seen < args.count:
            limit = 500 if args.count is None else min(500, args.count - seen)
            rows = await conn.fetch(queries.EVENTS_AFTER, cursor, limit)
            for r in rows:
                event = scrub.tree(dict(r))
                line = json.dumps(event, default=str) if args.json else _event_line(event)
                print(line, flush=True)
                cursor = r["id"]
                seen += 1
            if rows:
                continue
            if deadline is not None and time.monotonic() >= deadline:
                break
            await asyncio.sleep(args.interval)
        return seen

    with database(settings) as (dsn, _embedded):
        asyncio.run(_with_conn(dsn, go, settings.statement_cache_size))
    return 0


def _since(text: str | None) -> dt.datetime | None:
    """--since: an ISO time with a zone, or a duration back from now (30m, 2h, 7d)."""
    if text is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=float(text[:-1]) * units[text[-1]])
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since {text!r}: give 30m, 2h, 7d or an ISO time with zone") from None
    if when.tzinfo is None:
        raise ConfigError("--since needs a time zone, e.g. 2030-01-01T09:00:00+00:00")
    return when


def cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
    statuses = args.status or ["failed", "dead"]
    filters = (statuses, args.channel, args.category, _since(args.since), args.limit)

    async def go(conn: asyncpg.Connection) -> list[dict[str, Any]]:
        if args.dry_run:
            return [dict(r) for r in await conn.fetch(queries.REPLAY_CANDIDATES, *filters)]
        async with conn.transaction():
            return [dict(r) for r in await conn.fetch(queries.REPLAY, *filters)]

    with database(settings) as (dsn, _embedded):
        rows = asyncio.run(_with_conn(dsn, go, settings.statement_cache_size))
    if args.dry_run:
        scrub = _scrubber(settings)
        for r in rows:
            error = scrub.clean(r["last_error"] or "")
            print(f"#{r['id']}  {r['channel']:<8} {r['status']:<7} {r['category'] or '-'}  {error}")
        print(f"would requeue {len(rows)} notification(s)")
        return 0
    done = [r["id"] for r in rows if r["requeued"]]
    print(f"requeued {len(done)} notification(s)" + (f": {_ids(done)}" if done else ""))
    return 0


def _ids(ids: list[int]) -> str:
    shown = ", ".join(str(i) for i in ids[:20])
    return shown + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")


def _days(text: str) -> dt.timedelta:
    try:
        days = float(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a number of days") from None
    if days < 0:
        raise ConfigError("a retention period cannot be negative")
    return dt.timedelta(days=days)


def cmd_purge(settings: Settings, args: argparse.Namespace) -> int:
    keep, keep_dead = _days(args.keep_days), _days(args.keep_dead_days)
    runs: list[int] = []  # finished workflow runs deleted, per batch (schema 0024)

    async def go(conn: asyncpg.Connection) -> tuple[list[dict[str, Any]], int, list[str]]:
        preview = [dict(r) for r in await conn.fetch(queries.PURGE_PREVIEW, keep, keep_dead)]
        if args.dry_run:
            runs.append(await conn.fetchval(queries.PURGE_PREVIEW_RUNS, keep, keep_dead))
            return preview, 0, []
        removed: list[int] = []
        dropped: list[str] = []

        def on_notice(_conn: object, message: object) -> None:
            text = str(getattr(message, "message", ""))
            if text.startswith("pgnotify retention:"):
                removed.append(int(text.split(":", 1)[1].split(maxsplit=1)[0]))
            elif text.startswith("pgnotify workflow runs deleted:"):
                runs.append(int(text.rsplit(" ", 1)[1]))
            elif text.startswith("pgnotify: dropped event partition "):
                dropped.append(text.rsplit(" ", 1)[1])

        conn.add_log_listener(on_notice)
        try:
            await conn.execute(queries.PURGE, keep, keep_dead)
        finally:
            conn.remove_log_listener(on_notice)
        return preview, sum(removed), dropped

    with database(settings) as (dsn, _embedded):
        preview, removed, dropped = asyncio.run(_with_conn(dsn, go, settings.statement_cache_size))
    # Events are not deleted row by row: a day of them goes as one partition once it is older
    # than both periods (schema 0021), so say what went, not "and their events".
    if args.dry_run:
        for r in preview:
            print(f"{r['status']:<10} {r['rows']:>8}")
        print(f"would delete {sum(r['rows'] for r in preview)} notification(s)")
        print(f"would delete {sum(runs)} finished workflow run(s)")
        return 0
    print(f"deleted {removed} notification(s)")
    if runs:
        print(f"deleted {sum(runs)} finished workflow run(s)")
    for name in dropped:
        print(f"dropped events partition {name} (every event in it older than the retention)")
    return 0


TEST_TEXT = "This is a test notification from pgnotify-worker send-test."


def cmd_send_test(settings: Settings, args: argparse.Namespace) -> int:
    """Enqueue one test notification and wait for a running worker to deliver it."""

    async def go(conn: asyncpg.Connection) -> tuple[int, dict[str, Any] | None, str | None]:
        nid: int = await conn.fetchval(
            queries.ENQUEUE,
            args.channel,
            args.to,
            None,
            {"test": True},
            "pgnotify-worker test",
            TEST_TEXT,
            None,
            None,
            "test",
            None,
            0,
            None,
            args.max_attempts,
            None,
        )
        print(f"enqueued notification {nid}; waiting up to {args.timeout:g}s for a worker")
        reported = None
        scrub = _scrubber(settings)

        async def outcome() -> dict[str, Any]:
            found = await conn.fetchrow(queries.OUTCOME, nid)
            assert found is not None  # we just made it; nothing deletes a queued row
            return dict(found)

        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            row = await outcome()
            if row["status"] in FINAL:
                return nid, row, None
            if row["last_error"] and row["last_error"] != reported:
                reported = row["last_error"]
                print(f"attempt {row['attempts']} failed, retrying: {scrub.clean(reported)}")
            await asyncio.sleep(0.2)
        return nid, None, (await outcome())["status"]

    with database(settings) as (dsn, _embedded):
        nid, row, pending = asyncio.run(_with_conn(dsn, go, settings.statement_cache_size))
    if row is None:
        print(
            f"notification {nid} is still {pending} after {args.timeout:g}s: is a worker running "
            f"for this database and channel? (`{command()} status`, `{command()} show {nid}`)",
            file=sys.stderr,
        )
        return 1
    via = f" via {row['provider']}" if row["provider"] else ""
    error = f": {_scrubber(settings).clean(row['last_error'])}" if row["last_error"] else ""
    print(f"notification {nid}: {row['status']}{via} after {row['attempts']} attempt(s){error}")
    return 0 if row["status"] == "sent" else 1


def psql_target(dsn: str) -> tuple[str, str | None]:
    """The DSN psql is given (no password in it) and the password, which goes through the
    PGPASSWORD environment variable instead: never on a command line or the screen."""
    parts = urllib.parse.urlsplit(dsn)
    password = parts.password
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, hostinfo = netloc.rsplit("@", 1)
        netloc = userinfo.split(":", 1)[0] + "@" + hostinfo
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    for key, value in query:
        if key == "password":
            password = value
    kept = urllib.parse.urlencode([(k, v) for k, v in query if k != "password"], safe="/")
    clean = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, kept, parts.fragment))
    return clean, urllib.parse.unquote(password) if password else None


def cmd_psql(settings: Settings, args: argparse.Namespace) -> int:
    """Open psql on the configured database (starting the embedded one if needed)."""
    extra = list(args.psql_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    with database(settings) as (dsn, embedded):
        binary = embedded.psql if embedded else (shutil.which("psql") or "")
        if not binary or not Path(binary).exists():
            raise ConfigError("psql is not installed (Debian: apt-get install postgresql-client)")
        target, password = psql_target(dsn)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGNOTIFY_")}
        env.pop("PGPASSWORD", None)
        if password is not None:
            env["PGPASSWORD"] = password
        proc = subprocess.Popen([binary, target, *extra], env=env)  # noqa: S603 - our argv
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to psql
        try:
            return proc.wait()
        finally:
            signal.signal(signal.SIGINT, previous)


CHANNEL_CHOICES = ["email", "sms", "push", "webhook", "inapp"]


def parser() -> argparse.ArgumentParser:
    """The argument parser (also used to document the CLI)."""
    p = argparse.ArgumentParser(
        prog="pgnotify-worker",
        description="Postgres-native notification delivery. Settings come from PGNOTIFY_* "
        "variables; without PGNOTIFY_DATABASE_URL every command uses the embedded PostgreSQL "
        "in PGNOTIFY_DATA_DIR (default ./.pgnotify), starting it when it is not running.",
    )
    p.add_argument("--version", action="version", version=__version__, help="print the version")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser(
        "run", help="run the worker (embedded PostgreSQL when PGNOTIFY_DATABASE_URL is unset)"
    )
    r.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="N worker processes, one per core (default PGNOTIFY_PROCESSES, 1)",
    )
    m = sub.add_parser("migrate", help="apply pending schema migrations")
    m.add_argument(
        "--dry-run", action="store_true", help="list the pending migrations, apply nothing"
    )

    e = sub.add_parser("enqueue", help="enqueue one notification through pgnotify.enqueue()")
    e.add_argument("--channel", required=True, choices=CHANNEL_CHOICES, help="delivery channel")
    e.add_argument("--to", help="recipient: address, phone, token, URL or user id")
    e.add_argument("--template", help="key of a template in pgnotify.templates")
    e.add_argument("--subject", help="inline subject (a Jinja2 template; overrides the template's)")
    e.add_argument("--body", help="inline text body (a Jinja2 template)")
    e.add_argument("--html", help="inline HTML body (a Jinja2 template)")
    e.add_argument("--payload", default="{}", help="JSON object of template variables")
    e.add_argument("--user-id", help="the user it is about (recipient of in-app; preferences)")
    e.add_argument("--category", help="category, e.g. billing (preferences, digests, consent)")
    e.add_argument("--locale", help="locale for the template, e.g. fr-CA")
    e.add_argument("--priority", type=int, default=0, help="higher is sent first (default 0)")
    e.add_argument("--at", help="send at this ISO time (with zone)")
    e.add_argument("--delay", type=float, help="send this many seconds from now (database clock)")
    e.add_argument("--max-attempts", type=int, help="retry budget (default 10)")
    e.add_argument("--idempotency-key", help="the same key again returns the same id, no new row")

    s = sub.add_parser("status", help="queue status per channel and recent errors")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")

    show = sub.add_parser("show", help="one notification: its fields and its timeline")
    show.add_argument("id", type=int, help="notification id")
    show.add_argument("--json", action="store_true", help="print JSON")

    t = sub.add_parser("tail", help="print delivery events as they happen (Ctrl-C stops)")
    t.add_argument("--count", type=int, help="stop after this many events")
    t.add_argument("--timeout", type=float, help="stop after this many seconds")
    t.add_argument("--last", type=int, default=0, help="start with the last N events (default 0)")
    t.add_argument("--interval", type=float, default=0.25, help="seconds between polls")
    t.add_argument("--json", action="store_true", help="one JSON object per line")

    c = sub.add_parser("cancel", help="cancel a queued or scheduled notification")
    c.add_argument("id", type=int, help="notification id")
    r = sub.add_parser("retry", help="requeue a failed or dead notification")
    r.add_argument("id", type=int, help="notification id")

    rp = sub.add_parser(
        "replay", help="requeue failed/dead notifications in bulk, chosen by filters"
    )
    rp.add_argument(
        "--status",
        action="append",
        choices=["failed", "dead"],
        help="status to replay (repeatable; default both)",
    )
    rp.add_argument("--channel", choices=CHANNEL_CHOICES, help="only this channel")
    rp.add_argument("--category", help="only this category")
    rp.add_argument("--since", help="only rows that ended since: 30m, 2h, 7d or an ISO time")
    rp.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    rp.add_argument("--dry-run", action="store_true", help="list what would be requeued")

    pg = sub.add_parser("purge", help="apply retention now: delete old finished rows")
    pg.add_argument(
        "--keep-days", default="30", help="keep sent/cancelled/skipped/... rows this many days"
    )
    pg.add_argument(
        "--keep-dead-days", default="90", help="keep failed and dead rows this many days"
    )
    pg.add_argument(
        "--dry-run",
        action="store_true",
        help="count the notifications and finished workflow runs that would be deleted",
    )

    st = sub.add_parser(
        "send-test",
        help="enqueue a test notification and wait for a running worker's outcome "
        "(checks a provider's configuration end to end)",
    )
    st.add_argument("--channel", required=True, choices=CHANNEL_CHOICES, help="channel to test")
    st.add_argument("--to", required=True, help="recipient: address, phone, token, URL or user id")
    st.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default 30)")
    st.add_argument(
        "--max-attempts", type=int, default=1, help="attempts before it counts as failed (1)"
    )

    q = sub.add_parser(
        "psql",
        help="open psql on the configured database (the password goes through PGPASSWORD)",
    )
    q.add_argument(
        "psql_args", nargs=argparse.REMAINDER, help="arguments for psql, e.g. -c 'SELECT 1'"
    )
    return p


COMMANDS = {
    "migrate": cmd_migrate,
    "enqueue": cmd_enqueue,
    "status": cmd_status,
    "show": cmd_show,
    "tail": cmd_tail,
    "replay": cmd_replay,
    "purge": cmd_purge,
    "send-test": cmd_send_test,
    "psql": cmd_psql,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["psql"] and argv[1:2] not in (["-h"], ["--help"]):
        args = argparse.Namespace(command="psql", psql_args=argv[1:])  # psql's options, as given
    else:
        args = parser().parse_args(argv)
    try:
        settings = load_settings()
        assert settings.worker_id is not None
        if args.command == "run":
            level, fmt = settings.log_level, settings.log_format
        else:  # a person reads this: quiet unless something is wrong, unless told otherwise
            chosen = settings.model_fields_set
            level = settings.log_level if "log_level" in chosen else "WARNING"
            fmt = settings.log_format if "log_format" in chosen else "text"
        setup_logging(level, fmt, settings.worker_id, _scrubber(settings))
        if args.command == "run":
            if args.processes is not None:
                if args.processes < 1:
                    raise ConfigError("--processes must be at least 1")
                settings.processes = args.processes
            return cmd_run(settings)
        if args.command == "cancel":
            return cmd_cancel_or_retry(settings, args, queries.CANCEL, "cancelled")
        if args.command == "retry":
            return cmd_cancel_or_retry(settings, args, queries.RETRY, "requeued")
        return COMMANDS[args.command](settings, args)
    except ConfigError as exc:
        print(f"pgnotify-worker: {exc}", file=sys.stderr)
        return 2
    except asyncpg.PostgresError as exc:
        message = getattr(exc, "message", None) or str(exc).split("\n", 1)[0]
        detail = f"\n  detail: {exc.detail}" if getattr(exc, "detail", None) else ""
        hint = f"\n  hint: {exc.hint}" if getattr(exc, "hint", None) else ""
        print(f"pgnotify-worker: {message}{detail}{hint}", file=sys.stderr)
        return 1
    except PgnotifyError as exc:
        print(f"pgnotify-worker: {exc}", file=sys.stderr)
        return 1
    except db.DB_UNAVAILABLE as exc:
        print(f"pgnotify-worker: cannot reach the database: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
