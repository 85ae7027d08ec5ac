-- pgnotify-worker migration 0028: the claim is planned for each call again (plan_cache_mode =
--   force_custom_plan on pgnotify.claim()).
--   0023 pinned the claim's statement to its generic plan, which PL/pgSQL keeps for the rest of
--   the session once made. A worker's first claim usually runs at start-up, and when the table
--   is empty then (a new installation, a table emptied by retention or TRUNCATE) that plan is
--   made for a table of no pages: a sequential scan and a sort of every row for the ready rows,
--   and another sequential scan for the UPDATE. It stayed until an ANALYZE of the table
--   invalidated it (autovacuum: up to a minute and more), and every claim of a backlog in
--   between read the whole table: seen in the drain benchmark as claims of 20-35 ms over 20,000
--   rows (380-480 us of PostgreSQL CPU per notification instead of ~50). A plan per call sees the
--   table as it is and the batch's real LIMIT; planning costs ~0.25 ms per claim, a few
--   microseconds per row of the batches a backlog is claimed in.
-- Idempotent: does nothing when pgnotify.schema_migrations records version 28.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 28) THEN
    RAISE NOTICE 'pgnotify migration 28 (claim plan per call) is already applied';
    RETURN;
END IF;

ALTER FUNCTION pgnotify.claim(text, integer, text, double precision, timestamptz)
    SET plan_cache_mode = force_custom_plan;
COMMENT ON FUNCTION pgnotify.claim(text, integer, text, double precision, timestamptz) IS
    'Lease up to p_limit ready rows of a channel to worker p_worker for p_lease_seconds, in claim '
    'order (priority, run_at, id); planned for each call (schema 0028: a plan kept from a call '
    'on an empty table read the whole table on every later claim).';

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (28, 'claim plan per call');
END
$migration$;
COMMIT;
