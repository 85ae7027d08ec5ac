-- pgnotify-worker migration 0016: the inbox feed the app-facing HTTP API serves (docs/inbox.md).
--   inbox.seen_at / archived_at: beside read_at. "Unread" and "unseen" count rows not archived.
--   inbox.seq: a per-row sequence number, new on every insert and on every change of read_at,
--     seen_at or archived_at: the SSE event id, so Last-Event-ID replays what changed since.
--   inbox_counts: total / unread / unseen per user, kept exact by statement-level triggers, so
--     a user with a million rows gets counts in one index lookup.
--   NOTIFY pgnotify_inbox (payload version 1, JSON, documented in docs/inbox.md):
--     {"v":1,"event":"new","id":..,"seq":..,"user_id":"..","notification_id":..} per new row
--     {"v":1,"event":"changed","user_id":"..","seq":..} once per user per UPDATE/DELETE statement
--     (seq = the highest seq the statement gave that user, 0 for a delete).
--   Indexes for the newest-first keyset (per user, not archived / archived, per category) and
--     for replay by seq.
-- Idempotent: does nothing when version 16 is recorded.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 16) THEN
    RAISE NOTICE 'pgnotify migration 16 (inbox_feed) is already applied';
    RETURN;
END IF;

CREATE SEQUENCE pgnotify.inbox_seq AS bigint;
ALTER TABLE pgnotify.inbox
    ADD COLUMN seen_at timestamptz,
    ADD COLUMN archived_at timestamptz,
    ADD COLUMN seq bigint NOT NULL DEFAULT nextval('pgnotify.inbox_seq');
ALTER SEQUENCE pgnotify.inbox_seq OWNED BY pgnotify.inbox.seq;
COMMENT ON COLUMN pgnotify.inbox.seq IS
    'Changes with every insert and every change of read_at, seen_at or archived_at: the event id '
    'of the live feed (Last-Event-ID replays rows with a higher seq).';

-- keyset pages, newest first: (user, id DESC) exists (inbox_user_idx) for "all"
CREATE INDEX inbox_user_active_idx ON pgnotify.inbox (user_id, id DESC) WHERE archived_at IS NULL;
CREATE INDEX inbox_user_archived_idx ON pgnotify.inbox (user_id, id DESC)
    WHERE archived_at IS NOT NULL;
CREATE INDEX inbox_user_category_idx ON pgnotify.inbox (user_id, category, id DESC);
CREATE INDEX inbox_user_seq_idx ON pgnotify.inbox (user_id, seq);
-- mark all read / seen touches only what is not yet so
DROP INDEX pgnotify.inbox_unread_idx;
CREATE INDEX inbox_unread_idx ON pgnotify.inbox (user_id, id)
    WHERE read_at IS NULL AND archived_at IS NULL;
CREATE INDEX inbox_unseen_idx ON pgnotify.inbox (user_id, id)
    WHERE seen_at IS NULL AND archived_at IS NULL;

CREATE TABLE pgnotify.inbox_counts (
    user_id text PRIMARY KEY,
    total   bigint NOT NULL DEFAULT 0,
    unread  bigint NOT NULL DEFAULT 0,
    unseen  bigint NOT NULL DEFAULT 0
);
COMMENT ON TABLE pgnotify.inbox_counts IS
    'Per user: inbox rows, and those not archived and not read / not seen. Kept by triggers.';
INSERT INTO pgnotify.inbox_counts (user_id, total, unread, unseen)
SELECT user_id, count(*),
       count(*) FILTER (WHERE read_at IS NULL AND archived_at IS NULL),
       count(*) FILTER (WHERE seen_at IS NULL AND archived_at IS NULL)
FROM pgnotify.inbox GROUP BY user_id;

-- A change of read/seen/archived state gets a new seq (the feed's event id).
CREATE FUNCTION pgnotify.inbox_bump_seq() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NEW.read_at IS DISTINCT FROM OLD.read_at OR NEW.seen_at IS DISTINCT FROM OLD.seen_at
       OR NEW.archived_at IS DISTINCT FROM OLD.archived_at THEN
        NEW.seq := nextval('pgnotify.inbox_seq');
    END IF;
    RETURN NEW;
END
$fn$;
CREATE TRIGGER inbox_bump_seq
    BEFORE UPDATE ON pgnotify.inbox
    FOR EACH ROW EXECUTE FUNCTION pgnotify.inbox_bump_seq();

-- New rows: a NOTIFY each (payload version 1). Replaces 0001's three-key payload (the keys it
-- had keep their meaning).
CREATE OR REPLACE FUNCTION pgnotify.notify_inbox() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify('pgnotify_inbox', json_build_object(
        'v', 1, 'event', 'new', 'id', NEW.id, 'seq', NEW.seq, 'user_id', NEW.user_id,
        'notification_id', NEW.notification_id)::text);
    RETURN NULL;
