-- pgnotify-worker migration 0027: the status NOTIFY can be turned off (pgnotify.status_notify).
--   Every status change of a notification is announced with NOTIFY pgnotify_status (0018, a
--   statement trigger since 0023), and so is every provider report (the AFTER INSERT trigger
--   events_provider_report on pgnotify.events, 0018/0021). A transaction that has NOTIFYed holds
--   PostgreSQL's notification-queue lock from its pre-commit until its commit record is
--   flushed, so the worker's notifying commits flush their WAL one after another, cluster-wide.
--   An app that never LISTENs on pgnotify_status pays that for nothing.
--   The setting pgnotify.status_notify (a custom setting, read in the session that changes the
--   row: ALTER DATABASE app SET pgnotify.status_notify = off, or per role, or SET in a session):
--     off, false, no or 0 (any case, surrounding blanks ignored): no NOTIFY pgnotify_status from
--       either trigger;
--     anything else, unset or empty: on, as before. A custom setting cannot refuse a value at
--       SET time, so a misspelling never silences the announcements (and never fails the
--       worker's UPDATE); the worker's /status shows the value its sessions see.
--   The status webhooks (pgnotify.status_webhooks -> enqueue_status_webhooks) do not depend on it.
--   pgnotify.status_notify_enabled(): the same rule as a function, for operators and /status.
--   The triggers inline the rule rather than call it, so that whichever role updates
--   notifications or inserts events needs no EXECUTE grant on it.
--   Both trigger functions start from their newest definitions: notification_statuses_changed
--   (0023), provider_report_recorded (0018; 0021 only re-created its trigger).
-- Idempotent: does nothing when pgnotify.schema_migrations records version 27.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 27) THEN
    RAISE NOTICE 'pgnotify migration 27 (status notify setting) is already applied';
    RETURN;
END IF;

CREATE FUNCTION pgnotify.status_notify_enabled() RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE AS $fn$
    SELECT coalesce(lower(btrim(current_setting('pgnotify.status_notify', true))), '')
           NOT IN ('off', 'false', 'no', '0')
$fn$;
COMMENT ON FUNCTION pgnotify.status_notify_enabled IS
    'Whether this session announces status changes and provider reports with NOTIFY '
    'pgnotify_status: false when the setting pgnotify.status_notify is off, false, no or 0 '
    '(schema 0027); true otherwise, unset included.';

CREATE OR REPLACE FUNCTION pgnotify.notification_statuses_changed() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    -- pgnotify.status_notify (0027), the rule of status_notify_enabled(), inlined (no grant)
    IF coalesce(lower(btrim(current_setting('pgnotify.status_notify', true))), '')
            NOT IN ('off', 'false', 'no', '0') THEN
        PERFORM pg_notify('pgnotify_status', json_build_object(
            'id', n.id, 'event', n.status, 'status', n.status, 'channel', n.channel,
            'category', left(n.category, 100), 'user_id', left(n.user_id, 256))::text)
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE o.status IS DISTINCT FROM n.status
        ORDER BY n.id;
    END IF;
    -- the status webhooks do not depend on the setting
    IF EXISTS (SELECT 1 FROM pgnotify.status_webhooks w WHERE w.enabled) THEN
        PERFORM pgnotify.enqueue_status_webhooks(n.id, n.status, n.status, n.channel,
                                                 n.category, n.user_id)
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE o.status IS DISTINCT FROM n.status
          AND n.category IS DISTINCT FROM 'pgnotify_status'
        ORDER BY n.id;
    END IF;
    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION pgnotify.notification_statuses_changed IS
    'NOTIFY pgnotify_status (unless pgnotify.status_notify is off, schema 0027) and the status '
    'webhooks for each row of an UPDATE statement whose status changed; one call per statement '
    '(schema 0023), same payload as 0018''s row trigger.';

CREATE OR REPLACE FUNCTION pgnotify.provider_report_recorded() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    n record;
BEGIN
    SELECT id, status, channel, category, user_id INTO n
    FROM pgnotify.notifications WHERE id = NEW.notification_id;
    IF FOUND THEN
        -- pgnotify.status_notify (0027), the rule of status_notify_enabled(), inlined (no grant)
        IF coalesce(lower(btrim(current_setting('pgnotify.status_notify', true))), '')
                NOT IN ('off', 'false', 'no', '0') THEN
            PERFORM pg_notify('pgnotify_status', json_build_object(
                'id', n.id, 'event', NEW.event, 'status', n.status, 'channel', n.channel,
                'category', left(n.category, 100), 'user_id', left(n.user_id, 256))::text);
        END IF;
        PERFORM pgnotify.enqueue_status_webhooks(n.id, NEW.event, n.status, n.channel, n.category,
                                                 n.user_id);
    END IF;
    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION pgnotify.provider_report_recorded IS
    'A provider report (an event with an external_id): NOTIFY pgnotify_status (unless '
    'pgnotify.status_notify is off, schema 0027) and the status webhooks.';

INSERT INTO pgnotify.role_grants (since, role, kind, object, columns, privileges) VALUES
    (27, 'pgnotify_worker', 'FUNCTION', 'pgnotify.status_notify_enabled()', '{}', '{EXECUTE}')
ON CONFLICT DO NOTHING;
PERFORM pgnotify.apply_grants();

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (27, 'status notify setting');
END
$migration$;
COMMIT;
