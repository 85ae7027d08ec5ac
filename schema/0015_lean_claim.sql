-- pgnotify-worker migration 0015: one event row per attempt instead of two. The claim no longer
-- writes a 'claimed' event (it was half of the events table and a third of the statements' row
-- writes per notification): the attempt's outcome event carries when it was claimed.
--   events.claimed_at: when the attempt that this outcome ends was claimed (NULL for events that
--     end no attempt, and for rows written before this migration, which have their own 'claimed'
--     event row).
--   processing_timeline: still shows a 'claimed' step for every attempt: from the outcome's
--     claimed_at, and for a notification being sent right now from the row itself (locked_by,
--     attempts; the claim set updated_at and only the write-back changes it again).
-- Idempotent: does nothing when version 15 is recorded.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 15) THEN
    RAISE NOTICE 'pgnotify migration 15 (lean_claim) is already applied';
    RETURN;
END IF;

ALTER TABLE pgnotify.events ADD COLUMN IF NOT EXISTS claimed_at timestamptz;
COMMENT ON COLUMN pgnotify.events.claimed_at IS
    'When the attempt this outcome ends was claimed (processing_timeline shows it as a claimed '
    'step); NULL for events that end no attempt.';

CREATE OR REPLACE VIEW pgnotify.processing_timeline AS
SELECT n.id AS notification_id, n.channel, 'queued'::text AS event, 0 AS attempt,
       NULL::text AS worker, NULL::text AS provider, NULL::real AS duration_ms,
       NULL::text AS error_code, NULL::text AS error, n.created_at AS at, 0::bigint AS seq
FROM pgnotify.notifications n
UNION ALL
SELECT e.notification_id, n.channel, e.event, e.attempt, e.worker, e.provider, e.duration_ms,
       e.error_code, e.error, e.created_at, e.id
FROM pgnotify.events e
JOIN pgnotify.notifications n ON n.id = e.notification_id
UNION ALL
SELECT e.notification_id, n.channel, 'claimed', e.attempt, e.worker, NULL, NULL, NULL, NULL,
       e.claimed_at, e.id
FROM pgnotify.events e
JOIN pgnotify.notifications n ON n.id = e.notification_id
WHERE e.claimed_at IS NOT NULL
UNION ALL
SELECT n.id, n.channel, 'claimed', n.attempts, n.locked_by, NULL, NULL, NULL, NULL,
       n.updated_at, 0
FROM pgnotify.notifications n
WHERE n.status = 'processing';
COMMENT ON VIEW pgnotify.processing_timeline IS
    'Each notification''s steps in order: filter on notification_id, order by at, seq. A '
    'claimed step comes from the outcome event''s claimed_at (or the row, while it is sent).';

PERFORM pgnotify.apply_grants();
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_worker') THEN
    GRANT SELECT ON pgnotify.processing_timeline TO pgnotify_worker;
END IF;

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (15, 'lean_claim');
END
$migration$;
COMMIT;
