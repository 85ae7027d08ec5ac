"""Enqueue a webhook notification with asyncpg, in the application's own transaction.

    DATABASE_URL=postgresql://app@localhost/app python examples/python/producer_asyncpg.py \
        --recipient https://example.com/hooks/orders [--customer ada] [--total 4200] \
        [--key order-7-placed] [--rollback]

COMMIT and the worker delivers it; ROLLBACK (--rollback) and it never existed. Prints one JSON
line: {"id", "order_id", "idempotency_key", "committed"}. A database error prints PostgreSQL's
message (SQLSTATE, hint) on stderr and exits 1; a usage error exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

import asyncpg

# The application's own table; created here only so that the example runs on an empty database.
DEMO_TABLE = """
    CREATE TABLE IF NOT EXISTS demo_orders (
        id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        customer    text NOT NULL,
        total_cents integer NOT NULL,
        created_at  timestamptz NOT NULL DEFAULT now()
    )"""

ENQUEUE = """
    SELECT pgnotify.enqueue(channel => 'webhook', recipient => $1, payload => $2::jsonb,
                            category => 'order.placed', idempotency_key => $3)"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--recipient",
        default=os.environ.get("WEBHOOK_URL", "https://example.com/hooks/orders"),
        help="webhook URL (default: $WEBHOOK_URL)",
    )
    parser.add_argument("--customer", default="ada")
    parser.add_argument("--total", type=int, default=4200, help="order total in cents")
    parser.add_argument("--key", help="idempotency key (default: order-<id>-placed)")
    parser.add_argument("--rollback", action="store_true", help="roll the transaction back")
    return parser.parse_args(argv)


async def produce(url: str, args: argparse.Namespace) -> dict[str, object]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(DEMO_TABLE)
        tx = conn.transaction()
        await tx.start()
        try:
            # 1. The application's own work.
            order_id = await conn.fetchval(
                "INSERT INTO demo_orders (customer, total_cents) VALUES ($1, $2) RETURNING id",
                args.customer,
                args.total,
            )
            key = args.key or f"order-{order_id}-placed"
            payload = {"order_id": order_id, "customer": args.customer, "total_cents": args.total}
            # 2. The notification, in the same transaction: it exists only if the order does.
            #    (asyncpg sends jsonb as text unless a codec is set: hence json.dumps.)
            notification_id = await conn.fetchval(ENQUEUE, args.recipient, json.dumps(payload), key)
        except BaseException:
            await tx.rollback()
            raise
        # 3. COMMIT makes both visible at once (and wakes the worker); ROLLBACK discards both.
        if args.rollback:
            await tx.rollback()
        else:
            await tx.commit()
    finally:
        await conn.close()
    return {
        "id": notification_id,
        "order_id": order_id,
        "idempotency_key": key,
        "committed": not args.rollback,
    }


def describe(exc: asyncpg.PostgresError) -> str:
    text = f"error: {exc.args[0] if exc.args else exc} (SQLSTATE {exc.sqlstate})"
    if getattr(exc, "detail", None):
        text += f"\ndetail: {exc.detail}"
    if getattr(exc, "hint", None):
        text += f"\nhint: {exc.hint}"
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = os.environ.get("DATABASE_URL")
    if not url:
        print("producer_asyncpg: set DATABASE_URL", file=sys.stderr)  # noqa: T201
        return 2
    try:
        result = asyncio.run(produce(url, args))
    except asyncpg.PostgresError as exc:
        print(describe(exc), file=sys.stderr)  # noqa: T201
        return 1
    except (OSError, TimeoutError) as exc:
        print(f"error: cannot reach the database: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    print(json.dumps(result))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
