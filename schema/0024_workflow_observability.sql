-- pgnotify-worker migration 0024: workflow observability and retention (issue 15).
--   1. workflow_runs.waiting_on: what a running run waits for, set by the runner when it leaves
--      a run waiting: 'delay' (a delay step), 'send' (a condition waiting for an earlier send's
--      notification to settle); NULL otherwise (due now, or never evaluated). The metrics and
--      /status split the running runs by it; workflow_runs_view shows it (a column appended).
--   2. Retention deletes finished workflow runs (and their run steps): completed and cancelled
--      ones finished longer ago than `keep`, failed ones longer ago than `keep_dead` (the
--      periods of the notifications), in committed batches walked by the primary key like the
--      notifications, and never a run one of whose notifications is still kept (its
--      processing_timeline still names the run). purge_workflow_runs() deletes one batch as the
--      schema owner: the worker role that runs retention still cannot DELETE runs itself.
-- Idempotent: does nothing when version 24 is recorded.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 24) THEN
    RAISE NOTICE 'pgnotify migration 24 (workflow observability) is already applied';
    RETURN;
END IF;

-------------------------------------------------------------------------------------------------
-- 1. What a running run waits for.
-------------------------------------------------------------------------------------------------
ALTER TABLE pgnotify.workflow_runs
    ADD COLUMN waiting_on text,
    ADD CONSTRAINT workflow_runs_waiting_on_known CHECK (waiting_on IN ('delay', 'send'));
COMMENT ON COLUMN pgnotify.workflow_runs.waiting_on IS
    'While running and not due: delay (a delay step) or send (a condition waits for an earlier '
    'send''s notification to settle); NULL when due or not evaluated yet.';

-- From the only definition (0017), with waiting_on appended.
CREATE OR REPLACE VIEW pgnotify.workflow_runs_view AS
SELECT r.id AS run_id, r.workflow, r.version, r.user_id,
       CASE WHEN r.status = 'running' AND r.next_at > now() THEN 'waiting' ELSE r.status END
           AS state,
       r.current_step, r.next_at, r.reason, r.idempotency_key,
       (SELECT count(*) FROM pgnotify.workflow_run_steps s WHERE s.run_id = r.id) AS steps_done,
       last.step AS last_step, last.outcome AS last_outcome, last.detail AS last_detail,
       last.notification_id AS last_notification_id,
       r.created_at, r.updated_at, r.finished_at,
       CASE WHEN r.status = 'running' AND r.next_at > now() THEN r.waiting_on END AS waiting_on
FROM pgnotify.workflow_runs r
LEFT JOIN LATERAL (SELECT s.step, s.outcome, s.detail, s.notification_id
                   FROM pgnotify.workflow_run_steps s WHERE s.run_id = r.id
                   ORDER BY s.id DESC LIMIT 1) last ON true;
COMMENT ON VIEW pgnotify.workflow_runs_view IS
    'Each run: state (running, waiting, completed, cancelled, failed), the step it is at, the '
    'last step it did and why it stopped; a waiting run''s waiting_on (delay or send).';

-------------------------------------------------------------------------------------------------
-- 2. Retention of finished runs.
-------------------------------------------------------------------------------------------------
-- One batch: the next `batch` runs by id after `after_id`; deletes those finished long enough
-- ago whose notifications are all gone. last_id NULL: nothing further can be due (the walk
-- stops at the first runs created after the shorter period: a run finishes after it starts).
CREATE FUNCTION pgnotify.purge_workflow_runs(keep interval, keep_dead interval, after_id bigint,
                                             batch integer DEFAULT 5000,
                                             OUT removed integer, OUT last_id bigint)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp AS $fn$
#variable_conflict use_column
DECLARE
    oldest timestamptz;
BEGIN
    removed := 0;
    SELECT max(c.id), min(c.created_at) INTO last_id, oldest
    FROM (SELECT r.id, r.created_at FROM pgnotify.workflow_runs r
          WHERE r.id > purge_workflow_runs.after_id
          ORDER BY r.id LIMIT greatest(purge_workflow_runs.batch, 1)) c;
    IF last_id IS NULL OR oldest >= now() - least(purge_workflow_runs.keep,
                                                  purge_workflow_runs.keep_dead) THEN
        last_id := NULL;
        RETURN;
    END IF;
    WITH doomed AS (
        SELECT r.id FROM pgnotify.workflow_runs r
        WHERE r.id > purge_workflow_runs.after_id AND r.id <= last_id
          AND ((r.status IN ('completed', 'cancelled')
                AND r.finished_at < now() - purge_workflow_runs.keep)
            OR (r.status = 'failed' AND r.finished_at < now() - purge_workflow_runs.keep_dead))
          AND NOT EXISTS (SELECT 1 FROM pgnotify.workflow_run_steps s
                          JOIN pgnotify.notifications n ON n.id = s.notification_id
                          WHERE s.run_id = r.id)
        FOR UPDATE OF r SKIP LOCKED
    )
    DELETE FROM pgnotify.workflow_runs r USING doomed WHERE r.id = doomed.id;
    GET DIAGNOSTICS removed = ROW_COUNT;
