"""Benchmarks (not tests): end-to-end latency, backlog drain throughput, worker memory, and pgbench's
insert-then-update lifecycle rate on the same server in the same run. Prints a table.

    make bench                      # full run: medians of several runs
    make bench-smoke                # a few seconds, for CI (never fails on a time)
    python -m bench.run --dsn URL   # against an existing server (needs CREATE DATABASE)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from pgnotify_worker.adapters import migrate
from tests.support.pgcluster import TempCluster, find_bindir, free_port

SECRET = "whsec_" + base64.b64encode(b"bench-secret-0123456789abcdef").decode()
DURABLE = {  # production durability, so the numbers mean something
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_buffers": "256MB",
    "max_wal_size": "4GB",
    "checkpoint_timeout": "15min",
}


@dataclass
class Plan:
    latency_runs: int = 3
    latency_seconds: float = 10.0
    latency_rate: float = 200.0
    drain_runs: int = 3
    drain_rows: int = 100_000
    pgbench_runs: int = 3
    pgbench_seconds: float = 10.0
    pgbench_clients: int = 8


SMOKE = Plan(1, 2.0, 100.0, 1, 2_000, 1, 3.0, 4)


@dataclass
class Results:
    latency: list[dict[str, float]] = field(default_factory=list)
    drain: list[dict[str, float]] = field(default_factory=list)
    pgbench: list[float] = field(default_factory=list)
    rss_idle_mb: float = 0.0
    notes: list[str] = field(default_factory=list)


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.0f} GiB"
    return {
        "cpu": f"{model} x {os.cpu_count()}",
        "memory": mem,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }


def webhook_worker_env(dsn: str, http_port: int, concurrency: int, **extra: str) -> dict[str, str]:
    """The environment of a benchmarked worker: webhooks only, to the loopback receiver, signed,
    `concurrency` sends in flight and no per-endpoint cap below it (one receiver stands for many
    endpoints), quiet logs; `extra` adds or overrides settings."""
    return {
        **os.environ,
        "PGNOTIFY_DATABASE_URL": dsn,
        "PGNOTIFY_CHANNELS": "webhook",
        "PGNOTIFY_CHANNEL_CONCURRENCY": f"webhook={concurrency}",
        "PGNOTIFY_DESTINATION_CONCURRENCY": str(concurrency),
        "PGNOTIFY_WEBHOOK_SECRET": SECRET,
        "PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
        "PGNOTIFY_HTTP_HOST": "127.0.0.1",
        "PGNOTIFY_HTTP_PORT": str(http_port),
        "PGNOTIFY_LOG_LEVEL": "WARNING",
        "PGNOTIFY_QUEUE_METRICS_INTERVAL": "5",
        **extra,
    }


def rss_mb(pid: int) -> float:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far (from /proc; clock ticks)."""
    total = 0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / tick


def postgres_pids(cluster: TempCluster | None) -> list[int]:
    """The postmaster and its children (only for our own throwaway cluster)."""
    if cluster is None:
        return []
    try:
        postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == postmaster:
                    children.append(int(entry.name))
    return [postmaster, *children]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def wait_http(url: str, timeout: float = 30.0) -> None:
    async with aiohttp.ClientSession() as http, asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                if (await http.get(url)).status == 200:
                    return
            await asyncio.sleep(0.05)


async def sink_stats(http: aiohttp.ClientSession, port: int) -> dict[str, Any]:
    result: dict[str, Any] = await (await http.get(f"http://127.0.0.1:{port}/stats")).json()
    return result


async def sink_count(http: aiohttp.ClientSession, port: int) -> int:
    """Requests received so far; cheap, unlike /stats, so polling it does not load the sink."""
    return int(await (await http.get(f"http://127.0.0.1:{port}/count")).text())


async def reset_queue(conn: asyncpg.Connection) -> None:
    await conn.execute("TRUNCATE pgnotify.notifications, pgnotify.events")
    await conn.execute("VACUUM ANALYZE pgnotify.notifications")
    await conn.execute("VACUUM ANALYZE pgnotify.events")


