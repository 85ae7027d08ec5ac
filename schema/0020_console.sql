-- pgnotify-worker migration 0020: what the admin console (/console/) needs.
--   paused_channels: a channel listed here is not claimed by any worker (its rows wait, nothing
--     is lost); pgnotify.pause_channel(channel, reason, by) / resume_channel(channel, by) are the
--     one way in or out, for the console and for scripts alike; resume wakes the workers.
--   sendable_backlog leaves paused channels out (the autoscaler does not scale for them).
--   channel_health.version: each worker says which version it runs beside its heartbeat, so the
--     console lists the workers alive with their version.
--   Indexes for the console's notification list (newest first, keyset pagination by id) filtered
--     by status, channel, category or recipient: each filter is an index scan, never a scan of
--     the table, with 10 million rows.
-- Idempotent: does nothing when version 20 is recorded.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 20) THEN
    RAISE NOTICE 'pgnotify migration 20 (console) is already applied';
    RETURN;
END IF;

CREATE TABLE pgnotify.paused_channels (
    channel text PRIMARY KEY
        CONSTRAINT paused_channels_channel_is_known
        CHECK (channel IN ('email', 'sms', 'push', 'webhook', 'inapp')),
    reason text,
    paused_by text,
    paused_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgnotify.paused_channels IS
    'Channels no worker claims from (rows wait, nothing is lost). Use pgnotify.pause_channel() '
    'and pgnotify.resume_channel().';

CREATE FUNCTION pgnotify.pause_channel(p_channel text, p_reason text DEFAULT NULL,
                                       p_by text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql AS $fn$
DECLARE
    done text;
BEGIN
    IF p_channel IS NULL OR p_channel NOT IN ('email', 'sms', 'push', 'webhook', 'inapp') THEN
        PERFORM pgnotify.reject('channel', format('unknown channel %L', p_channel),
                                'one of email, sms, push, webhook, inapp');
    END IF;
    INSERT INTO pgnotify.paused_channels (channel, reason, paused_by)
    VALUES (p_channel, p_reason, coalesce(p_by, session_user))
    ON CONFLICT (channel) DO NOTHING
    RETURNING channel INTO done;
    RETURN done IS NOT NULL;
END
$fn$;
COMMENT ON FUNCTION pgnotify.pause_channel IS
    'Stop every worker claiming rows of a channel (they wait); false if it was already paused.';

CREATE FUNCTION pgnotify.resume_channel(p_channel text, p_by text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql AS $fn$
DECLARE
    done text;
BEGIN
    DELETE FROM pgnotify.paused_channels WHERE channel = p_channel RETURNING channel INTO done;
    IF done IS NULL THEN
        RETURN false;
    END IF;
    PERFORM pg_notify('pgnotify', done);  -- the waiting rows are claimable again: wake workers
    RETURN true;
END
$fn$;
COMMENT ON FUNCTION pgnotify.resume_channel IS
    'Let workers claim a paused channel again (and wake them); false if it was not paused.';

ALTER FUNCTION pgnotify.pause_channel(text, text, text)
    SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp;
ALTER FUNCTION pgnotify.resume_channel(text, text)
    SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp;

ALTER TABLE pgnotify.channel_health ADD COLUMN IF NOT EXISTS version text;

-- A paused channel's ready rows wait whatever the replica count: not a backlog to scale for
-- (schema 0014's view, plus the last condition).
CREATE OR REPLACE VIEW pgnotify.sendable_backlog AS
SELECT count(*)::bigint AS ready
FROM pgnotify.notifications n
WHERE n.status = 'queued'
  AND n.channel IN (
      SELECT h.channel FROM pgnotify.channel_health h
      WHERE h.sendable AND h.valid_until > now())
  AND n.channel NOT IN (SELECT p.channel FROM pgnotify.paused_channels p);

-- The console's list: newest first within one status, channel, category or recipient. The
-- status index carries what pgnotify.queue_status counts (channel, attempts, run_at), so the
-- per-channel counts (the console's overview, /status, the queue gauges) are an index-only scan
-- instead of a visit to every unfinished row's page.
CREATE INDEX IF NOT EXISTS notifications_status_id_idx ON pgnotify.notifications (status, id)
    INCLUDE (channel, attempts, run_at);
CREATE INDEX IF NOT EXISTS notifications_channel_id_idx ON pgnotify.notifications (channel, id);
CREATE INDEX IF NOT EXISTS notifications_category_id_idx ON pgnotify.notifications (category, id)
    WHERE category IS NOT NULL;
CREATE INDEX IF NOT EXISTS notifications_recipient_idx ON pgnotify.notifications (recipient, id);

PERFORM pgnotify.apply_grants();
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_worker') THEN
    -- the claim reads it; the console (served by the worker) pauses and resumes channels
    GRANT SELECT ON pgnotify.paused_channels TO pgnotify_worker;
    GRANT EXECUTE ON FUNCTION pgnotify.pause_channel(text, text, text),
        pgnotify.resume_channel(text, text) TO pgnotify_worker;
END IF;
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_admin') THEN
    GRANT SELECT, INSERT, UPDATE, DELETE ON pgnotify.paused_channels TO pgnotify_admin;
    GRANT EXECUTE ON FUNCTION pgnotify.pause_channel(text, text, text),
        pgnotify.resume_channel(text, text) TO pgnotify_admin;
END IF;

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (20, 'console');
END
$migration$;
COMMIT;
