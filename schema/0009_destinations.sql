-- pgnotify-worker migration 0009: destinations (webhook endpoints, push services) recorded while
-- they fail, and disabled when they keep failing (PGNOTIFY_DESTINATION_DISABLE_AFTER). The worker
-- inserts a row when a destination's circuit opens, deletes it when the destination answers
-- again, and sets disabled_at once it has been failing long enough; rows for a disabled
-- destination then fail with destination_disabled. pgnotify.enable_destination(origin)
-- re-enables one. Idempotent: does nothing when version 9 is recorded.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 9) THEN
    RAISE NOTICE 'pgnotify migration 9 (destinations) is already applied';
    RETURN;
END IF;

CREATE TABLE pgnotify.destinations (
    origin text PRIMARY KEY CHECK (origin ~ '^[a-z][a-z0-9+.-]*://.+:[0-9]+$'),
    failing_since timestamptz NOT NULL DEFAULT now(),
    last_failure_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    pauses integer NOT NULL DEFAULT 1,
    disabled_at timestamptz,
    disabled_reason text
);
COMMENT ON TABLE pgnotify.destinations IS
    'Destinations (scheme://host:port) failing since failing_since, or disabled (disabled_at).';
COMMENT ON COLUMN pgnotify.destinations.pauses IS
    'Times its circuit opened (each pause grows, up to retry_max_seconds).';

CREATE FUNCTION pgnotify.destination_origin(target text) RETURNS text
LANGUAGE sql IMMUTABLE AS $fn$
    -- 'https://Hooks.Acme.com/x?y' -> 'https://hooks.acme.com:443' (the worker's key)
    SELECT CASE WHEN m[3] IS NOT NULL THEN lower(m[1]) || '://' || lower(m[2]) || ':' || m[3]
                WHEN lower(m[1]) = 'https' THEN 'https://' || lower(m[2]) || ':443'
                WHEN lower(m[1]) = 'http' THEN 'http://' || lower(m[2]) || ':80'
           END
    FROM regexp_match(target, '^([A-Za-z][A-Za-z0-9+.-]*)://(?:[^/@]*@)?(\[[^]]*\]|[^/:?#]+)(?::([0-9]+))?') AS m;
$fn$;
COMMENT ON FUNCTION pgnotify.destination_origin IS
    'The destination key of a URL: scheme://host:port, the port always written.';

CREATE FUNCTION pgnotify.enable_destination(target text) RETURNS boolean
LANGUAGE sql AS $fn$
    -- forget its failures too: the next failure starts a new disable_after period
    WITH gone AS (
        DELETE FROM pgnotify.destinations WHERE origin = pgnotify.destination_origin(target)
        RETURNING disabled_at
    )
    SELECT coalesce(bool_or(disabled_at IS NOT NULL), false) FROM gone;
$fn$;
COMMENT ON FUNCTION pgnotify.enable_destination IS
    'Re-enable a disabled destination (an origin or any URL on it); true if it was disabled.';

CREATE FUNCTION pgnotify.disable_destination(target text, reason text DEFAULT 'disabled by hand')
RETURNS void
LANGUAGE sql AS $fn$
    INSERT INTO pgnotify.destinations (origin, last_error, disabled_at, disabled_reason)
    VALUES (pgnotify.destination_origin(target), reason, now(), reason)
    ON CONFLICT (origin) DO UPDATE
    SET disabled_at = coalesce(pgnotify.destinations.disabled_at, now()),
        disabled_reason = excluded.disabled_reason;
$fn$;
COMMENT ON FUNCTION pgnotify.disable_destination IS
    'Disable a destination by hand (an origin or any URL on it): its rows fail until re-enabled.';

-- least privilege (schema 0006): the worker records and reads destinations, admins manage them
PERFORM pgnotify.apply_grants();
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_worker') THEN
    GRANT SELECT, INSERT, UPDATE, DELETE ON pgnotify.destinations TO pgnotify_worker;
    GRANT EXECUTE ON FUNCTION pgnotify.destination_origin(text) TO pgnotify_worker;
END IF;
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_admin') THEN
    GRANT SELECT, INSERT, UPDATE, DELETE ON pgnotify.destinations TO pgnotify_admin;
END IF;

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (9, 'destinations');
END
$migration$;
COMMIT;
