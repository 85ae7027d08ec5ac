"""pgnotify-worker beside pgqueuer (the `bench` extra): same PostgreSQL server, same loopback HTTP
receiver (bench/sink.py), one HTTP POST per notification/job, runs interleaved (ours, theirs,
ours, theirs, ...). Prints a table with the machine, the medians and the ratios.

    python -m bench.pgqueuer_compare             # 3 drains of 25,000 each side, latency at 200/s
    python -m bench.pgqueuer_compare --smoke     # seconds; skips politely without pgqueuer
    python -m bench.pgqueuer_compare --processes 2   # our side as `run --processes 2`

Our side runs as a user would: the webhook provider, every request signed (Standard Webhooks),
every attempt in the audit trail (pgnotify.events). pgqueuer's side is its QueueManager with
batch_size 50 and an entrypoint that POSTs the job's payload with one aiohttp session, on uvloop
as `pgq run` puts it (pgqueuer depends on uvloop; our worker runs on asyncio: uvloop measured no
faster for it). Latency is commit -> receiver for both (the producer's clock after COMMIT; the
sink's CLOCK_MONOTONIC).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg

from bench.run import (
    DURABLE,
    cpu_seconds,
    machine,
    pct,
    postgres_pids,
    rss_mb,
    sink_count,
    sink_stats,
    wait_http,
    webhook_worker_env,
)
from pgnotify_worker.adapters import migrate
from tests.support.pgcluster import TempCluster, free_port

BATCH = 50  # pgqueuer's batch size, as in the issue
ENTRYPOINT = "hook"


@dataclass
class Plan:
    runs: int = 3
    rows: int = 25_000
    latency_runs: int = 3
    latency_seconds: float = 10.0
    latency_rate: float = 200.0


SMOKE = Plan(1, 1_000, 1, 2.0, 100.0)


@dataclass
class Side:
    name: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    drains: list[dict[str, float]] = field(default_factory=list)
    latency: list[dict[str, float]] = field(default_factory=list)
    rss_idle_mb: float = 0.0

    def pids(self) -> list[int]:
        """The worker process(es), children included (`run --processes N` forks)."""
        roots = [p.pid for p in self.procs]
        found = list(roots)
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                    if ppid in roots:
                        found.append(int(entry.name))
        return found

    def rss(self) -> float:
        return sum(rss_mb(pid) for pid in self.pids())


# --- pgqueuer's worker (a child process of this script) ----------------------------------------


async def pgqueuer_worker(dsn: str) -> None:
    """pgqueuer's QueueManager: one POST per job, batch 50, until SIGTERM."""
    import signal

    from pgqueuer import AsyncpgDriver, Queries, QueueManager
    from pgqueuer.models import Job

    conn = await asyncpg.connect(dsn)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))
    session = aiohttp.ClientSession(
        headers={"Content-Type": "application/json"}, timeout=aiohttp.ClientTimeout(total=10)
    )

    @qm.entrypoint(ENTRYPOINT)
    async def hook(job: Job) -> None:
        assert job.payload is not None
        url = job.headers.get("url") if job.headers else None
        async with session.post(str(url), data=job.payload) as response:
            await response.read()
            if response.status >= 300:
                raise RuntimeError(f"receiver said {response.status}")

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, qm.shutdown.set)
    try:
        await qm.run(batch_size=BATCH)
    finally:
        await session.close()
        await conn.close()


# --- the two sides, measured the same way -------------------------------------------------------


async def insert_ours(conn: asyncpg.Connection, url: str, rows: int) -> None:
    await conn.execute(
        "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
        "SELECT 'webhook', $1, jsonb_build_object('seq', g) FROM generate_series(1, $2) g",
        url,
        rows,
    )


async def insert_theirs(conn: asyncpg.Connection, url: str, rows: int) -> None:
    from pgqueuer import Queries

    queries = Queries.from_asyncpg_connection(conn)
    payloads: list[bytes | None] = [
        json.dumps({"seq": i}, separators=(",", ":")).encode() for i in range(1, rows + 1)
    ]
    await queries.enqueue([ENTRYPOINT] * rows, payloads, [0] * rows, headers=[{"url": url}] * rows)