END
$fn$;
COMMENT ON FUNCTION pgnotify.purge_workflow_runs IS
    'Retention of workflow runs, one batch: delete the runs with ids after after_id (the next '
    '`batch`) that finished before now() - keep (failed: keep_dead) and whose notifications '
    'are all deleted; their run steps go with them. last_id: where the next batch starts, NULL '
    'when no later run can be due. apply_retention() calls it.';

-- From the newest definition (0021), with the workflow runs' batches after the notifications'
-- (so the notifications that kept a run are gone first).
CREATE OR REPLACE PROCEDURE pgnotify.apply_retention(keep interval DEFAULT '30 days',
                                                     keep_dead interval DEFAULT '90 days',
                                                     batch integer DEFAULT 5000)
LANGUAGE plpgsql AS $fn$
DECLARE
    removed integer;
    after_id bigint := 0;
    last_id bigint;
    youngest_due timestamptz;
    oldest timestamptz;
BEGIN
    LOOP
        youngest_due := now() - least(keep, keep_dead);
        SELECT max(c.id), min(least(c.created_at, c.updated_at)) INTO last_id, oldest
        FROM (SELECT id, created_at, updated_at FROM pgnotify.notifications
              WHERE id > after_id ORDER BY id LIMIT batch) c;
        EXIT WHEN last_id IS NULL OR oldest >= youngest_due;
        WITH doomed AS (
            SELECT id FROM pgnotify.notifications
            WHERE id > after_id AND id <= last_id
              AND ((status IN ('sent', 'cancelled', 'skipped', 'digested', 'expired')
                    AND updated_at < now() - keep)
                OR (status IN ('dead', 'failed') AND updated_at < now() - keep_dead))
            FOR UPDATE SKIP LOCKED
        ), inbox_gone AS (
            DELETE FROM pgnotify.inbox i USING doomed
            WHERE i.notification_id = doomed.id AND i.read_at IS NOT NULL
        )
        DELETE FROM pgnotify.notifications n USING doomed WHERE n.id = doomed.id;
        GET DIAGNOSTICS removed = ROW_COUNT;
        RAISE NOTICE 'pgnotify retention: % rows', removed;
        after_id := last_id;
        COMMIT;  -- each batch its own transaction: no long locks, vacuum keeps up
    END LOOP;
    -- finished workflow runs, once their notifications are gone
    after_id := 0;
    LOOP
        SELECT p.removed, p.last_id INTO removed, last_id
        FROM pgnotify.purge_workflow_runs(keep, keep_dead, after_id, batch) p;
        EXIT WHEN last_id IS NULL;
        IF removed > 0 THEN
            RAISE NOTICE 'pgnotify workflow runs deleted: %', removed;
        END IF;
        after_id := last_id;
        COMMIT;
    END LOOP;
    COMMIT;
    -- a day of events goes when no row it may describe is kept any more
    PERFORM pgnotify.maintain_event_partitions(keep => greatest(keep, keep_dead));
    COMMIT;
    DELETE FROM pgnotify.job_runs WHERE started_at < now() - keep_dead;
    COMMIT;
END
$fn$;

PERFORM pgnotify.apply_grants();
REVOKE EXECUTE ON FUNCTION pgnotify.purge_workflow_runs(interval, interval, bigint, integer)
    FROM PUBLIC;
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_worker') THEN
    GRANT EXECUTE ON FUNCTION pgnotify.purge_workflow_runs(interval, interval, bigint, integer)
        TO pgnotify_worker;
END IF;
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_admin') THEN
    GRANT EXECUTE ON FUNCTION pgnotify.purge_workflow_runs(interval, interval, bigint, integer)
        TO pgnotify_admin;
END IF;

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (24, 'workflow observability');
END
$migration$;
COMMIT;
