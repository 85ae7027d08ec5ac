"""The command line as an operator uses it: migrate, enqueue, status, cancel, retry, bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import pytest

from tests.support.cli import ALL_VERSIONS, cli
from tests.support.pgcluster import free_port


async def test_migrate_enqueue_status_cancel_retry(empty_dsn: str) -> None:
    env = {"PGNOTIFY_DATABASE_URL": empty_dsn}
    first = cli("migrate", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"applied migrations: {ALL_VERSIONS}"
    assert cli("migrate", env=env).stdout.strip() == "schema is up to date"

    made = cli(
        "enqueue", "--channel", "email", "--to", "ada@example.com", "--subject", "Hi",
        "--body", "Hello {{ name }}", "--payload", '{"name": "Ada"}', "--delay", "3600",
        env=env,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    nid = int(made.stdout)

    status = cli("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    email = next(row for row in json.loads(status.stdout)["queue"] if row["channel"] == "email")
    assert email["scheduled"] == 1
    table = cli("status", env=env).stdout
    assert "channel" in table.splitlines()[0] and "webhook" in table

    assert cli("cancel", str(nid), env=env).stdout.strip() == f"notification {nid} cancelled"
    again = cli("cancel", str(nid), env=env)
    assert again.returncode == 1 and "was not cancelled" in again.stderr

    conn = await asyncpg.connect(empty_dsn)
    try:
        other = await conn.fetchval(
            "SELECT pgnotify.enqueue('email', 'a@b.co', subject => 'Hi', body => 'x')"
        )
        await conn.execute("UPDATE pgnotify.notifications SET status = 'dead' WHERE id = $1", other)
        assert cli("retry", str(other), env=env).returncode == 0
        assert (
            await conn.fetchval("SELECT status FROM pgnotify.notifications WHERE id = $1", other)
            == "queued"
        )
    finally:
        await conn.close()


async def test_enqueue_reports_the_database_error_clearly(dsn: str) -> None:
    env = {"PGNOTIFY_DATABASE_URL": dsn}
    bad = cli("enqueue", "--channel", "email", "--to", "not-an-address", "--body", "x", env=env)
    assert bad.returncode == 1
    assert "pgnotify: recipient is not a valid email address" in bad.stderr
    assert "hint: expected local@domain.tld" in bad.stderr
    assert bad.stderr.count("expected local@domain.tld") == 1  # the hint once, no log lines
    assert bad.stderr.startswith("pgnotify-worker: pgnotify: recipient")
    nul = cli(
        "enqueue",
        "--channel",
        "email",
        "--to",
        "a@b.co",
        "--subject",
        "Hi",
        "--body",
        "a\x01b",
        env=env,
    )
    assert nul.returncode == 0  # control characters in a body are content, not an error
    payload = cli(
        "enqueue",
        "--channel",
        "email",
        "--to",
        "a@b.co",
        "--body",
        "x",
        "--payload",
        "[1]",
        env=env,
    )
    assert payload.returncode == 2 and "--payload must be a JSON object" in payload.stderr


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("PGNOTIFY_HTTP_PORT", "abc", "PGNOTIFY_HTTP_PORT"),
        ("PGNOTIFY_CHANNELS", "email,fax", "unknown channel(s) fax"),
        ("PGNOTIFY_CHANNEL_CONCURRENCY", "webhook", "is not channel=number"),
        ("PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS", "10.0.0.0/33", "PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS"),
        ("PGNOTIFY_DATABASE_URL", "mysql://user:SecretPw@host/db", "must start with postgresql://"),
        ("PGNOTIFY_EMAIL_PROVIDERS", "webhook", "cannot deliver email"),
    ],
)
def test_an_unusable_setting_exits_2_naming_it(
    name: str, value: str, expected: str, dsn: str
) -> None:
    env = {"PGNOTIFY_DATABASE_URL": dsn, "PGNOTIFY_HTTP_PORT": str(free_port()), name: value}
    result = cli("run", env=env, timeout=30)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "SecretPw" not in result.stderr


def test_an_unreachable_database_is_reported(tmp_path: Path) -> None:
    env = {"PGNOTIFY_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/x"}
    result = cli("status", env=env)
    assert result.returncode == 1
    assert "cannot reach the database" in result.stderr


def test_a_missing_database_stops_the_worker_at_once(pg_server: object) -> None:
    dsn = pg_server.dsn("no_such_database")  # type: ignore[attr-defined]
    result = cli("run", env={"PGNOTIFY_DATABASE_URL": dsn, "PGNOTIFY_HTTP_PORT": "0"}, timeout=30)
    assert result.returncode == 2
    assert 'database "no_such_database" does not exist' in result.stderr


@pytest.mark.slow
def test_embedded_database_when_no_url_is_set(tmp_path: Path) -> None:
    env = {"PGNOTIFY_DATA_DIR": str(tmp_path / "pgn")}
    migrated = cli("migrate", env=env, timeout=120)
    assert migrated.returncode == 0, migrated.stderr
    assert f"applied migrations: {ALL_VERSIONS}" in migrated.stdout
    made = cli(
        "enqueue", "--channel", "inapp", "--user-id", "u1", "--body", "hi", env=env, timeout=120
    )
    assert made.returncode == 0, made.stderr
    assert made.stderr == ""  # quiet unless something is wrong: no "starting embedded" log line
    status = cli("status", "--json", env=env, timeout=120)
    inapp = next(r for r in json.loads(status.stdout)["queue"] if r["channel"] == "inapp")
    assert inapp["ready"] == 1  # the data persisted between runs
    assert (tmp_path / "pgn" / "pgdata" / "PG_VERSION").exists()


def test_help_of_every_command_documents_every_argument() -> None:
    """`--help` works (it needs no database) and no argument goes without a help text."""
    import argparse

    from pgnotify_worker.cli import parser

    top = cli("--help")
    assert top.returncode == 0, top.stderr
    root = parser()
    commands = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        shown = cli(name, "--help")
        assert shown.returncode == 0, (name, shown.stderr)
        for action in sub._actions:
            assert action.help, f"`{name} {action.option_strings or action.dest}` has no help"
        assert name in top.stdout


def test_the_run_banner_hides_the_password_and_its_commands_paste() -> None:
    import shlex

    from pgnotify_worker.cli import banner, parser
    from pgnotify_worker.config import load_settings

    settings = load_settings(database_url="postgresql://app:S3cretPw@db:5432/app", simulate=True)
    text = banner(settings, "postgresql://app:S3cretPw@db:5432/app", None, None)
    assert "S3cretPw" not in text
    assert "webhook=console inapp=inapp" in text  # simulating: in-app still writes the inbox
    assert "signed with" not in text and "may reach" not in text  # no webhook provider runs
    commands = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("  try")]
    commands += [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("  psql")]
    assert len(commands) == 2
    for command in commands:
        argv = shlex.split(command)  # what a POSIX shell makes of the pasted line
        assert argv[0].endswith("pgnotify-worker") or argv[1:3] == ["-m", "pgnotify_worker"]
        rest = argv[1:] if argv[0].endswith("pgnotify-worker") else argv[3:]
        if rest[0] != "psql":
            args = parser().parse_args(rest)
            assert json.loads(args.payload) == {"name": "Ada"}
            assert args.subject == "Hello {{ name }}"
