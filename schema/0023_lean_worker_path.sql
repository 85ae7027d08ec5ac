-- pgnotify-worker migration 0023: a leaner database path for the worker's claim and complete.
-- 1. The status NOTIFY (0018) once per statement, not once per row.
--   0018 announced every status change with an AFTER UPDATE OF status row trigger. Measured on
--   the worker's hot path (claim 50 rows, complete 50 rows; PostgreSQL backend CPU per
--   notification, medians of 3 runs, tmp bench in bench/results/pgqueuer.md): 78 us with the
--   row trigger, 61 us without any, 67 us with this statement trigger. Most of the row
--   trigger's cost was the trigger machinery itself (an empty PL/pgSQL row trigger: +13 us), not
--   the NOTIFY: every row queued an after-trigger event, re-fetched the tuple and called the
--   function.
--   The statement trigger sees the statement's rows in transition tables (old_rows, new_rows)
--   and sends exactly what the row trigger sent: one NOTIFY pgnotify_status per row whose status
--   changed, the same payload {"id","event","status","channel","category","user_id"} (stable,
--   docs/app-apis.md), and the same status webhooks (none for category pgnotify_status, so no
--   loop). It fires for every UPDATE statement on notifications (PostgreSQL allows no column
--   list with transition tables), and a statement that changes no status sends nothing.
-- 2. pgnotify.claim(): the claim as a function whose plan is made once per session. As a
--   prepared statement the claim was planned anew on every call (its LIMIT is a parameter, so
--   the generic plan's estimate looked worse than each custom plan): 0.3 ms of planning per
--   claim, 10 % of PostgreSQL's time on the path (perf, claims of 25 rows), and the generic plan
--   of the old form joined `ready` to the whole table by a hash over a sequential scan. Here the
--   rows are updated through the primary key (id = ANY(ARRAY(...))), whose generic plan is two
--   index scans at any table size, and the function pins plan_cache_mode to the generic plan.
-- Idempotent: does nothing when pgnotify.schema_migrations records version 23.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 23) THEN
    RAISE NOTICE 'pgnotify migration 23 (lean worker path) is already applied';
    RETURN;
END IF;

CREATE FUNCTION pgnotify.notification_statuses_changed() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify('pgnotify_status', json_build_object(
        'id', n.id, 'event', n.status, 'status', n.status, 'channel', n.channel,
        'category', left(n.category, 100), 'user_id', left(n.user_id, 256))::text)
    FROM new_rows n JOIN old_rows o ON o.id = n.id
    WHERE o.status IS DISTINCT FROM n.status
    ORDER BY n.id;
    IF EXISTS (SELECT 1 FROM pgnotify.status_webhooks w WHERE w.enabled) THEN
        PERFORM pgnotify.enqueue_status_webhooks(n.id, n.status, n.status, n.channel,
                                                 n.category, n.user_id)
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE o.status IS DISTINCT FROM n.status
          AND n.category IS DISTINCT FROM 'pgnotify_status'
        ORDER BY n.id;
    END IF;
    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION pgnotify.notification_statuses_changed IS
    'NOTIFY pgnotify_status (and the status webhooks) for each row of an UPDATE statement whose '
    'status changed; one call per statement (schema 0023), same payload as 0018''s row trigger.';

DROP TRIGGER notifications_status_changed ON pgnotify.notifications;
DROP FUNCTION pgnotify.notification_status_changed();
CREATE TRIGGER notifications_statuses_changed
    AFTER UPDATE ON pgnotify.notifications
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT
    EXECUTE FUNCTION pgnotify.notification_statuses_changed();

-------------------------------------------------------------------------------------------------
-- 2. The claim, planned once per session.
-------------------------------------------------------------------------------------------------
CREATE FUNCTION pgnotify.claim(p_channel text, p_limit integer, p_worker text,
                               p_lease_seconds double precision, p_since timestamptz DEFAULT NULL)
RETURNS TABLE (id bigint, uid text, channel text, recipient text, user_id text, category text,
               template text, subject text, body text, html_body text, locale text, payload text,
               priority smallint, attempts integer, max_attempts integer, created_at double precision,
               expires_at double precision, digest_of text, traceparent text,
               claimed_at timestamptz)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan
AS $fn$
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH ready AS (
        SELECT r.id FROM pgnotify.notifications r
        WHERE r.status = 'queued' AND r.channel = p_channel AND r.run_at <= now()
          AND (p_since IS NULL OR r.created_at > p_since)
          AND NOT EXISTS (SELECT 1 FROM pgnotify.paused_channels p WHERE p.channel = p_channel)
        ORDER BY r.priority DESC, r.run_at, r.id
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ), claimed AS (
        UPDATE pgnotify.notifications n
        SET status = 'processing', attempts = n.attempts + 1, locked_by = p_worker,
            locked_until = now() + make_interval(secs => p_lease_seconds), updated_at = now()
        WHERE n.id = ANY (ARRAY(SELECT ready.id FROM ready))
        RETURNING n.id, n.uid::text AS uid, n.channel, n.recipient, n.user_id, n.category,
               n.template, n.subject, n.body, n.html_body, n.locale, n.payload::text AS payload,
               n.priority, n.attempts, n.max_attempts,
               extract(epoch FROM n.created_at)::float8 AS created_at, n.run_at,
               extract(epoch FROM n.expires_at)::float8 AS expires_at, n.digest_of,
               n.traceparent
    )
    SELECT c.id, c.uid, c.channel, c.recipient, c.user_id, c.category, c.template, c.subject,
           c.body, c.html_body, c.locale, c.payload, c.priority, c.attempts, c.max_attempts,
           c.created_at, c.expires_at, c.digest_of, c.traceparent, now()
    FROM claimed c
    ORDER BY c.priority DESC, c.run_at, c.id;
END
$fn$;
COMMENT ON FUNCTION pgnotify.claim IS
    'The worker''s claim: lease up to p_limit ready rows of a channel to p_worker for '
    'p_lease_seconds, in claim order, skipping rows other workers hold (p_since: only rows '
    'created after it). Planned once per session (schema 0023).';
REVOKE ALL ON FUNCTION pgnotify.claim(text, integer, text, double precision, timestamptz) FROM PUBLIC;

PERFORM pgnotify.apply_grants();
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_worker') THEN
    GRANT EXECUTE ON FUNCTION pgnotify.claim(text, integer, text, double precision, timestamptz)
        TO pgnotify_worker;
END IF;
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_admin') THEN
    GRANT EXECUTE ON FUNCTION pgnotify.claim(text, integer, text, double precision, timestamptz)
        TO pgnotify_admin;
END IF;

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (23, 'lean worker path');
END
$migration$;
COMMIT;
