-- A notification enqueued in a transaction that rolls back is never sent: it never existed.
--
--   psql "$DATABASE_URL" -X -q -v webhook_url=https://example.com/hooks/orders \
--        [-v customer=ada] [-v key=order-rolled-back] -f examples/psql/rollback.sql
--
-- The application's INSERT and pgnotify.enqueue() share the transaction; ROLLBACK (or an error,
-- or a lost connection) discards both. The worker never sees a row, so there is nothing to cancel.

\set ON_ERROR_STOP on

\if :{?webhook_url}
\else
    DO $$ BEGIN RAISE EXCEPTION 'usage: psql -v webhook_url=https://... -f rollback.sql'; END $$;
\endif
\if :{?customer}
\else
    \set customer ada
\endif

CREATE TABLE IF NOT EXISTS demo_orders (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer    text NOT NULL,
    total_cents integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

BEGIN;

INSERT INTO demo_orders (customer, total_cents) VALUES (:'customer', 990)
RETURNING id AS order_id \gset
\if :{?key}
\else
    SELECT 'order-' || :order_id || '-rolled-back' AS key \gset
\endif

-- Inside the transaction the row exists, with an id ...
SELECT pgnotify.enqueue(
    channel         => 'webhook',
    recipient       => :'webhook_url',
    category        => 'order.placed',
    payload         => jsonb_build_object('order_id', :order_id, 'customer', :'customer',
                                          'total_cents', 990),
    idempotency_key => :'key') AS notification_id \gset
\echo enqueued :notification_id inside the transaction

-- ... the application changes its mind (a failed payment, a validation error, an exception):
ROLLBACK;

-- ... and afterwards neither the order nor the notification exists.
SELECT (SELECT count(*) FROM demo_orders WHERE id = :order_id) AS orders,
       (SELECT count(*) FROM pgnotify.notifications WHERE idempotency_key = :'key') AS notifications;
