-- pgnotify-worker migration 0005: W3C trace context on notifications.
-- A producer that traces its request can store its `traceparent` on the row; the worker's send
-- span continues that trace. Idempotent: does nothing when version 5 is recorded.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 5) THEN
    RAISE NOTICE 'pgnotify migration 5 (tracing) is already applied';
    RETURN;
END IF;

ALTER TABLE pgnotify.notifications ADD COLUMN traceparent text;
ALTER TABLE pgnotify.notifications ADD CONSTRAINT notifications_traceparent_is_w3c CHECK
    (traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$');
COMMENT ON COLUMN pgnotify.notifications.traceparent IS
    'W3C traceparent of the producer (00-<trace id>-<span id>-<flags>): the delivery joins its trace.';

-- A clear error before the CHECK's (which would echo the whole row).
CREATE FUNCTION pgnotify.reject_traceparent() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pgnotify.reject('traceparent', 'traceparent is not a W3C traceparent',
        'like 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01');
    RETURN NEW;
END
$fn$;
CREATE TRIGGER notifications_traceparent
    BEFORE INSERT OR UPDATE OF traceparent ON pgnotify.notifications
    FOR EACH ROW
    WHEN (NEW.traceparent IS NOT NULL
          AND NEW.traceparent !~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$')
    EXECUTE FUNCTION pgnotify.reject_traceparent();

-- enqueue() gains traceparent; dropped and created in this transaction, so callers never see
-- it missing, and every earlier call (positional or named) still matches.
DROP FUNCTION pgnotify.enqueue(text, text, text, jsonb, text, text, text, text, text, text,
                               integer, timestamptz, integer, text);
CREATE FUNCTION pgnotify.enqueue(
    channel         text,
    recipient       text DEFAULT NULL,
    template        text DEFAULT NULL,
    payload         jsonb DEFAULT '{}'::jsonb,
    subject         text DEFAULT NULL,
    body            text DEFAULT NULL,
    html_body       text DEFAULT NULL,
    user_id         text DEFAULT NULL,
    category        text DEFAULT NULL,
    locale          text DEFAULT NULL,
    priority        integer DEFAULT 0,
    run_at          timestamptz DEFAULT NULL,
    max_attempts    integer DEFAULT NULL,
    idempotency_key text DEFAULT NULL,
    traceparent     text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    new_id bigint;
BEGIN
    IF enqueue.priority NOT BETWEEN -32768 AND 32767 THEN
        PERFORM pgnotify.reject('priority', 'priority must be between -32768 and 32767');
    END IF;
    INSERT INTO pgnotify.notifications AS n (channel, recipient, template, payload, subject, body,
        html_body, user_id, category, locale, priority, run_at, max_attempts, idempotency_key,
        traceparent)
    VALUES (enqueue.channel, enqueue.recipient, enqueue.template, enqueue.payload, enqueue.subject,
        enqueue.body, enqueue.html_body, enqueue.user_id, enqueue.category, enqueue.locale,
        enqueue.priority, enqueue.run_at, enqueue.max_attempts, enqueue.idempotency_key,
        enqueue.traceparent)
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING n.id INTO new_id;
    IF new_id IS NULL THEN
        -- The key was enqueued before (or by a transaction that has just committed).
        SELECT n.id INTO new_id FROM pgnotify.notifications n
        WHERE n.idempotency_key = enqueue.idempotency_key;
    END IF;
    RETURN new_id;
END
$fn$;
COMMENT ON FUNCTION pgnotify.enqueue IS
    'Enqueue one notification; returns its id. Same idempotency_key again: the existing id, no new row.';

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (5, 'tracing');
END
$migration$;
COMMIT;