async def pending(conn: asyncpg.Connection, side: str) -> int:
    if side == "ours":
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pgnotify.notifications WHERE status <> 'sent'"
            )
        )
    return int(await conn.fetchval("SELECT count(*) FROM pgqueuer"))


async def reset(conn: asyncpg.Connection) -> None:
    await conn.execute("TRUNCATE pgnotify.notifications, pgnotify.events")
    await conn.execute("TRUNCATE pgqueuer, pgqueuer_log")
    for table in ("pgnotify.notifications", "pgnotify.events", "pgqueuer", "pgqueuer_log"):
        await conn.execute(f"VACUUM ANALYZE {table}")


async def drain(
    conn: asyncpg.Connection,
    http: aiohttp.ClientSession,
    sink_port: int,
    side: Side,
    pg: list[int],
    rows: int,
) -> dict[str, float]:
    await http.post(f"http://127.0.0.1:{sink_port}/reset")
    url = f"http://127.0.0.1:{sink_port}/hook"
    pids = side.pids()
    cpu_worker, cpu_pg = cpu_seconds(pids), cpu_seconds(pg)
    insert = insert_ours if side.name == "ours" else insert_theirs
    await insert(conn, url, rows)
    started = time.monotonic()
    peak = side.rss()
    async with asyncio.timeout(900):
        while await sink_count(http, sink_port) < rows:
            peak = max(peak, side.rss())
            await asyncio.sleep(0.1)
    received = time.monotonic()
    async with asyncio.timeout(60):  # the write-back of the last batch
        while await pending(conn, side.name):
            await asyncio.sleep(0.02)
    finished = time.monotonic()
    worker_s, pg_s = cpu_seconds(pids) - cpu_worker, cpu_seconds(pg) - cpu_pg
    count = await sink_count(http, sink_port)
    await reset(conn)
    return {
        "per_second": rows / (finished - started),
        "received_per_second": rows / (received - started),
        "worker_us": 1e6 * worker_s / rows,
        "postgres_us": 1e6 * pg_s / rows,
        "rss_peak_mb": peak,
        "duplicates": count - rows,
    }


async def latency(
    conn: asyncpg.Connection, http: aiohttp.ClientSession, sink_port: int, side: str, plan: Plan
) -> dict[str, float]:
    """Commit -> receiver at a steady rate (one INSERT/enqueue per row, each its own commit)."""
    await http.post(f"http://127.0.0.1:{sink_port}/reset")
    url = f"http://127.0.0.1:{sink_port}/hook"
    if side == "ours":
        stmt = await conn.prepare(
            "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
            "VALUES ('webhook', $1, jsonb_build_object('seq', $2::int))"
        )

        async def one(seq: int) -> None:
            await stmt.fetch(url, seq)

    else:
        from pgqueuer import Queries

        queries = Queries.from_asyncpg_connection(conn)

        async def one(seq: int) -> None:
            body = b'{"seq":%d}' % seq
            await queries.enqueue(ENTRYPOINT, body, headers={"url": url})

    committed: dict[int, float] = {}
    count = int(plan.latency_rate * plan.latency_seconds)
    start = time.monotonic()
    for seq in range(count):
        delay = start + seq / plan.latency_rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await one(seq)
        committed[seq] = time.monotonic()
    async with asyncio.timeout(60):
        while await sink_count(http, sink_port) < count:
            await asyncio.sleep(0.05)
    arrivals = (await sink_stats(http, sink_port))["arrivals"]
    ms = [(arrivals[str(seq)] - t) * 1000 for seq, t in committed.items()]
    async with asyncio.timeout(30):
        while await pending(conn, side):
            await asyncio.sleep(0.02)
    await reset(conn)
    return {"p50": pct(ms, 0.5), "p95": pct(ms, 0.95), "p99": pct(ms, 0.99), "max": max(ms)}


