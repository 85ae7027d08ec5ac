-- pgnotify-worker migration 0012: which channels a worker with a real provider has served, and
-- until when. A worker whose channel only has a dev sink (console, file: PGNOTIFY_SIMULATE or a
-- provider list naming them) never takes a row created while a real provider served that
-- channel: such a row waits for a real provider instead of being "sent" to a console.
-- Idempotent: does nothing when version 12 is recorded.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 12) THEN
    RAISE NOTICE 'pgnotify migration 12 (delivery_modes) is already applied';
    RETURN;
END IF;

CREATE TABLE pgnotify.delivery_modes (
    channel text PRIMARY KEY,
    real_seen_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgnotify.delivery_modes IS
    'Last time a worker with a real (not dev-sink) provider served each channel; rows created '
    'before it are never taken by a dev sink.';

PERFORM pgnotify.apply_grants();
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_worker') THEN
    GRANT SELECT, INSERT, UPDATE ON pgnotify.delivery_modes TO pgnotify_worker;
END IF;
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_admin') THEN
    GRANT SELECT, INSERT, UPDATE, DELETE ON pgnotify.delivery_modes TO pgnotify_admin;
END IF;

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (12, 'delivery_modes');
END
$migration$;
COMMIT;
