-- pgnotify-worker migration 0021: history that never bloats. pgnotify.events becomes a table
-- partitioned by day (created_at, UTC): retiring a day of history is DROP TABLE of one partition,
-- not millions of row DELETEs that vacuum must then clean up.
--   events: the partitioned parent (same columns, same ids going on). Every reader and writer
--     keeps using pgnotify.events; partitions are an implementation detail.
--   events_before_0021: the existing table with its rows, attached as the partition of
--     everything before the first daily partition (dropped by retention like any other).
--   events_pYYYYMMDD: one partition per UTC day, created ahead of time by the
--     event_partitions job (pgnotify.maintain_event_partitions); events_default catches a row no
--     day partition covers yet, so a write never fails.
--   event_partitions: a view of the partitions, their time ranges, rows (estimated) and size.
--   apply_retention: no longer deletes events row by row; it drops the partitions older than
--     greatest(keep, keep_dead), so no kept notification loses its history; its batches of
--     notifications walk the primary key instead of scanning the table for each batch.
--   queue_status: counts per status through partial indexes (no scan of finished rows).
-- Locks: ACCESS EXCLUSIVE on pgnotify.events for the whole migration: two sequential reads of
-- the existing table (its newest created_at, then ATTACH's check of the range), no rewrite, no
-- index build; writers of events (claims, completions) wait for it, readers too. SHARE on
-- pgnotify.notifications while its new partial index builds, only when it holds under 1M rows
-- (otherwise a NOTICE gives the CREATE INDEX CONCURRENTLY to run).
-- Idempotent: does nothing when version 21 is recorded.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
DECLARE
    seq regclass;
    next_id bigint;
    newest timestamptz;
    split timestamptz;
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 21) THEN
    RAISE NOTICE 'pgnotify migration 21 (history_partitions) is already applied';
    RETURN;
END IF;

-------------------------------------------------------------------------------------------------
-- events: the existing table becomes the first partition of a partitioned pgnotify.events.
-------------------------------------------------------------------------------------------------
LOCK TABLE pgnotify.events IN ACCESS EXCLUSIVE MODE;
seq := pg_get_serial_sequence('pgnotify.events', 'id')::regclass;
EXECUTE format('SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END FROM %s', seq)
    INTO next_id;
-- The old table covers everything up to the end of the day of its newest row (at least the end
-- of today), so no row of it falls outside its range and ATTACH's check passes.
SELECT max(created_at) INTO newest FROM pgnotify.events;
split := date_trunc('day', greatest(now(), coalesce(newest, now())) AT TIME ZONE 'UTC')
         AT TIME ZONE 'UTC' + interval '1 day';

ALTER TABLE pgnotify.events RENAME TO events_before_0021;
ALTER INDEX pgnotify.events_pkey RENAME TO events_before_0021_pkey;
ALTER INDEX pgnotify.events_notification_idx RENAME TO events_before_0021_notification_idx;
ALTER INDEX pgnotify.events_errors_idx RENAME TO events_before_0021_errors_idx;
ALTER INDEX pgnotify.events_external_idx RENAME TO events_before_0021_external_idx;
-- a partition cannot have an identity of its own: the parent's goes on from the same number
ALTER TABLE pgnotify.events_before_0021 ALTER COLUMN id DROP IDENTITY;

EXECUTE format($sql$
CREATE TABLE pgnotify.events (
    id              bigint GENERATED ALWAYS AS IDENTITY (START WITH %s) NOT NULL,
    notification_id bigint NOT NULL,
    event           text NOT NULL,
    attempt         integer NOT NULL DEFAULT 0,
    worker          text,
    provider        text,
    duration_ms     real,
    error_code      text,
    error           text,
    detail          jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    external_id     text,
    claimed_at      timestamptz
) PARTITION BY RANGE (created_at)
$sql$, next_id);
COMMENT ON TABLE pgnotify.events IS
    'What happened to each notification: claimed, sent, retry_scheduled, failed, dead, cancelled, '
    'lease_expired, released, replayed. The queued step is the notification''s created_at. '
    'Partitioned by day (UTC) of created_at: retention drops whole days (see event_partitions).';
