"""Command line: run, migrate, enqueue, status, cancel, retry."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import sys
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


def banner(
    settings: Settings, dsn: str, embedded: EmbeddedPostgres | None, secret_file: Path | None
) -> str:
    """What `run` prints first: where things are and how to send a first notification."""
    shown = dsn if embedded else db_display(dsn)
    host = "127.0.0.1" if settings.http_host in ("0.0.0.0", "::") else settings.http_host  # noqa: S104
    providers = " ".join(f"{c}={'+'.join(settings.providers_for(c))}" for c in settings.channels)
    psql = embedded.psql if embedded else "psql"
    example = (
        "SELECT pgnotify.enqueue(channel => 'email', recipient => 'ada@example.com', "
        "subject => 'Hello {{ name }}', body => 'Welcome aboard, {{ name }}!', "
        'payload => \'{"name": "Ada"}\')'
    )
    lines = [
        f"pgnotify-worker {__version__}",
        f"  database   {shown}"
        + (f"  (embedded; data in {embedded.data_dir})" if embedded else ""),
        f"  http       http://{host}:{settings.http_port}/metrics  /healthz  /readyz  /status",
        f"  providers  {providers}",
    ]
    if secret_file:
        lines.append(f"  webhooks   signed with the dev secret in {secret_file}")
    if settings.webhook_allowed_networks:
        lines.append(f"  webhooks   may reach {', '.join(settings.webhook_allowed_networks)}")
    lines.append(f"  try        {psql} '{shown}' -c \"{example}\"")
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
    from pgnotify_worker.service import Service  # noqa: PLC0415 - keeps `--help` fast

    with database(settings) as (dsn, embedded):
        secret_file = None
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
                settings.simulate = True  # trying the project: every channel prints to the console
        print(banner(settings, dsn, embedded, secret_file), flush=True)
        listen_dsn = (
            settings.listen_database_url.get_secret_value()
            if settings.listen_database_url
            else None
        )
        service = Service(settings, dsn, listen_dsn)
        if secret_file is not None:  # the dev secret came after logging was set up: scrub it too
            assert settings.worker_id is not None
            setup_logging(
                settings.log_level, settings.log_format, settings.worker_id, service.scrubber
            )
        asyncio.run(service.run())
    return 0


async def _with_conn(dsn: str, fn: Any, statement_cache_size: int = 100) -> Any:
    conn = await asyncpg.connect(dsn, statement_cache_size=statement_cache_size)
    try:
        await db._init_connection(conn)
        return await fn(conn)
    finally:
        await conn.close()


def cmd_migrate(settings: Settings) -> int:
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


def parser() -> argparse.ArgumentParser:
    """The argument parser (also used to document the CLI)."""
    p = argparse.ArgumentParser(
        prog="pgnotify-worker",
        description="Postgres-native notification delivery. "
        "Settings come from PGNOTIFY_* variables.",
    )
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "run", help="run the worker (embedded PostgreSQL when PGNOTIFY_DATABASE_URL is unset)"
    )
    sub.add_parser("migrate", help="apply pending schema migrations")
    e = sub.add_parser("enqueue", help="enqueue one notification through pgnotify.enqueue()")
    e.add_argument("--channel", required=True, choices=["email", "sms", "push", "webhook", "inapp"])
    e.add_argument("--to", help="recipient: address, phone, token, URL or user id")
    e.add_argument("--template")
    e.add_argument("--subject")
    e.add_argument("--body")
    e.add_argument("--html")
    e.add_argument("--payload", default="{}", help="JSON object of template variables")
    e.add_argument("--user-id")
    e.add_argument("--category")
    e.add_argument("--locale")
    e.add_argument("--priority", type=int, default=0)
    e.add_argument("--at", help="send at this ISO time (with zone)")
    e.add_argument("--delay", type=float, help="send this many seconds from now (database clock)")
    e.add_argument("--max-attempts", type=int)
    e.add_argument("--idempotency-key")
    s = sub.add_parser("status", help="queue status per channel and recent errors")
    s.add_argument("--json", action="store_true")
    c = sub.add_parser("cancel", help="cancel a queued or scheduled notification")
    c.add_argument("id", type=int)
    r = sub.add_parser("retry", help="requeue a failed or dead notification")
    r.add_argument("id", type=int)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings()
        assert settings.worker_id is not None
        setup_logging(
            settings.log_level,
            settings.log_format,
            settings.worker_id,
            Scrubber(settings.secret_values(), settings.secret_pairs()),
        )
        if args.command == "run":
            return cmd_run(settings)
        if args.command == "migrate":
            return cmd_migrate(settings)
        if args.command == "enqueue":
            return cmd_enqueue(settings, args)
        if args.command == "status":
            return cmd_status(settings, args)
        if args.command == "cancel":
            return cmd_cancel_or_retry(settings, args, queries.CANCEL, "cancelled")
        if args.command == "retry":
            return cmd_cancel_or_retry(settings, args, queries.RETRY, "requeued")
    except ConfigError as exc:
        print(f"pgnotify-worker: {exc}", file=sys.stderr)
        return 2
    except asyncpg.PostgresError as exc:
        hint = f"\n  hint: {exc.hint}" if getattr(exc, "hint", None) else ""
        print(f"pgnotify-worker: {exc}{hint}", file=sys.stderr)
        return 1
    except PgnotifyError as exc:
        print(f"pgnotify-worker: {exc}", file=sys.stderr)
        return 1
    except db.DB_UNAVAILABLE as exc:
        print(f"pgnotify-worker: cannot reach the database: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2
