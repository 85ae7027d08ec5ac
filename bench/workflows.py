"""Workflows: what pgnotify.trigger() costs the producer's transaction beside enqueue(), and how
many runs one worker's runner evaluates per second, on a durable (fsync on) throwaway cluster.
Not a test: it never fails on a time.

    python -m bench.workflows            # 3 rounds
    python -m bench.workflows --smoke    # seconds; the numbers mean nothing

1. One producer, one call per transaction (autocommit), enqueue() and trigger() alternating in
   the same rounds, each with an idempotency key: commit latency p50/p99 and the ratio.
2. Evaluation: N runs triggered at once, then evaluated by one runner and by two side by side
   (SKIP LOCKED), one run per transaction and 20 (the worker's batch), for a one-step workflow (one send) and for the shipped fallback's first pass
   (send in-app, then wait: two rows of state).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass

import asyncpg

from bench.run import DURABLE, machine, pct
from pgnotify_worker.adapters import db as dbmod
from pgnotify_worker.adapters import migrate
from pgnotify_worker.adapters.workflow_runner import WorkflowRunner
from tests.support.pgcluster import TempCluster

ONE_STEP = [{"name": "hi", "kind": "send", "channel": "inapp", "body": "Hi {{ name }}"}]
FALLBACK_START = [
    {"name": "inapp", "kind": "send", "channel": "inapp", "body": "Hi"},
    {"name": "wait", "kind": "delay", "minutes": 10},
    {"name": "email", "kind": "send", "channel": "email", "subject": "Hi", "body": "x"},
]


@dataclass
class Plan:
    rounds: int = 3
    calls: int = 500
    runs: int = 2000


SMOKE = Plan(1, 30, 60)


async def latencies(conn: asyncpg.Connection, plan: Plan) -> dict[str, list[float]]:
    enqueue = await conn.prepare(
        "SELECT pgnotify.enqueue('inapp', user_id => $1, body => 'Hi', idempotency_key => $2)"
    )
    trigger = await conn.prepare("SELECT pgnotify.trigger('one', $1, '{}', idempotency_key => $2)")
    times: dict[str, list[float]] = {"enqueue()": [], "trigger()": []}
    for r in range(plan.rounds):
        for i in range(plan.calls):
            for name, statement in (("enqueue()", enqueue), ("trigger()", trigger)):
                started = time.perf_counter()
                await statement.fetchval(f"user-{i % 100}", f"{name}-{r}-{i}")
                times[name].append((time.perf_counter() - started) * 1000)
    return times


async def evaluate(
    pool: asyncpg.Pool, conn: asyncpg.Connection, steps: str, n: int, k: int, batch: int
) -> float:
    """Runs per second for k runners settling n freshly triggered runs of workflow `steps`,
    `batch` runs per transaction."""
    await conn.execute("DELETE FROM pgnotify.workflow_runs")
    await conn.execute(
        "SELECT pgnotify.trigger($1, 'user-' || g, '{\"name\": \"Ada\"}') "
        "FROM generate_series(1, $2) g",
        steps,
        n,
    )
    runners = [WorkflowRunner(pool, f"bench-{i}") for i in range(k)]

    async def settle(runner: WorkflowRunner) -> None:
        while await runner.run_due(limit=batch):
            pass

    started = time.perf_counter()
    await asyncio.gather(*(settle(r) for r in runners))
    elapsed = time.perf_counter() - started
    left = await conn.fetchval(
        "SELECT count(*) FROM pgnotify.workflow_runs WHERE status = 'running' AND next_at <= now()"
    )
    assert left == 0, left
    return n / elapsed


async def bench(plan: Plan) -> str:
    cluster = TempCluster(settings=DURABLE).start()
    try:
        admin = await asyncpg.connect(cluster.dsn())
        await admin.execute("CREATE DATABASE flows")
        await admin.close()
        conn = await asyncpg.connect(cluster.dsn("flows"))
        await dbmod._init_connection(conn)
        await migrate.migrate(conn)
        await conn.execute("SELECT pgnotify.define_workflow('one', $1)", ONE_STEP)
        await conn.execute("SELECT pgnotify.define_workflow('fallback', $1)", FALLBACK_START)
        await conn.execute(
            "INSERT INTO pgnotify.contacts (user_id, email) "
            "SELECT 'user-' || g, 'user' || g || '@example.com' FROM generate_series(1, $1) g",
            max(plan.runs, 100),
        )
        times = await latencies(conn, plan)
        pool = await dbmod.create_pool(cluster.dsn("flows"), min_size=2, max_size=4)
        rates: dict[tuple[str, int, int], list[float]] = {}
        try:
            for _ in range(plan.rounds):
                for steps in ("one", "fallback"):
                    for k in (1, 2):
                        for batch in (1, 20):
                            rate = await evaluate(pool, conn, steps, plan.runs, k, batch)
                            rates.setdefault((steps, k, batch), []).append(rate)
        finally:
            await pool.close()
        version = await conn.fetchval("SHOW server_version")
        await conn.close()
    finally:
        cluster.destroy()

    lines = ["## Workflows: trigger() on the producer's path, and evaluation", ""]
    lines += [f"- {k}: {v}" for k, v in machine().items()]
    lines += [f"- postgresql: {version} (throwaway cluster, fsync on)", ""]
    lines += [
        f"One producer, autocommit, {plan.rounds} x {plan.calls} calls of each, alternating:",
        "",
        "| call | p50 ms | p99 ms | mean ms |",
        "|---|---:|---:|---:|",
    ]
    for name, values in times.items():
        lines.append(
            f"| {name} | {statistics.median(values):.3f} | {pct(values, 0.99):.3f} | "
            f"{statistics.mean(values):.3f} |"
        )
    ratio = statistics.median(times["trigger()"]) / statistics.median(times["enqueue()"])
    lines += ["", f"trigger() p50 / enqueue() p50 = **{ratio:.2f}**", ""]
    lines += [
        f"Evaluation: {plan.runs} runs triggered at once, then settled (median of "
        f"{plan.rounds} rounds):",
        "",
        "| workflow | runners | runs per transaction | runs/s (median) | all rounds |",
        "|---|---:|---:|---:|---|",
    ]
    for (steps, k, batch), values in rates.items():
        what = "one send" if steps == "one" else "send in-app, then delay (fallback's 1st pass)"
        lines.append(
            f"| {what} | {k} | {batch} | {statistics.median(values):,.0f} | "
            f"{', '.join(f'{v:,.0f}' for v in values)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="seconds; numbers mean nothing")
    args = parser.parse_args()
    print(asyncio.run(bench(SMOKE if args.smoke else Plan())))


if __name__ == "__main__":
    main()
