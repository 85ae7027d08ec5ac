"""Admin console page times with a large notifications table: the server's time for each page
(its Server-Timing header: handler, queries and template rendering; not the network), median and
worst of several loads, against the issue's target of 200 ms. Not a test.

    python -m bench.console           # 1,000,000 notifications, 7 loads of each page
    python -m bench.console --smoke   # 20,000 notifications, 3 loads (never fails on a time)

The table is filled like a busy month: rows spread over 30 days (about 1,400 finishing in the
last hour), 90 % sent, 2 % dead or failed (20 distinct errors), 1 % queued, 1 % scheduled, the rest
cancelled or skipped; 50,000 users; five events for one row in ten."""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import time
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from bench.run import DURABLE, machine
from pgnotify_worker.adapters import db, http_server, migrate
from pgnotify_worker.adapters.console import Console
from pgnotify_worker.adapters.console.auth import Password
from tests.support.pgcluster import TempCluster

TARGET_MS = 200.0
PASSWORD = "bench-password"

FILL = """
INSERT INTO pgnotify.notifications (channel, recipient, user_id, category, template, subject,
    body, payload, priority, status, attempts, max_attempts, run_at, created_at, updated_at,
    sent_at, last_error)
SELECT ch, CASE ch WHEN 'email' THEN 'user' || (g % 50000) || '@example.com'
                  WHEN 'sms' THEN '+1555' || lpad((g % 50000)::text, 7, '0')
                  WHEN 'webhook' THEN 'https://hooks.example.com/u/' || (g % 50000)
                  ELSE 'user-' || (g % 50000) END,
       'user-' || (g % 50000), (ARRAY['billing','security','news','orders'])[1 + g % 4],
       NULL, 'Your order ' || g, 'Hello, order ' || g || ' shipped.',
       jsonb_build_object('order', g, 'name', 'User ' || (g % 50000)), 0, st,
       CASE WHEN st IN ('dead', 'failed') THEN 5 ELSE 1 END, 5,
       at, at - interval '2 seconds', at, CASE WHEN st = 'sent' THEN at END,
       CASE WHEN st IN ('dead', 'failed') THEN 'http_503: upstream error #' || (g % 20) END
FROM (
    SELECT g, (ARRAY['email','sms','push','webhook','inapp'])[1 + g % 5] AS ch,
           CASE WHEN g % 100 < 90 THEN 'sent' WHEN g % 100 < 91 THEN 'dead'
                WHEN g % 100 < 92 THEN 'failed' WHEN g % 100 < 93 THEN 'queued'
                WHEN g % 100 < 94 THEN 'scheduled' WHEN g % 100 < 97 THEN 'cancelled'
                ELSE 'skipped' END AS st,
           now() - (($2::float8 - g) / $2::float8) * interval '30 days' AS at
    FROM generate_series($1::bigint, $1::bigint + $3 - 1) g
) x
"""

EVENTS = """
INSERT INTO pgnotify.events (notification_id, event, attempt, worker, provider, duration_ms,
                             error_code, error, created_at)
SELECT n.id, e.event, 1, 'bench', 'resend', 42, NULL, NULL, n.updated_at
FROM pgnotify.notifications n
CROSS JOIN (VALUES ('claimed'), ('sent'), ('delivered'), ('opened'), ('clicked')) AS e(event)
WHERE n.id % 10 = 0
"""


async def fill(conn: asyncpg.Connection, rows: int) -> None:
    await conn.execute("SET session_replication_role = replica")  # no per-row triggers
    chunk = 200_000
    for start in range(1, rows + 1, chunk):
        await conn.execute(FILL, start, rows, min(chunk, rows - start + 1))
    await conn.execute(EVENTS)
    await conn.execute(
        "INSERT INTO pgnotify.templates (key, channel, subject, body) VALUES "
        "('order_shipped', 'email', 'Order {{ order }} shipped', 'Hello {{ name }}!')"
    )
    await conn.execute(
        "INSERT INTO pgnotify.contacts (user_id, email, phone) "
        "SELECT 'user-' || g, 'user' || g || '@example.com', '+1555' || lpad(g::text, 7, '0') "
        "FROM generate_series(0, 49999) g"
    )
    await conn.execute("RESET session_replication_role")
    await conn.execute("VACUUM ANALYZE")