END
$fn$;

-- Counts, per statement and per user (one upsert per user, whatever the row count).
CREATE FUNCTION pgnotify.inbox_count_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp AS $fn$
BEGIN
    INSERT INTO pgnotify.inbox_counts AS c (user_id, total, unread, unseen)
    SELECT user_id, count(*),
           count(*) FILTER (WHERE read_at IS NULL AND archived_at IS NULL),
           count(*) FILTER (WHERE seen_at IS NULL AND archived_at IS NULL)
    FROM inbox_new GROUP BY user_id ORDER BY user_id
    ON CONFLICT (user_id) DO UPDATE SET total = c.total + excluded.total,
        unread = c.unread + excluded.unread, unseen = c.unseen + excluded.unseen;
    RETURN NULL;
END
$fn$;
CREATE TRIGGER inbox_count_insert
    AFTER INSERT ON pgnotify.inbox REFERENCING NEW TABLE AS inbox_new
    FOR EACH STATEMENT EXECUTE FUNCTION pgnotify.inbox_count_insert();

CREATE FUNCTION pgnotify.inbox_count_update() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp AS $fn$
DECLARE
    d record;
BEGIN
    FOR d IN
        WITH delta AS (
            SELECT user_id, 0 AS total,
                   (read_at IS NULL AND archived_at IS NULL)::int AS unread,
                   (seen_at IS NULL AND archived_at IS NULL)::int AS unseen, seq
            FROM inbox_new
            UNION ALL
            SELECT user_id, 0, -(read_at IS NULL AND archived_at IS NULL)::int,
                   -(seen_at IS NULL AND archived_at IS NULL)::int, 0
            FROM inbox_old
        )
        SELECT user_id, sum(unread) AS unread, sum(unseen) AS unseen, max(seq) AS seq
        FROM delta GROUP BY user_id ORDER BY user_id
    LOOP
        IF d.unread <> 0 OR d.unseen <> 0 THEN
            UPDATE pgnotify.inbox_counts SET unread = unread + d.unread, unseen = unseen + d.unseen
            WHERE user_id = d.user_id;
        END IF;
        PERFORM pg_notify('pgnotify_inbox', json_build_object(
            'v', 1, 'event', 'changed', 'user_id', d.user_id, 'seq', d.seq)::text);
    END LOOP;
    RETURN NULL;
END
$fn$;
CREATE TRIGGER inbox_count_update
    AFTER UPDATE ON pgnotify.inbox REFERENCING OLD TABLE AS inbox_old NEW TABLE AS inbox_new
    FOR EACH STATEMENT EXECUTE FUNCTION pgnotify.inbox_count_update();

CREATE FUNCTION pgnotify.inbox_count_delete() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp AS $fn$
DECLARE
    d record;
BEGIN
    FOR d IN
        SELECT user_id, count(*) AS total,
               count(*) FILTER (WHERE read_at IS NULL AND archived_at IS NULL) AS unread,
               count(*) FILTER (WHERE seen_at IS NULL AND archived_at IS NULL) AS unseen
        FROM inbox_old GROUP BY user_id ORDER BY user_id
    LOOP
        UPDATE pgnotify.inbox_counts
        SET total = total - d.total, unread = unread - d.unread, unseen = unseen - d.unseen
        WHERE user_id = d.user_id;
        -- a user whose last row went (retention, erasure) leaves no trace here either
        DELETE FROM pgnotify.inbox_counts WHERE user_id = d.user_id AND total <= 0;
        PERFORM pg_notify('pgnotify_inbox', json_build_object(
            'v', 1, 'event', 'changed', 'user_id', d.user_id, 'seq', 0)::text);
    END LOOP;
    RETURN NULL;
END
$fn$;
CREATE TRIGGER inbox_count_delete
    AFTER DELETE ON pgnotify.inbox REFERENCING OLD TABLE AS inbox_old
    FOR EACH STATEMENT EXECUTE FUNCTION pgnotify.inbox_count_delete();

PERFORM pgnotify.apply_grants();
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_worker') THEN
    -- the inbox API marks rows read / seen / archived, nothing else
    GRANT UPDATE (read_at, seen_at, archived_at) ON pgnotify.inbox TO pgnotify_worker;
    GRANT SELECT ON pgnotify.inbox_counts TO pgnotify_worker;
    GRANT USAGE ON SEQUENCE pgnotify.inbox_seq TO pgnotify_worker;
END IF;
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_admin') THEN
    GRANT SELECT ON pgnotify.inbox_counts TO pgnotify_admin;
    GRANT USAGE ON SEQUENCE pgnotify.inbox_seq TO pgnotify_admin;
END IF;
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_producer') THEN
    GRANT SELECT ON pgnotify.inbox_counts TO pgnotify_producer;
END IF;

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (16, 'inbox_feed');
END
$migration$;
COMMIT;
