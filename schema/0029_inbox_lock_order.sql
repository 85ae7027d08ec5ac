-- pgnotify-worker migration 0029: pgnotify.inbox_mark_read() locks a user's rows in id order.
--   A multi-row UPDATE locks rows in the order of the index it reads them through, so "mark all
--   read" beside another change of many of the same user's messages (the inbox API's archive-all
--   or unread, another mark_read with ids) could lock the same rows in opposite orders, and
--   PostgreSQL aborted one of the two as a deadlock. The inbox API's statements lock the rows in
--   id order first since this release (queries._inbox_change); the SQL function does the same,
--   so all of them wait for each other instead. Same signature, result and privileges
--   (SECURITY DEFINER with the search_path of 0006, restated: CREATE OR REPLACE resets them).
-- Idempotent: does nothing when pgnotify.schema_migrations records version 29.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 29) THEN
    RAISE NOTICE 'pgnotify migration 29 (inbox lock order) is already applied';
    RETURN;
END IF;

CREATE OR REPLACE FUNCTION pgnotify.inbox_mark_read(p_user_id text, p_ids bigint[] DEFAULT NULL)
RETURNS integer
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp AS $fn$
    WITH target AS (
        SELECT id FROM pgnotify.inbox
        WHERE user_id = p_user_id AND read_at IS NULL AND (p_ids IS NULL OR id = ANY (p_ids))
        ORDER BY id
        FOR UPDATE
    ), marked AS (
        UPDATE pgnotify.inbox i SET read_at = now() FROM target WHERE i.id = target.id
        RETURNING 1
    )
    SELECT count(*)::integer FROM marked;
$fn$;
COMMENT ON FUNCTION pgnotify.inbox_mark_read IS
    'Mark a user''s inbox messages read (all when p_ids is NULL); returns how many changed. '
    'Locks the rows in id order first (schema 0029), as the inbox API does: no deadlock beside it.';

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (29, 'inbox lock order');
END
$migration$;
COMMIT;