async def measure_latency(
    conn: asyncpg.Connection, http: aiohttp.ClientSession, sink_port: int, plan: Plan
) -> dict[str, float]:
    """Commit-to-receive latency at a steady low rate, the worker idle on LISTEN between rows."""
    await http.post(f"http://127.0.0.1:{sink_port}/reset")
    url = f"http://127.0.0.1:{sink_port}/hook"
    insert = await conn.prepare(
        "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
        "VALUES ('webhook', $1, jsonb_build_object('seq', $2::int))"
    )
    committed: dict[int, float] = {}
    count = int(plan.latency_rate * plan.latency_seconds)
    start = time.monotonic()
    for seq in range(count):
        delay = start + seq / plan.latency_rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await insert.fetch(url, seq)
        committed[seq] = time.monotonic()
    async with asyncio.timeout(60):
        while await sink_count(http, sink_port) < count:
            await asyncio.sleep(0.1)
    arrivals = (await sink_stats(http, sink_port))["arrivals"]
    ms = [(arrivals[str(seq)] - t) * 1000 for seq, t in committed.items()]
    await reset_queue(conn)
    return {
        "samples": len(ms),
        "p50": pct(ms, 0.50),
        "p95": pct(ms, 0.95),
        "p99": pct(ms, 0.99),
        "max": max(ms),
    }


async def measure_drain(
    conn: asyncpg.Connection,
    http: aiohttp.ClientSession,
    sink_port: int,
    pids: dict[str, list[int]],
    plan: Plan,
) -> dict[str, float]:
    """Rows per second while the workers drain a backlog inserted in one statement."""
    await http.post(f"http://127.0.0.1:{sink_port}/reset")
    url = f"http://127.0.0.1:{sink_port}/hook"
    pid = pids["worker"][0]
    rss_before = rss_mb(pid)
    cpu_before = {name: cpu_seconds(group) for name, group in pids.items()}
    await conn.execute(
        "INSERT INTO pgnotify.notifications (channel, recipient, payload) "
        "SELECT 'webhook', $1, jsonb_build_object('seq', g) FROM generate_series(1, $2) g",
        url,
        plan.drain_rows,
    )
    started = time.monotonic()
    peak = rss_before
    async with asyncio.timeout(600):
        while await sink_count(http, sink_port) < plan.drain_rows:
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.2)
    received = time.monotonic()
    async with asyncio.timeout(60):  # the write-back of the last batch
        while await conn.fetchval(
            "SELECT count(*) FROM pgnotify.notifications WHERE status <> 'sent'"
        ):
            await asyncio.sleep(0.05)
    finished = time.monotonic()
    cpu = {name: cpu_seconds(group) - cpu_before[name] for name, group in pids.items()}
    await reset_queue(conn)
    return {
        "worker_us": 1e6 * cpu["worker"] / plan.drain_rows,
        "sink_us": 1e6 * cpu["sink"] / plan.drain_rows,
        "postgres_us": 1e6 * cpu["postgres"] / plan.drain_rows,
        "worker_cpu_share": cpu["worker"] / (finished - started) / len(pids["worker"]),
        "rows": plan.drain_rows,
        "seconds": finished - started,
        "per_second": plan.drain_rows / (finished - started),
        "received_per_second": plan.drain_rows / (received - started),
        "rss_before_mb": rss_before,
        "rss_peak_mb": peak,
        "rss_after_mb": rss_mb(pid),
    }


PGBENCH_SCRIPT = """\\set r random(1, 1000000)
INSERT INTO bench_jobs (channel, recipient, payload, priority, status, max_attempts, run_at) VALUES ('webhook', 'http://127.0.0.1/hook', jsonb_build_object('seq', :r), 0, 'queued', 10, now()) RETURNING id \\gset
UPDATE bench_jobs SET status = 'sent', attempts = 1, sent_at = now(), updated_at = now(), provider = 'webhook' WHERE id = :id;
"""


async def prepare_pgbench(conn: asyncpg.Connection) -> None:
    """A table of the notifications' shape and indexes, without our triggers."""
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS bench_jobs "
        "(LIKE pgnotify.notifications INCLUDING DEFAULTS INCLUDING IDENTITY INCLUDING INDEXES)"
    )


