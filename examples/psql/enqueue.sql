-- Enqueue notifications from psql, inside the application's own transaction.
--
--   psql "$DATABASE_URL" -X -q -v webhook_url=https://example.com/hooks/orders \
--        [-v customer=ada] [-v user_id=ada] [-v key=order-7] [-v remind_in='1 hour'] \
--        -f examples/psql/enqueue.sql
--
-- One transaction does the application's work (an order) and enqueues three notifications:
--   1. a webhook to :webhook_url about the order            (idempotency key :key-placed)
--   2. notify_user(): the user on every channel they can be reached on — here their webhook
--      URL (from pgnotify.contacts) and their in-app inbox    (keys :key-notify:<channel>)
--   3. a reminder webhook scheduled :remind_in from now       (key :key-reminder)
-- Nothing exists for the worker until COMMIT; then 1 and 2 go out within milliseconds and 3 waits
-- as 'scheduled' until its run_at (pgnotify.cancel(id) takes it back until then).

\set ON_ERROR_STOP on

-- Variables: :webhook_url is required; the others have defaults.
\if :{?webhook_url}
\else
    DO $$ BEGIN RAISE EXCEPTION 'usage: psql -v webhook_url=https://... -f enqueue.sql'; END $$;
\endif
\if :{?customer}
\else
    \set customer ada
\endif
\if :{?user_id}
\else
    \set user_id :customer
\endif
\if :{?remind_in}
\else
    \set remind_in '1 hour'
\endif

-- The application's own table (created here only so that the example runs on an empty database).
CREATE TABLE IF NOT EXISTS demo_orders (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer    text NOT NULL,
    total_cents integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

BEGIN;

-- 1. The application's own work.
INSERT INTO demo_orders (customer, total_cents) VALUES (:'customer', 4200)
RETURNING id AS order_id \gset
\if :{?key}
\else
    SELECT 'order-' || :order_id AS key \gset
\endif

-- How the user is reached: normally your application keeps pgnotify.contacts up to date.
INSERT INTO pgnotify.contacts (user_id, webhook_url) VALUES (:'user_id', :'webhook_url')
ON CONFLICT (user_id) DO UPDATE SET webhook_url = EXCLUDED.webhook_url;

-- 2. A webhook about the order: the receiver gets {"type": "order.placed", "data": {...}}.
SELECT pgnotify.enqueue(
    channel         => 'webhook',
    recipient       => :'webhook_url',
    category        => 'order.placed',
    payload         => jsonb_build_object('order_id', :order_id, 'customer', :'customer',
                                          'total_cents', 4200),
    idempotency_key => :'key' || '-placed') AS placed_id \gset

-- 3. notify_user(): one row per channel the user can be reached on (same group_id); the user's
--    preferences, consent and quiet hours are applied when the worker sends each one.
SELECT pgnotify.notify_user(
    :'user_id', 'orders',
    channels        => ARRAY['webhook', 'inapp'],
    subject         => 'Order {{ order_id }} confirmed',
    payload         => jsonb_build_object('order_id', :order_id),
    idempotency_key => :'key' || '-notify') AS notify_ids \gset

-- 4. A scheduled send: status 'scheduled' now, queued (and sent) when run_at comes.
SELECT pgnotify.enqueue(
    channel         => 'webhook',
    recipient       => :'webhook_url',
    category        => 'order.reminder',
    payload         => jsonb_build_object('order_id', :order_id),
    run_at          => now() + :'remind_in'::interval,
    idempotency_key => :'key' || '-reminder') AS reminder_id \gset

-- COMMIT makes the order and its notifications visible at once, and wakes the worker.
COMMIT;

\echo order :order_id: webhook :placed_id, notify_user :notify_ids, reminder :reminder_id
SELECT id, channel, recipient, status, run_at, idempotency_key
FROM pgnotify.notifications
WHERE starts_with(idempotency_key, :'key' || '-')
ORDER BY id;
