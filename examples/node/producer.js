#!/usr/bin/env node
// Enqueue a webhook notification from Node.js in the same transaction as the application's own
// write. COMMIT and the worker delivers it within milliseconds; ROLLBACK (--rollback) and it never
// existed: no row, no delivery.
//
//   npm ci --prefix examples/node
//   DATABASE_URL=postgresql://app@localhost/app node examples/node/producer.js \
//       --recipient https://example.com/hooks/orders [--customer ada] [--total 4200] \
//       [--key order-7-placed] [--rollback]
//
// Prints one JSON line: {"id": <notification id>, "order_id": ..., "idempotency_key": ...,
// "committed": true|false}. On a database error it prints PostgreSQL's message (SQLSTATE, hint)
// on stderr and exits 1; a usage error exits 2.
"use strict";

const { parseArgs } = require("node:util");
const { Client } = require("pg");

// The application's own table; created here only so that the example runs on an empty database.
const DEMO_TABLE = `
  CREATE TABLE IF NOT EXISTS demo_orders (
      id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
      customer    text NOT NULL,
      total_cents integer NOT NULL,
      created_at  timestamptz NOT NULL DEFAULT now()
  )`;

function usage(message) {
  process.stderr.write(`producer.js: ${message}\n`);
  process.exit(2);
}

function options() {
  let parsed;
  try {
    parsed = parseArgs({
      options: {
        recipient: { type: "string" },
        customer: { type: "string", default: "ada" },
        total: { type: "string", default: "4200" },
        key: { type: "string" },
        rollback: { type: "boolean", default: false },
      },
    }).values;
  } catch (err) {
    usage(err.message);
  }
  const total = Number.parseInt(parsed.total, 10);
  if (!Number.isSafeInteger(total)) usage(`--total must be an integer, not ${parsed.total}`);
  return {
    recipient:
      parsed.recipient || process.env.WEBHOOK_URL || "https://example.com/hooks/orders",
    customer: parsed.customer,
    total,
    key: parsed.key,
    rollback: parsed.rollback,
  };
}

function describe(err) {
  // pg's DatabaseError carries the server's fields: code (SQLSTATE), detail, hint, column.
  let text = `error: ${err.message}`;
  if (err.code) text += ` (SQLSTATE ${err.code})`;
  if (err.detail) text += `\ndetail: ${err.detail}`;
  if (err.hint) text += `\nhint: ${err.hint}`;
  return text;
}

async function main() {
  const opts = options();
  const url = process.env.DATABASE_URL;
  if (!url) usage("set DATABASE_URL (postgresql://user:password@host:port/database)");

  const client = new Client({ connectionString: url, connectionTimeoutMillis: 10000 });
  await client.connect();
  try {
    await client.query(DEMO_TABLE);
    await client.query("BEGIN");
    try {
      // 1. The application's own work.
      const order = await client.query(
        "INSERT INTO demo_orders (customer, total_cents) VALUES ($1, $2) RETURNING id",
        [opts.customer, opts.total],
      );
      const orderId = Number(order.rows[0].id); // bigint arrives as a string
      const key = opts.key || `order-${orderId}-placed`;
      const payload = { order_id: orderId, customer: opts.customer, total_cents: opts.total };

      // 2. The notification, in the same transaction: it exists only if the order does.
      const enqueued = await client.query(
        `SELECT pgnotify.enqueue(channel => 'webhook', recipient => $1, payload => $2::jsonb,
                                 category => 'order.placed', idempotency_key => $3) AS id`,
        [opts.recipient, JSON.stringify(payload), key],
      );
      const id = Number(enqueued.rows[0].id);

      // 3. COMMIT makes both visible at once (and wakes the worker); ROLLBACK discards both.
      await client.query(opts.rollback ? "ROLLBACK" : "COMMIT");
      process.stdout.write(
        `${JSON.stringify({ id, order_id: orderId, idempotency_key: key, committed: !opts.rollback })}\n`,
      );
    } catch (err) {
      await client.query("ROLLBACK").catch(() => {});
      throw err;
    }
  } finally {
    await client.end();
  }
}

main().catch((err) => {
  process.stderr.write(`${describe(err)}\n`);
  process.exitCode = 1;
});