COMMENT ON COLUMN pgnotify.events.claimed_at IS
    'When the attempt this outcome ends was claimed (processing_timeline shows it as a claimed '
    'step); NULL for events that end no attempt.';
-- Indexes on the parent match the old table's, so ATTACH adopts them instead of building them.
-- The id index and the unique (provider, external_id) of inbound reports are per partition
-- (a unique index of the parent would have to contain created_at).
CREATE INDEX events_notification_idx ON pgnotify.events (notification_id, id);
CREATE INDEX events_errors_idx ON pgnotify.events (created_at) WHERE error IS NOT NULL;
-- Row triggers live on the parent (PostgreSQL clones them onto every partition, present and
-- future): the old table's own copy goes first (0018's provider-report NOTIFY).
DROP TRIGGER IF EXISTS events_provider_report ON pgnotify.events_before_0021;
EXECUTE format('ALTER TABLE pgnotify.events ATTACH PARTITION pgnotify.events_before_0021 '
               'FOR VALUES FROM (MINVALUE) TO (%L)',
               to_char(split AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || '+00');
COMMENT ON TABLE pgnotify.events_before_0021 IS
    'The events written before migration 0021, as one partition: dropped by retention once its '
    'newest possible row is older than the retention period.';

CREATE TABLE pgnotify.events_default PARTITION OF pgnotify.events DEFAULT;
CREATE INDEX events_default_id_idx ON pgnotify.events_default (id);
CREATE UNIQUE INDEX events_default_external_idx ON pgnotify.events_default (provider, external_id)
    WHERE external_id IS NOT NULL;
COMMENT ON TABLE pgnotify.events_default IS
    'Events no day partition covers (none while the event_partitions job runs): retention '
    'deletes its old rows.';
CREATE TRIGGER events_provider_report
    AFTER INSERT ON pgnotify.events
    FOR EACH ROW WHEN (NEW.external_id IS NOT NULL)
    EXECUTE FUNCTION pgnotify.provider_report_recorded();

-- The views that read events are bound to the table they were created on (now the old
-- partition): the same definitions again bind them to the parent.
CREATE OR REPLACE VIEW pgnotify.error_summary AS
SELECT n.channel,
       e.provider,
       e.error_code,
       e.error,
       count(*)                                  AS occurrences,
       count(DISTINCT e.notification_id)         AS notifications,
       count(*) FILTER (WHERE e.event = 'dead')  AS dead,
       count(*) FILTER (WHERE e.event = 'failed') AS failed,
       min(e.created_at)                         AS first_seen,
       max(e.created_at)                         AS last_seen
FROM pgnotify.events e
JOIN pgnotify.notifications n ON n.id = e.notification_id
WHERE e.error IS NOT NULL
GROUP BY n.channel, e.provider, e.error_code, e.error
ORDER BY max(e.created_at) DESC;

-- (the newest definition: 0017's, with 0015's claimed steps and the workflow rows)
CREATE OR REPLACE VIEW pgnotify.processing_timeline AS
SELECT n.id AS notification_id, n.channel, 'queued'::text AS event, 0 AS attempt,
       NULL::text AS worker, NULL::text AS provider, NULL::real AS duration_ms,
       NULL::text AS error_code, NULL::text AS error, n.created_at AS at, 0::bigint AS seq,
       ws.run_id AS workflow_run_id, ws.step AS workflow_step
FROM pgnotify.notifications n
LEFT JOIN pgnotify.workflow_run_steps ws ON ws.notification_id = n.id
UNION ALL
SELECT e.notification_id, n.channel, e.event, e.attempt, e.worker, e.provider, e.duration_ms,
       e.error_code, e.error, e.created_at, e.id, ws.run_id, ws.step
FROM pgnotify.events e
JOIN pgnotify.notifications n ON n.id = e.notification_id
LEFT JOIN pgnotify.workflow_run_steps ws ON ws.notification_id = e.notification_id
UNION ALL
SELECT e.notification_id, n.channel, 'claimed', e.attempt, e.worker, NULL, NULL, NULL, NULL,
       e.claimed_at, e.id, ws.run_id, ws.step
FROM pgnotify.events e
JOIN pgnotify.notifications n ON n.id = e.notification_id
LEFT JOIN pgnotify.workflow_run_steps ws ON ws.notification_id = e.notification_id
WHERE e.claimed_at IS NOT NULL
UNION ALL
SELECT n.id, n.channel, 'claimed', n.attempts, n.locked_by, NULL, NULL, NULL, NULL,
       n.updated_at, 0, ws.run_id, ws.step
FROM pgnotify.notifications n
LEFT JOIN pgnotify.workflow_run_steps ws ON ws.notification_id = n.id
WHERE n.status = 'processing'
UNION ALL
SELECT s.notification_id, n.channel, 'workflow_' || s.kind, 0, s.worker, NULL, NULL,
       s.outcome, s.detail, s.at, s.id, s.run_id, s.step
FROM pgnotify.workflow_run_steps s
LEFT JOIN pgnotify.notifications n ON n.id = s.notification_id
UNION ALL
SELECT NULL, NULL, 'workflow_' || r.status, 0, NULL, NULL, NULL, NULL, r.reason, r.finished_at,
       0, r.id, r.current_step
FROM pgnotify.workflow_runs r
WHERE r.status <> 'running';

CREATE OR REPLACE VIEW pgnotify.failed_report AS
SELECT n.id, n.channel, n.status, n.category, n.user_id, n.recipient, n.attempts,
       n.max_attempts, n.provider, n.last_error,
       (SELECT e.error_code FROM pgnotify.events e
        WHERE e.notification_id = n.id AND e.error_code IS NOT NULL
        ORDER BY e.id DESC LIMIT 1) AS error_code,
       n.created_at, n.updated_at AS failed_at
FROM pgnotify.notifications n
WHERE n.status IN ('failed', 'dead')
ORDER BY n.updated_at DESC;

IF EXISTS (
    SELECT 1 FROM pg_depend d JOIN pg_rewrite r ON r.oid = d.objid
    WHERE d.classid = 'pg_rewrite'::regclass
      AND d.refobjid = 'pgnotify.events_before_0021'::regclass
      AND r.ev_class <> 'pgnotify.events_before_0021'::regclass
) THEN
    RAISE EXCEPTION 'pgnotify migration 21: a view still reads pgnotify.events_before_0021 '
        'directly; recreate it on pgnotify.events';
END IF;

-------------------------------------------------------------------------------------------------
-- The partitions, and their upkeep.
-------------------------------------------------------------------------------------------------
CREATE VIEW pgnotify.event_partitions AS
SELECT c.relname::text AS partition,
       b.expr = 'DEFAULT' AS is_default,
       CASE WHEN b.expr LIKE '%FROM (MINVALUE)%' THEN '-infinity'::timestamptz
            ELSE substring(b.expr FROM 'FROM \(''([^'']*)''\)')::timestamptz END AS range_from,
       substring(b.expr FROM 'TO \(''([^'']*)''\)')::timestamptz AS range_to,
       greatest(c.reltuples, 0)::bigint AS estimated_rows,
       pg_total_relation_size(c.oid) AS bytes
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS expr) b
WHERE i.inhparent = 'pgnotify.events'::regclass;
COMMENT ON VIEW pgnotify.event_partitions IS
    'The partitions of pgnotify.events: time range (UTC days; the default one has none), rows '
    '(planner estimate) and bytes on disk. Retention drops those whose range_to is older than it.';

