"""Enqueue a webhook notification with psycopg 3 (sync), in the application's own transaction.

    DATABASE_URL=postgresql://app@localhost/app python examples/python/producer_psycopg.py \
        --recipient https://example.com/hooks/orders [--customer ada] [--total 4200] \
        [--key order-7-placed] [--rollback]

The application's INSERT and pgnotify.enqueue() share one `with conn.transaction():` block: it
commits when the block ends, and rolls back on an exception — or on `raise psycopg.Rollback()`,
which is what --rollback does. Prints one JSON line: {"id", "order_id", "idempotency_key",
"committed"}. A database error prints PostgreSQL's message (SQLSTATE, hint) on stderr and exits 1;
a usage error exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import psycopg
from psycopg.types.json import Jsonb

# The application's own table; created here only so that the example runs on an empty database.
DEMO_TABLE = """
    CREATE TABLE IF NOT EXISTS demo_orders (
        id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        customer    text NOT NULL,
        total_cents integer NOT NULL,
        created_at  timestamptz NOT NULL DEFAULT now()
    )"""

ENQUEUE = """
    SELECT pgnotify.enqueue(channel => 'webhook', recipient => %(recipient)s,
                            payload => %(payload)s, category => 'order.placed',
                            idempotency_key => %(key)s)"""


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


def produce(url: str, args: argparse.Namespace) -> dict[str, object]:
    # autocommit=True: no implicit transaction; conn.transaction() below is the only one.
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(DEMO_TABLE)
        with conn.transaction():
            # 1. The application's own work.
            row = conn.execute(
                "INSERT INTO demo_orders (customer, total_cents) VALUES (%s, %s) RETURNING id",
                (args.customer, args.total),
            ).fetchone()
            assert row is not None
            order_id = row[0]
            key = args.key or f"order-{order_id}-placed"
            payload = {"order_id": order_id, "customer": args.customer, "total_cents": args.total}
            # 2. The notification, in the same transaction: it exists only if the order does.
            row = conn.execute(
                ENQUEUE, {"recipient": args.recipient, "payload": Jsonb(payload), "key": key}
            ).fetchone()
            assert row is not None
            notification_id = row[0]
            # 3. Leaving the block commits both (and wakes the worker); Rollback discards both.
            if args.rollback:
                raise psycopg.Rollback()
    return {
        "id": notification_id,
        "order_id": order_id,
        "idempotency_key": key,
        "committed": not args.rollback,
    }


def describe(exc: psycopg.Error) -> str:
    diag = exc.diag
    text = f"error: {diag.message_primary or exc}"
    if exc.sqlstate:
        text += f" (SQLSTATE {exc.sqlstate})"
    if diag.message_detail:
        text += f"\ndetail: {diag.message_detail}"
    if diag.message_hint:
        text += f"\nhint: {diag.message_hint}"
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = os.environ.get("DATABASE_URL")
    if not url:
        print("producer_psycopg: set DATABASE_URL", file=sys.stderr)  # noqa: T201
        return 2
    try:
        result = produce(url, args)
    except psycopg.Error as exc:
        print(describe(exc), file=sys.stderr)  # noqa: T201
        return 1
    print(json.dumps(result))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