def uvloop_installed() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def uvloop_path() -> str:
    """A directory whose sitecustomize puts a process on uvloop (our worker, with --uvloop)."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="pgnotify-uvloop-")
    Path(folder, "sitecustomize.py").write_text("import uvloop\nuvloop.install()\n")
    return folder


async def bench(
    plan: Plan, processes: int, concurrency: int, uvloop: bool = False
) -> tuple[dict[str, Side], str]:
    from pgqueuer import Queries

    cluster = TempCluster(settings=DURABLE).start()
    sides = {"ours": Side("ours"), "theirs": Side("theirs")}
    sink: subprocess.Popen[bytes] | None = None
    try:
        admin = await asyncpg.connect(cluster.dsn())
        version = await admin.fetchval("SHOW server_version")
        await admin.execute("CREATE DATABASE bench")
        await admin.execute(
            "ALTER DATABASE bench SET pgnotify.webhook_allowed_networks = '127.0.0.0/8'"
        )
        await admin.close()
        dsn = cluster.dsn().rpartition("/")[0] + "/bench"
        conn = await asyncpg.connect(dsn)
        await migrate.migrate(conn)
        await Queries.from_asyncpg_connection(conn).install()
        sink_port, http_port = free_port(), free_port()
        sink = subprocess.Popen([sys.executable, "-m", "bench.sink", str(sink_port)])
        env = webhook_worker_env(dsn, http_port, concurrency, PGNOTIFY_PROCESSES=str(processes))
        if uvloop:
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [uvloop_path(), env.get("PYTHONPATH")])
            )
        sides["ours"].procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "pgnotify_worker", "run"],
                env=env,
                stdout=subprocess.DEVNULL,
            )
        )
        sides["theirs"].procs.append(
            subprocess.Popen([sys.executable, "-m", "bench.pgqueuer_compare", "--worker", dsn])
        )
        await wait_http(f"http://127.0.0.1:{sink_port}/count")
        await wait_http(f"http://127.0.0.1:{http_port}/readyz")
        await asyncio.sleep(2)  # pgqueuer has no readiness probe: let it reach its LISTEN
        for side in sides.values():
            side.rss_idle_mb = side.rss()
        pg = postgres_pids(cluster)
        async with aiohttp.ClientSession() as http:
            # one warm-up each (connections, caches), not counted
            for name in ("ours", "theirs"):
                await drain(conn, http, sink_port, sides[name], pg, min(plan.rows, 2_000))
            for _ in range(plan.latency_runs):
                for name in ("ours", "theirs"):
                    sides[name].latency.append(await latency(conn, http, sink_port, name, plan))
            for _ in range(plan.runs):
                for name in ("ours", "theirs"):
                    sides[name].drains.append(
                        await drain(conn, http, sink_port, sides[name], pg, plan.rows)
                    )
        await conn.close()
    finally:
        for side in sides.values():
            for proc in side.procs:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
        if sink is not None:
            sink.terminate()
            sink.wait(10)
        cluster.destroy()
    return sides, f"{version} (own throwaway cluster, fsync on)"


def report(
    sides: dict[str, Side], postgresql: str, plan: Plan, processes: int, uvloop: bool = False
) -> str:
    import pgqueuer

    med = statistics.median
    ours, theirs = sides["ours"], sides["theirs"]
    info = {**machine(), "postgresql": postgresql}
    lines = ["## pgnotify-worker beside pgqueuer", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += [
        f"- pgnotify-worker: {processes} process(es){' on uvloop' if uvloop else ''}, webhook "
        "concurrency 50, every request signed, every attempt in pgnotify.events",
        f"- pgqueuer {pgqueuer.__version__}: QueueManager.run(batch_size={BATCH}), one aiohttp "
        f"POST per job, on {'uvloop (as `pgq run`)' if uvloop_installed() else 'asyncio'}",
        "- receiver: bench/sink.py (one process, loopback); runs interleaved, ours first",
        "",
        f"### Draining a {plan.rows:,} row backlog ({plan.runs} runs each)",
        "",
        "| run | ours /s | pgqueuer /s | ours received/s | pgqueuer received/s "
        "| CPU µs/notification ours: worker / postgres | pgqueuer: worker / postgres "
        "| RSS peak MB ours / pgqueuer |",
        "|---:|---:|---:|---:|---:|---|---|---|",
    ]
    for i, (a, b) in enumerate(zip(ours.drains, theirs.drains, strict=True), 1):
        lines.append(
            f"| {i} | {a['per_second']:,.0f} | {b['per_second']:,.0f} | "
            f"{a['received_per_second']:,.0f} | {b['received_per_second']:,.0f} | "
            f"{a['worker_us']:.0f} / {a['postgres_us']:.0f} | "
            f"{b['worker_us']:.0f} / {b['postgres_us']:.0f} | "
            f"{a['rss_peak_mb']:.0f} / {b['rss_peak_mb']:.0f} |"
        )
    a_rate = med(d["per_second"] for d in ours.drains)
    b_rate = med(d["per_second"] for d in theirs.drains)
    lines += [
        "",
        f"Median drain: ours **{a_rate:,.0f}/s**, pgqueuer **{b_rate:,.0f}/s**: "
        f"**{a_rate / b_rate:.2f} x**. Duplicates at the receiver: ours "
        f"{sum(d['duplicates'] for d in ours.drains):.0f}, pgqueuer "
        f"{sum(d['duplicates'] for d in theirs.drains):.0f}.",
        "",
        f"### Commit → receiver at {plan.latency_rate:.0f}/s offered "
        f"({plan.latency_runs} runs x {plan.latency_seconds:.0f} s each; median of runs)",
        "",
        "| | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, side in (("pgnotify-worker", ours), ("pgqueuer", theirs)):
        lines.append(
            f"| {label} | "
            + " | ".join(f"{med(r[q] for r in side.latency):.2f}" for q in ("p50", "p95", "p99"))
            + f" | {med(r['max'] for r in side.latency):.1f} |"
        )
    lines += [
        "",
        "### Worker RSS",
        "",
        "| | idle MB | peak under the drains MB |",
        "|---|---:|---:|",
        f"| pgnotify-worker | {ours.rss_idle_mb:.1f} | "
        f"{max(d['rss_peak_mb'] for d in ours.drains):.1f} |",
        f"| pgqueuer | {theirs.rss_idle_mb:.1f} | "
        f"{max(d['rss_peak_mb'] for d in theirs.drains):.1f} |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="seconds; figures not meaningful")
    parser.add_argument("--rows", type=int, help="backlog per drain run")
    parser.add_argument("--runs", type=int, help="drain runs per side")
    parser.add_argument("--processes", type=int, default=1, help="our worker's --processes")
    parser.add_argument("--concurrency", type=int, default=50, help="our webhook sends in flight")
    parser.add_argument("--uvloop", action="store_true", help="our worker on uvloop")
    parser.add_argument("--save", type=Path, help="also write the table to this file")
    parser.add_argument("--worker", metavar="DSN", help=argparse.SUPPRESS)  # pgqueuer's side
    args = parser.parse_args()
    try:
        import pgqueuer  # noqa: F401
    except ImportError:
        print("pgqueuer is not installed (pip install -e '.[bench]'): comparison skipped")
        return
    if args.worker:
        with contextlib.suppress(KeyboardInterrupt):
            try:  # as pgqueuer's own CLI (`pgq run`) runs it when uvloop is there
                import uvloop
            except ImportError:
                asyncio.run(pgqueuer_worker(args.worker))
            else:
                uvloop.run(pgqueuer_worker(args.worker))
        return
    plan = SMOKE if args.smoke else Plan()
    if args.rows:
        plan.rows = args.rows
    if args.runs:
        plan.runs = args.runs
    sides, postgresql = asyncio.run(bench(plan, args.processes, args.concurrency, args.uvloop))
    table = report(sides, postgresql, plan, args.processes, args.uvloop)
    print(table)
    if args.save:
        args.save.write_text(table + "\n")


if __name__ == "__main__":
    main()