-- Create the day partitions of today and the next `ahead` days; with `keep`, drop those whose
-- every row is older than keep and delete the default partition's old rows. A partition whose
-- lock is not granted within lock_timeout is left for the next run (a NOTICE says so), so this
-- never stalls the claims and completions writing events for long.
CREATE FUNCTION pgnotify.maintain_event_partitions(keep interval DEFAULT NULL,
                                                   ahead integer DEFAULT 7)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pgnotify, pg_temp
SET lock_timeout = '2s'
AS $fn$
DECLARE
    today timestamptz := date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    day timestamptz;
    part text;
    changed integer := 0;
    doomed record;
BEGIN
    IF ahead IS NULL OR ahead < 0 OR ahead > 366 THEN
        RAISE EXCEPTION 'ahead must be between 0 and 366 days, not %', ahead
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF keep < interval '0' THEN
        RAISE EXCEPTION 'keep cannot be negative (%)', keep
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR i IN 0..ahead LOOP
        day := today + make_interval(days => i);
        part := 'events_p' || to_char(day AT TIME ZONE 'UTC', 'YYYYMMDD');
        CONTINUE WHEN EXISTS (
            SELECT 1 FROM pgnotify.event_partitions p
            WHERE NOT p.is_default AND p.range_from < day + interval '1 day' AND p.range_to > day);
        BEGIN
            EXECUTE format('CREATE TABLE pgnotify.%I PARTITION OF pgnotify.events '
                           'FOR VALUES FROM (%L) TO (%L)', part,
                           to_char(day AT TIME ZONE 'UTC', 'YYYY-MM-DD') || ' 00:00:00+00',
                           to_char((day + interval '1 day') AT TIME ZONE 'UTC', 'YYYY-MM-DD')
                               || ' 00:00:00+00');
            EXECUTE format('CREATE INDEX %I ON pgnotify.%I (id)', part || '_id_idx', part);
            EXECUTE format('CREATE UNIQUE INDEX %I ON pgnotify.%I (provider, external_id) '
                           'WHERE external_id IS NOT NULL', part || '_external_idx', part);
            -- Rows are written and read through pgnotify.events (its grants); admins, who read
            -- every table, may read a partition directly too. Producers get nothing.
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_admin') THEN
                EXECUTE format('GRANT SELECT ON pgnotify.%I TO pgnotify_admin', part);
            END IF;
            changed := changed + 1;
        EXCEPTION
            WHEN lock_not_available THEN
                RAISE NOTICE 'pgnotify: partition % not created (pgnotify.events is busy); the '
                    'next run tries again', part;
            WHEN check_violation THEN
                RAISE NOTICE 'pgnotify: partition % not created: events_default holds rows of '
                    'that day (they stay there until retention deletes them)', part;
        END;
    END LOOP;
    IF keep IS NOT NULL THEN
        FOR doomed IN
            SELECT p.partition FROM pgnotify.event_partitions p
            WHERE NOT p.is_default AND p.range_to <= now() - keep
            ORDER BY p.range_to
        LOOP
            BEGIN
                EXECUTE format('DROP TABLE pgnotify.%I', doomed.partition);
                RAISE NOTICE 'pgnotify: dropped event partition %', doomed.partition;
                changed := changed + 1;
            EXCEPTION
                WHEN lock_not_available THEN
                    RAISE NOTICE 'pgnotify: partition % not dropped (pgnotify.events is busy); '
                        'the next run tries again', doomed.partition;
            END;
        END LOOP;
        DELETE FROM pgnotify.events_default WHERE created_at < now() - keep;
    END IF;
    RETURN changed;
