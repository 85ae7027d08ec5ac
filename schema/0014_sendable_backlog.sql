-- pgnotify-worker migration 0014: the backlog an autoscaler should count. Ready rows of a channel
-- nobody can send (no usable provider, every provider paused) wait whatever the replica count;
-- counting them made KEDA scale to its maximum for nothing.
--   channel_health: each worker upserts, every PGNOTIFY_QUEUE_METRICS_INTERVAL, whether it can
--     send each of its channels now (enabled, not every provider paused), valid for two intervals.
--   sendable_backlog: one row, `ready` = the ready rows of channels some live worker can send.
--   pgnotify_scaler: a NOLOGIN group role (created when missing and when this user may) that may
--     read sendable_backlog and nothing else: the autoscaler's login role goes in it.
-- Idempotent: does nothing when version 14 is recorded.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 14) THEN
    RAISE NOTICE 'pgnotify migration 14 (sendable_backlog) is already applied';
    RETURN;
END IF;

CREATE TABLE pgnotify.channel_health (
    channel text NOT NULL,
    worker text NOT NULL,
    sendable boolean NOT NULL,
    seen_at timestamptz NOT NULL DEFAULT now(),
    valid_until timestamptz NOT NULL,
    PRIMARY KEY (channel, worker)
);
COMMENT ON TABLE pgnotify.channel_health IS
    'Whether each worker can send each of its channels now (a usable provider, not all paused), '
    'as it last said at seen_at; a row past valid_until (two refresh intervals) counts for nothing.';

-- The view runs with its owner's rights (a plain view), so the scaler needs SELECT on it only.
CREATE VIEW pgnotify.sendable_backlog AS
SELECT count(*)::bigint AS ready
FROM pgnotify.notifications n
WHERE n.status = 'queued'
  AND n.channel IN (
      SELECT h.channel FROM pgnotify.channel_health h
      WHERE h.sendable AND h.valid_until > now());
COMMENT ON VIEW pgnotify.sendable_backlog IS
    'Ready rows of the channels some live worker can send: what more replicas would clear. '
    'The autoscaler reads this (role pgnotify_scaler).';

IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_scaler') THEN
    BEGIN
        CREATE ROLE pgnotify_scaler NOLOGIN;
    EXCEPTION
        WHEN insufficient_privilege THEN
            RAISE NOTICE 'pgnotify: cannot create role pgnotify_scaler (this user lacks '
                'CREATEROLE); create it, then GRANT USAGE ON SCHEMA pgnotify and SELECT ON '
                'pgnotify.sendable_backlog TO pgnotify_scaler';
        WHEN duplicate_object OR unique_violation THEN
            NULL;  -- another database's migration created it at the same moment
    END;
END IF;

PERFORM pgnotify.apply_grants();
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_worker') THEN
    GRANT SELECT, INSERT, UPDATE, DELETE ON pgnotify.channel_health TO pgnotify_worker;
    GRANT SELECT ON pgnotify.sendable_backlog TO pgnotify_worker;
END IF;
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_admin') THEN
    GRANT SELECT, INSERT, UPDATE, DELETE ON pgnotify.channel_health TO pgnotify_admin;
    GRANT SELECT ON pgnotify.sendable_backlog TO pgnotify_admin;
END IF;
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_scaler') THEN
    GRANT USAGE ON SCHEMA pgnotify TO pgnotify_scaler;
    GRANT SELECT ON pgnotify.sendable_backlog TO pgnotify_scaler;
END IF;

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (14, 'sendable_backlog');
END
$migration$;
COMMIT;
