-- pgnotify-worker migration 0007: one lease reaper. The worker and the SQL function used to
-- disagree (grace, error text, wake-up); now the worker calls pgnotify.reap_expired_leases()
-- and requeue_expired_leases() (kept for the reap_leases job and runbooks) counts its rows.
-- Idempotent: does nothing when version 7 is recorded.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 7) THEN
    RAISE NOTICE 'pgnotify migration 7 (reaper) is already applied';
    RETURN;
END IF;

CREATE FUNCTION pgnotify.reap_expired_leases(max_rows integer DEFAULT 1000)
RETURNS TABLE (channel text, requeued bigint, dead bigint)
LANGUAGE sql AS $fn$
    WITH expired AS (
        SELECT id, locked_by AS lost_worker FROM pgnotify.notifications
        WHERE status = 'processing' AND locked_until < now()
        ORDER BY locked_until
        LIMIT max_rows
        FOR UPDATE SKIP LOCKED
    ), requeued AS (
        UPDATE pgnotify.notifications n
        SET status = CASE WHEN n.attempts >= n.max_attempts THEN 'dead' ELSE 'queued' END,
            last_error = CASE WHEN n.attempts >= n.max_attempts
                THEN format('lease expired during attempt %s: the worker stopped responding '
                            '(gave up after %s attempts)', n.attempts, n.attempts)
                ELSE n.last_error END,
            locked_by = NULL, locked_until = NULL, updated_at = now()
        FROM expired WHERE n.id = expired.id
        RETURNING n.id, n.channel, n.status, n.attempts, expired.lost_worker
    ), logged AS (
        INSERT INTO pgnotify.events (notification_id, event, attempt, worker, error_code, error)
        SELECT id, CASE WHEN status = 'dead' THEN 'dead' ELSE 'lease_expired' END, attempts,
               lost_worker, 'lease_expired',
               format('lease of worker %s expired during attempt %s', lost_worker, attempts)
        FROM requeued
    ), counted AS (
        SELECT r.channel, count(*) FILTER (WHERE r.status = 'queued') AS requeued,
               count(*) FILTER (WHERE r.status = 'dead') AS dead
        FROM requeued r GROUP BY r.channel
    )
    -- wake every replica for the requeued rows (one NOTIFY per channel)
    SELECT c.channel, c.requeued, c.dead
    FROM counted c CROSS JOIN LATERAL (SELECT pg_notify('pgnotify', c.channel)) AS woken;
$fn$;
COMMENT ON FUNCTION pgnotify.reap_expired_leases IS
    'Requeue (or, at max_attempts, kill) up to max_rows rows whose lease expired; per channel.';

CREATE OR REPLACE FUNCTION pgnotify.requeue_expired_leases() RETURNS integer
LANGUAGE sql AS $fn$
    SELECT coalesce(sum(requeued + dead), 0)::integer FROM pgnotify.reap_expired_leases(100000);
$fn$;
COMMENT ON FUNCTION pgnotify.requeue_expired_leases IS
    'The lease reaper as SQL: rows requeued or killed (see reap_expired_leases).';

-- the new function gets the grants of the rest: the worker and admins, not PUBLIC
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_worker') THEN
    GRANT EXECUTE ON FUNCTION pgnotify.reap_expired_leases(integer) TO pgnotify_worker;
END IF;
PERFORM pgnotify.apply_grants();

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (7, 'reaper');
END
$migration$;
COMMIT;