def run_pgbench(dsn: str, seconds: float, clients: int, workdir: Path) -> float:
    binary = shutil.which("pgbench") or str(find_bindir() / "pgbench")
    script = workdir / "lifecycle.sql"
    script.write_text(PGBENCH_SCRIPT)
    out = subprocess.run(
        [
            binary,
            "-n",
            "-c",
            str(clients),
            "-j",
            "2",
            "-T",
            str(int(seconds)),
            "-f",
            str(script),
            dsn,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    match = re.search(r"tps = ([\d.]+)", out.stdout)
    if not match:
        raise RuntimeError(f"pgbench said: {out.stdout}\n{out.stderr}")
    return float(match.group(1))


async def bench(
    plan: Plan, dsn: str | None, concurrency: int, workers: int
) -> tuple[Results, dict[str, str]]:
    results = Results()
    cluster = None
    if dsn is None:
        cluster = TempCluster(settings=DURABLE).start()
        admin_dsn = cluster.dsn()
    else:
        admin_dsn = dsn
    base = admin_dsn.rpartition("/")[0]
    name = f"pgnotify_bench_{os.getpid()}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    # the INSERT check refuses loopback webhook URLs unless allowed: the sink is on 127.0.0.1
    await admin.execute(
        f"ALTER DATABASE \"{name}\" SET pgnotify.webhook_allowed_networks = '127.0.0.0/8'"
    )
    version = await admin.fetchval("SHOW server_version")
    bench_dsn = f"{base}/{name}"
    sink_port, http_port = free_port(), free_port()
    sink = subprocess.Popen([sys.executable, "-m", "bench.sink", str(sink_port)])
    started: list[subprocess.Popen[bytes]] = []
    workdir = Path(tempfile.mkdtemp(prefix="pgnotify-bench-"))
    try:
        conn = await asyncpg.connect(bench_dsn)
        await migrate.migrate(conn)
        await prepare_pgbench(conn)
        env = {
            **os.environ,
            "PGNOTIFY_DATABASE_URL": bench_dsn,
            "PGNOTIFY_CHANNELS": "webhook",
            "PGNOTIFY_CHANNEL_CONCURRENCY": f"webhook={concurrency}",
            # one sink stands for many endpoints: no per-destination cap unless asked for
            # (PGNOTIFY_DESTINATION_CONCURRENCY=0 in the environment: the default share)
            "PGNOTIFY_DESTINATION_CONCURRENCY": os.environ.get(
                "PGNOTIFY_DESTINATION_CONCURRENCY", str(concurrency)
            ),
            "PGNOTIFY_WEBHOOK_SECRET": SECRET,
            "PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",
            "PGNOTIFY_HTTP_HOST": "127.0.0.1",
            "PGNOTIFY_HTTP_PORT": str(http_port),
            "PGNOTIFY_LOG_LEVEL": "WARNING",
            "PGNOTIFY_QUEUE_METRICS_INTERVAL": "5",
        }
        ports = [http_port] + [free_port() for _ in range(workers - 1)]
        for port in ports:
            started.append(
                subprocess.Popen(
                    [sys.executable, "-m", "pgnotify_worker", "run"],
                    env={**env, "PGNOTIFY_HTTP_PORT": str(port)},
                    stdout=subprocess.DEVNULL,
                )
            )
        await wait_http(f"http://127.0.0.1:{sink_port}/stats")
        for port in ports:
            await wait_http(f"http://127.0.0.1:{port}/readyz")
        results.rss_idle_mb = rss_mb(started[0].pid)
        pids = {
            "worker": [w.pid for w in started],
            "sink": [sink.pid],
            "postgres": postgres_pids(cluster),
        }
        async with aiohttp.ClientSession() as http:
            for _ in range(plan.latency_runs):
                results.latency.append(await measure_latency(conn, http, sink_port, plan))
            for _ in range(plan.drain_runs):
                results.drain.append(await measure_drain(conn, http, sink_port, pids, plan))
        for _ in range(plan.pgbench_runs):
            results.pgbench.append(
                run_pgbench(bench_dsn, plan.pgbench_seconds, plan.pgbench_clients, workdir)
            )
            await conn.execute("TRUNCATE bench_jobs")
        await conn.close()
    finally:
        for proc in (*started, sink):
            if proc is not None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
        with contextlib.suppress(Exception):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        if cluster is not None:
            cluster.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
    info = machine()
    info["postgresql"] = (
        f"{version} ({'own throwaway cluster, fsync on' if cluster else 'given server'})"
    )
    return results, info


def report(
    results: Results, info: dict[str, str], plan: Plan, concurrency: int, workers: int
) -> str:
    med = statistics.median
    lines = ["## pgnotify-worker benchmark", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    lines += [
        f"- worker: {workers} process(es), webhook concurrency {concurrency} each; "
        "sink: a separate minimal HTTP/1.1 process (bench/sink.py)",
        "",
        f"### End-to-end latency, commit to receiver, {plan.latency_rate:.0f}/s offered "
        f"({plan.latency_runs} runs x {plan.latency_seconds:.0f} s; median of runs)",
        "",
        "| p50 ms | p95 ms | p99 ms | max ms | samples/run |",
        "|---:|---:|---:|---:|---:|",
        "| {:.2f} | {:.2f} | {:.2f} | {:.2f} | {:.0f} |".format(
            med(r["p50"] for r in results.latency),
            med(r["p95"] for r in results.latency),
            med(r["p99"] for r in results.latency),
            med(r["max"] for r in results.latency),
            med(r["samples"] for r in results.latency),
        ),
        "",
        f"### Draining a {plan.drain_rows:,} row backlog ({plan.drain_runs} runs)",
        "",
        "| run | notifications/s (to sent in DB) | received/s at sink | CPU µs per notification: "
        "worker / sink / postgres | worker busy | RSS before / peak / after MB |",
        "|---:|---:|---:|---|---:|---|",
    ]
    for i, r in enumerate(results.drain, 1):
        lines.append(
            f"| {i} | {r['per_second']:,.0f} | {r['received_per_second']:,.0f} | "
            f"{r['worker_us']:.0f} / {r['sink_us']:.0f} / {r['postgres_us']:.0f} | "
            f"{100 * r['worker_cpu_share']:.0f}% | "
            f"{r['rss_before_mb']:.0f} / {r['rss_peak_mb']:.0f} / {r['rss_after_mb']:.0f} |"
        )
    ours = med(r["per_second"] for r in results.drain)
    theirs = med(results.pgbench)
    lines += [
        "",
        f"Median drain: **{ours:,.0f} notifications/s**; worker RSS idle {results.rss_idle_mb:.0f} MB.",
        "",
        f"### Same server, same run: pgbench insert-then-update lifecycle ({plan.pgbench_clients} "
        "clients, two commits each, no HTTP)",
        "",
        "| pgbench lifecycles/s (median) | runs | pgnotify-worker / pgbench |",
        "|---:|---|---:|",
        f"| {theirs:,.0f} | {', '.join(f'{t:,.0f}' for t in results.pgbench)} | {ours / theirs:.2f} |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a few seconds; numbers are not meaningful"
    )
    parser.add_argument(
        "--dsn", help="admin DSN of an existing server (default: a throwaway cluster)"
    )
    parser.add_argument("--concurrency", type=int, default=50, help="webhook sends in flight")
    parser.add_argument("--rows", type=int, help="backlog size for the drain runs")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (replicas)")
    parser.add_argument("--save", type=Path, help="also write the table to this file")
    args = parser.parse_args()
    plan = SMOKE if args.smoke else Plan()
    if args.rows:
        plan.drain_rows = args.rows
    results, info = asyncio.run(bench(plan, args.dsn, args.concurrency, args.workers))
    table = report(results, info, plan, args.concurrency, args.workers)
    print(table)
    if args.save:
        args.save.write_text(table + "\n")


if __name__ == "__main__":
    main()
