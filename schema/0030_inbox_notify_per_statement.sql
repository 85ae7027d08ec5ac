-- pgnotify-worker migration 0030: NOTIFY pgnotify_inbox for new rows from one statement trigger.
--   0001/0016 announced each new inbox row from an AFTER INSERT row trigger: one PL/pgSQL call,
--   one queued after-trigger event and one re-fetch of the row per row, for the set-based in-app
--   delivery (one INSERT of a whole claimed batch) as much as for one row. The same per-row
--   NOTIFYs (payload version 1, unchanged: {"v":1,"event":"new","id","seq","user_id",
--   "notification_id"}, in id order) now come from one AFTER INSERT statement trigger reading the
--   statement's transition table, as 0023 did for the status NOTIFY. Rows an INSERT ... ON
--   CONFLICT DO NOTHING skipped are not in the transition table: not announced, as before.
-- Idempotent: does nothing when pgnotify.schema_migrations records version 30.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 30) THEN
    RAISE NOTICE 'pgnotify migration 30 (inbox notify per statement) is already applied';
    RETURN;
END IF;

CREATE FUNCTION pgnotify.notify_inbox_rows() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify('pgnotify_inbox', json_build_object(
        'v', 1, 'event', 'new', 'id', n.id, 'seq', n.seq, 'user_id', n.user_id,
        'notification_id', n.notification_id)::text)
    FROM inbox_added n
    ORDER BY n.id;
    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION pgnotify.notify_inbox_rows IS
    'NOTIFY pgnotify_inbox (payload version 1, event new) for each row an INSERT added to the '
    'inbox, in id order; one call per statement (schema 0030).';

DROP TRIGGER inbox_notify ON pgnotify.inbox;
DROP FUNCTION pgnotify.notify_inbox();
CREATE TRIGGER inbox_notify_rows
    AFTER INSERT ON pgnotify.inbox
    REFERENCING NEW TABLE AS inbox_added
    FOR EACH STATEMENT
    EXECUTE FUNCTION pgnotify.notify_inbox_rows();
PERFORM pgnotify.apply_grants();  -- EXECUTE on the new function: nobody's (PUBLIC's revoked)

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (30, 'inbox notify per statement');
END
$migration$;
COMMIT;