async def page_times(url: str, pages: list[tuple[str, str]], loads: int) -> list[dict[str, Any]]:
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.get(f"{url}/console/login") as r:
            found = re.search(r'name="csrf" value="([^"]+)"', await r.text())
        assert found is not None
        async with http.post(
            f"{url}/console/login", data={"csrf": found.group(1), "password": PASSWORD}
        ) as r:
            assert r.status == 200, r.status
        out = []
        for name, path in pages:
            times = []
            for _ in range(loads + 1):  # the first load warms caches and is not counted
                async with http.get(url + path) as r:
                    await r.read()
                    assert r.status == 200, (path, r.status)
                    timing = r.headers["Server-Timing"]
                times.append(float(timing.split("dur=", 1)[1]))
            times = times[1:]
            out.append(
                {"page": name, "path": path, "median": statistics.median(times), "max": max(times)}
            )
        return out


async def run(rows: int, loads: int) -> tuple[list[dict[str, Any]], str, float]:
    cluster = TempCluster(settings=DURABLE).start()
    runner: web.AppRunner | None = None
    try:
        admin = await asyncpg.connect(cluster.dsn())
        await admin.execute("CREATE DATABASE console")
        await admin.close()
        dsn = cluster.dsn("console")
        conn = await asyncpg.connect(dsn)
        await migrate.migrate(conn)
        started = time.perf_counter()
        await fill(conn, rows)
        fill_s = time.perf_counter() - started
        version = await conn.fetchval("SHOW server_version")
        sample = await conn.fetchrow(
            "SELECT id, user_id, recipient FROM pgnotify.notifications "
            "WHERE status = 'dead' ORDER BY id DESC LIMIT 1"
        )
        assert sample is not None
        middle = rows // 2
        await conn.close()
        pool = await db.create_pool(dsn, min_size=1, max_size=4)
        console = Console(
            Password("PGNOTIFY_CONSOLE_ADMIN_PASSWORD", PASSWORD),
            None,
            pool=lambda: pool,
            listen_dsn=dsn,
        )

        async def nothing() -> dict[str, Any]:
            return {}

        async def ready() -> list[str]:
            return []

        app = http_server.make_app(nothing, ready, lambda: b"", (console.routes,))
        runner, port = await http_server.start(app, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{port}"
        user = sample["user_id"]
        pages = [
            ("overview", "/console/"),
            ("notifications, newest", "/console/notifications"),
            ("notifications, page at the middle id", f"/console/notifications?before={middle}"),
            ("?status=dead", "/console/notifications?status=dead"),
            ("?channel=sms&status=queued", "/console/notifications?channel=sms&status=queued"),
            ("?category=security", "/console/notifications?category=security"),
            ("?q=<user id>", f"/console/notifications?q={user}"),
            ("?q=<recipient>", f"/console/notifications?q={sample['recipient']}"),
            ("?q=<id>", f"/console/notifications?q={sample['id']}"),
            ("detail", f"/console/notifications/{sample['id']}"),
            ("detail, id with events", f"/console/notifications/{middle - middle % 10}"),
            ("dead letters", "/console/dead-letters"),
            ("templates", "/console/templates"),
            (
                "template preview",
                "/console/templates/order_shipped?payload=%7B%22order%22%3A1%2C%22name%22%3A%22A%22%7D",
            ),
            ("recipient", f"/console/recipients?user={user}"),
        ]
        results = await page_times(url, pages, loads)
        await pool.close()
    finally:
        if runner is not None:
            await runner.cleanup()
        cluster.destroy()
    return results, version, fill_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rows", type=int, default=None)
    args = parser.parse_args()
    rows = args.rows or (20_000 if args.smoke else 1_000_000)
    loads = 3 if args.smoke else 7
    results, version, fill_s = asyncio.run(run(rows, loads))
    lines = [f"## Console page times, {rows:,} notifications", ""]
    lines += [f"- {k}: {v}" for k, v in machine().items()]
    lines += [
        f"- postgresql: {version} (throwaway cluster, fsync on); table filled in {fill_s:.0f} s",
        f"- server time per page (Server-Timing), {loads} loads after one warm-up; "
        f"target < {TARGET_MS:.0f} ms",
        "",
        "| page | median ms | worst ms | under target |",
        "|---|---:|---:|:-:|",
    ]
    for r in results:
        ok = "yes" if r["max"] < TARGET_MS else "**no**"
        lines.append(f"| {r['page']} | {r['median']:.1f} | {r['max']:.1f} | {ok} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