END
$fn$;
COMMENT ON FUNCTION pgnotify.maintain_event_partitions IS
    'Create the day partitions of pgnotify.events for today and the next `ahead` days; with '
    '`keep`, drop the partitions older than it. The event_partitions job and retention call it.';

-- Retention: finished notifications still go in small committed batches, but each batch reads
-- the next `batch` ids by the primary key instead of searching the whole table for due rows (a
-- sequential scan per batch, over a month of rows at high volume); it stops at the first ids
-- created after the shorter period, as nothing newer can be due. Their events are no longer
-- deleted one by one: they leave with their day's partition once older than both periods.
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
    -- a day of events goes when no row it may describe is kept any more
    PERFORM pgnotify.maintain_event_partitions(keep => greatest(keep, keep_dead));
    COMMIT;
    DELETE FROM pgnotify.job_runs WHERE started_at < now() - keep_dead;
    COMMIT;
END
$fn$;

PERFORM pgnotify.maintain_event_partitions();
INSERT INTO pgnotify.jobs (name, schedule, command, builtin) VALUES
    ('event_partitions', '7 * * * *', 'SELECT pgnotify.maintain_event_partitions()', true)
ON CONFLICT (name) DO NOTHING;

-------------------------------------------------------------------------------------------------
-- queue_status without reading finished rows: every status it counts has a partial index.
-------------------------------------------------------------------------------------------------
-- 0020's notifications_status_id_idx (status, id) INCLUDE (channel, attempts, run_at) serves
-- every status below as an index-only scan: no further index (each one costs producers' INSERTs).
-- The same columns as before; each status is read through its own partial index (the ready
-- rows through the claim's), so a month of sent rows costs nothing here.
CREATE OR REPLACE VIEW pgnotify.queue_status AS
WITH ready AS (
    SELECT channel, count(*) AS ready, min(run_at) AS oldest
    FROM pgnotify.notifications WHERE status = 'queued' GROUP BY channel
), waiting AS (
    SELECT channel, count(*) FILTER (WHERE attempts = 0) AS scheduled,
           count(*) FILTER (WHERE attempts > 0) AS retrying
    FROM pgnotify.notifications WHERE status = 'scheduled' GROUP BY channel
), leased AS (
    SELECT channel, count(*) AS processing
    FROM pgnotify.notifications WHERE status = 'processing' GROUP BY channel
), parked AS (
    SELECT channel, count(*) FILTER (WHERE status = 'dead') AS dead,
           count(*) FILTER (WHERE status = 'failed') AS failed,
           count(*) FILTER (WHERE status = 'held') AS held
    FROM pgnotify.notifications WHERE status IN ('dead', 'failed', 'held') GROUP BY channel
)
SELECT c.channel,
       coalesce(r.ready, 0)                                                   AS ready,
       coalesce(w.scheduled, 0)                                               AS scheduled,
       coalesce(l.processing, 0)                                              AS processing,
       coalesce(w.retrying, 0)                                                AS retrying,
       coalesce(p.dead, 0)                                                    AS dead,
       coalesce(p.failed, 0)                                                  AS failed,
       coalesce(extract(epoch FROM now() - r.oldest), 0)::double precision AS oldest_ready_seconds,
       coalesce(p.held, 0)                                                    AS held
FROM (VALUES ('email'), ('sms'), ('push'), ('webhook'), ('inapp')) AS c(channel)
LEFT JOIN ready r ON r.channel = c.channel
LEFT JOIN waiting w ON w.channel = c.channel
LEFT JOIN leased l ON l.channel = c.channel
LEFT JOIN parked p ON p.channel = c.channel
ORDER BY c.channel;

PERFORM pgnotify.apply_grants();
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_worker') THEN
    GRANT EXECUTE ON FUNCTION pgnotify.maintain_event_partitions(interval, integer)
        TO pgnotify_worker;
    GRANT SELECT ON pgnotify.event_partitions TO pgnotify_worker;
END IF;
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_admin') THEN
    GRANT SELECT ON pgnotify.event_partitions TO pgnotify_admin;
END IF;

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (21, 'history_partitions');
END
$migration$;
COMMIT;
