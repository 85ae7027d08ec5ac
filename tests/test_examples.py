"""The producer examples in examples/ (psql, Node.js, asyncpg, psycopg), run as the README says,
against a running worker: a committed enqueue is delivered, a rolled-back one never exists."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

from pgnotify_worker.config import Settings
from pgnotify_worker.service import Service
from tests.support.db import wait_rows
from tests.support.pgcluster import find_bindir
from tests.support.webhooks import WebhookSink
from tests.support.worker import running

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
RUN_TIMEOUT = 30.0


def psql_binary() -> str:
    found = shutil.which("psql")
    if found:
        return found
    try:
        candidate = find_bindir() / "psql"
    except RuntimeError:
        pytest.skip("psql is not installed (Debian: postgresql-client)")
    if not candidate.exists():
        pytest.skip("psql is not installed (Debian: postgresql-client)")
    return str(candidate)


def node_producer() -> list[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Node.js producer example needs Node >= 18.3")
    if not (EXAMPLES / "node" / "node_modules" / "pg").is_dir():
        pytest.skip(
            "examples/node/node_modules is missing: run `npm ci --prefix examples/node` first"
        )
    return [node, str(EXAMPLES / "node" / "producer.js")]


PRODUCERS: dict[str, Callable[[], list[str]]] = {
    "node": node_producer,
    "asyncpg": lambda: [sys.executable, str(EXAMPLES / "python" / "producer_asyncpg.py")],
    "psycopg": lambda: [sys.executable, str(EXAMPLES / "python" / "producer_psycopg.py")],
}


async def run(argv: list[str], dsn: str, timeout: float = RUN_TIMEOUT) -> tuple[int, str, str]:
    """Run a producer to completion (bounded); returns (exit code, stdout, stderr)."""
    env = {**os.environ, "DATABASE_URL": dsn}
    for name in ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD", "PGSERVICE"):
        env.pop(name, None)  # only the URL says where the database is
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{argv} did not finish in {timeout}s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def psql(dsn: str, script: str, **variables: str) -> list[str]:
    argv = [psql_binary(), dsn, "-X", "-q", "-v", "ON_ERROR_STOP=1"]
    for name, value in variables.items():
        argv += ["-v", f"{name}={value}"]
    return [*argv, "-f", str(EXAMPLES / "psql" / script)]


async def rows_with_key(conn: asyncpg.Connection, key: str) -> int:
    return await conn.fetchval(
        "SELECT count(*) FROM pgnotify.notifications WHERE idempotency_key = $1", key
    )


async def settle_with_marker(conn: asyncpg.Connection, sink: WebhookSink, service: Service) -> None:
    """Enqueue a marker after everything else and wait until the worker sent it: by then the
    worker has seen every row committed before it, and nothing may be left to deliver."""
    marker = await conn.fetchval(
        "SELECT pgnotify.enqueue(channel => 'webhook', recipient => $1, idempotency_key => $2)",
        f"{sink.url}/marker",
        f"marker-{uuid.uuid4()}",
    )
    await wait_rows(conn, [marker], {"sent"}, service)
    assert sink.requests[-1].path == "/marker"
    unfinished = await conn.fetchval(
        "SELECT count(*) FROM pgnotify.notifications WHERE status IN ('queued', 'processing')"
    )
    assert unfinished == 0


@pytest.mark.parametrize("producer", list(PRODUCERS))
async def test_producer_commit_is_delivered_and_rollback_never_is(
    producer: str,
    dsn: str,
    conn: asyncpg.Connection,
    webhook_sink: WebhookSink,
    worker_settings: Callable[..., Settings],
) -> None:
    argv = PRODUCERS[producer]()
    committed_key = f"{producer}-commit-{uuid.uuid4()}"
    rolled_back_key = f"{producer}-rollback-{uuid.uuid4()}"
    async with running(worker_settings(channels="webhook")) as service:
        code, out, err = await run(
            [
                *argv,
                *("--recipient", f"{webhook_sink.url}/orders", "--key", committed_key),
                *("--customer", "grace", "--total", "1234"),
            ],
            dsn,
        )
        assert code == 0, err
        result = json.loads(out)
        assert result["committed"] is True
        assert result["idempotency_key"] == committed_key
        (row,) = await wait_rows(conn, [result["id"]], {"sent"}, service)
        assert row["idempotency_key"] == committed_key
        assert row["attempts"] == 1

        code, out, err = await run(
            [
                *argv,
                *("--recipient", f"{webhook_sink.url}/orders", "--key", rolled_back_key),
                *("--customer", "hopper", "--rollback"),
            ],
            dsn,
        )
        assert code == 0, err
        rolled_back = json.loads(out)
        assert rolled_back["committed"] is False
        assert isinstance(rolled_back["id"], int)  # it had an id inside the transaction ...
        assert await rows_with_key(conn, rolled_back_key) == 0  # ... and then never existed
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM demo_orders WHERE id = $1", rolled_back["order_id"]
            )
            == 0
        )  # the application's own write went with it

        await settle_with_marker(conn, webhook_sink, service)

    assert [r.path for r in webhook_sink.requests] == ["/orders", "/marker"]
    delivered = webhook_sink.requests[0]
    assert delivered.headers["webhook-id"] == f"pgn_{row['uid']}"
    body = delivered.json()
    assert body["type"] == "order.placed"
    assert body["data"] == {
        "order_id": result["order_id"],
        "customer": "grace",
        "total_cents": 1234,
    }
    assert await conn.fetchval("SELECT count(*) FROM demo_orders") == 1


@pytest.mark.parametrize("producer", list(PRODUCERS))
async def test_producer_reports_a_refused_enqueue_and_rolls_back(
    producer: str, dsn: str, conn: asyncpg.Connection
) -> None:
    argv = PRODUCERS[producer]()
    code, out, err = await run([*argv, "--recipient", "ftp://example.com/hooks"], dsn)
    assert code == 1, (out, err)
    assert out == ""
    assert "pgnotify: recipient is not a valid http(s) URL" in err
    assert "23514" in err
    assert "expected https://host" in err  # the hint
    assert await conn.fetchval("SELECT count(*) FROM pgnotify.notifications") == 0
    assert await conn.fetchval("SELECT count(*) FROM demo_orders") == 0  # nor the order


async def test_psql_enqueue_is_delivered_and_scheduled_and_a_rollback_never_exists(
    dsn: str,
    conn: asyncpg.Connection,
    webhook_sink: WebhookSink,
    worker_settings: Callable[..., Settings],
) -> None:
    key = f"psql-{uuid.uuid4()}"
    rolled_back_key = f"psql-rollback-{uuid.uuid4()}"
    async with running(worker_settings(channels="webhook,inapp")) as service:
        code, out, err = await run(
            psql(
                dsn,
                "enqueue.sql",
                webhook_url=f"{webhook_sink.url}/psql",
                key=key,
                customer="lin",
                user_id="user-lin",
                remind_in="2 hours",
            ),
            dsn,
        )
        assert code == 0, err
        rows = {
            r["idempotency_key"]: r
            for r in await conn.fetch(
                "SELECT *, run_at - created_at AS delay FROM pgnotify.notifications "
                "WHERE starts_with(idempotency_key, $1)",
                key,
            )
        }
        assert set(rows) == {
            f"{key}-placed",
            f"{key}-notify:webhook",
            f"{key}-notify:inapp",
            f"{key}-reminder",
        }
        placed, to_webhook, to_inbox, reminder = (
            rows[f"{key}-{suffix}"]
            for suffix in ("placed", "notify:webhook", "notify:inapp", "reminder")
        )
        assert f"order {placed['payload']['order_id']}:" in out  # the script's \echo line
        assert to_webhook["group_id"] == to_inbox["group_id"] is not None  # one notify_user call
        await wait_rows(conn, [placed["id"], to_webhook["id"], to_inbox["id"]], {"sent"}, service)

        # the scheduled send waits for its run_at
        assert reminder["status"] == "scheduled"
        assert reminder["delay"] == timedelta(hours=2)

        code, out, err = await run(
            psql(dsn, "rollback.sql", webhook_url=f"{webhook_sink.url}/psql", key=rolled_back_key),
            dsn,
        )
        assert code == 0, err
        assert "enqueued" in out  # it had an id inside the transaction ...
        assert await rows_with_key(conn, rolled_back_key) == 0  # ... and then never existed

        await settle_with_marker(conn, webhook_sink, service)

    order_id = placed["payload"]["order_id"]
    by_id = {r.headers["webhook-id"]: r for r in webhook_sink.requests}
    assert len(webhook_sink.requests) == 3 == len(by_id)  # two webhooks and the marker
    first = by_id[f"pgn_{placed['uid']}"].json()
    assert (first["type"], first["data"]) == (
        "order.placed",
        {"order_id": order_id, "customer": "lin", "total_cents": 4200},
    )
    second = by_id[f"pgn_{to_webhook['uid']}"].json()
    assert (second["type"], second["data"]) == ("orders", {"order_id": order_id})
    assert f"pgn_{reminder['uid']}" not in by_id
    inbox = await conn.fetchrow(
        "SELECT user_id, title FROM pgnotify.inbox WHERE notification_id = $1", to_inbox["id"]
    )
    assert (inbox["user_id"], inbox["title"]) == ("user-lin", f"Order {order_id} confirmed")
    assert await conn.fetchval("SELECT count(*) FROM demo_orders") == 1


async def test_psql_script_without_webhook_url_stops_with_usage(dsn: str) -> None:
    code, _out, err = await run(psql(dsn, "enqueue.sql"), dsn)
    assert code != 0
    assert "usage: psql -v webhook_url=" in err
