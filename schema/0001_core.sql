-- pgnotify-worker migration 0001: the core queue.
--
-- Apply with `pgnotify-worker migrate`, or with `psql -v ON_ERROR_STOP=1 -f schema/0001_core.sql`
-- (then 0002, ... in order). The file is idempotent: it takes the migration advisory lock, and
-- does nothing when pgnotify.schema_migrations already records version 1.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);  -- the one lock every pgnotify migration takes

CREATE SCHEMA IF NOT EXISTS pgnotify;
CREATE TABLE IF NOT EXISTS pgnotify.schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 1) THEN
    RAISE NOTICE 'pgnotify migration 1 (core) is already applied';
    RETURN;
END IF;

-------------------------------------------------------------------------------------------------
-- notifications: one row per delivery; its state is the truth.
-------------------------------------------------------------------------------------------------
CREATE TABLE pgnotify.notifications (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    uid                 uuid NOT NULL DEFAULT gen_random_uuid(),
    channel             text NOT NULL,
    recipient           text NOT NULL,
    user_id             text,
    category            text,
    template            text,
    subject             text,
    body                text,
    html_body           text,
    locale              text,
    payload             jsonb NOT NULL,
    priority            smallint NOT NULL,
    status              text NOT NULL,
    attempts            integer NOT NULL DEFAULT 0,
    max_attempts        integer NOT NULL,
    run_at              timestamptz NOT NULL,
    locked_by           text,
    locked_until        timestamptz,
    last_error          text,
    provider            text,
    provider_message_id text,
    template_version    integer,
    idempotency_key     text,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    sent_at             timestamptz,
    CONSTRAINT notifications_status_is_known CHECK (status IN
        ('scheduled', 'queued', 'processing', 'sent', 'failed', 'dead', 'cancelled', 'skipped')),
    CONSTRAINT notifications_attempts_not_negative CHECK (attempts >= 0),
    CONSTRAINT notifications_processing_has_lease CHECK
        ((status = 'processing') = (locked_until IS NOT NULL AND locked_by IS NOT NULL))
);

COMMENT ON TABLE pgnotify.notifications IS
    'One row per delivery. Insert from any language; the pgnotify worker delivers it.';
COMMENT ON COLUMN pgnotify.notifications.uid IS
    'Stable public id: the idempotency key sent to providers (webhook-id, Idempotency-Key).';
COMMENT ON COLUMN pgnotify.notifications.status IS
    'scheduled (run_at in the future, or waiting to retry) -> queued (ready) -> processing (leased) '
    '-> sent | failed (permanent error) | dead (attempts exhausted) | cancelled | skipped.';
COMMENT ON COLUMN pgnotify.notifications.priority IS
    'Higher first; default 0. Ties go to the earlier run_at, then the lower id.';
COMMENT ON COLUMN pgnotify.notifications.locked_until IS
    'Lease of the worker named in locked_by; a reaper requeues the row when it expires.';

-- The claim reads only ready rows, in claim order: O(batch) however many rows wait or are scheduled.
CREATE INDEX notifications_ready_idx ON pgnotify.notifications
    (channel, priority DESC, run_at, id) WHERE status = 'queued';
-- The promoter finds scheduled rows that came due, and the poller the next run_at.
CREATE INDEX notifications_scheduled_idx ON pgnotify.notifications (run_at) WHERE status = 'scheduled';
-- The reaper finds expired leases.
CREATE INDEX notifications_leased_idx ON pgnotify.notifications (locked_until)
    WHERE status = 'processing';
CREATE UNIQUE INDEX notifications_idempotency_key_idx ON pgnotify.notifications (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX notifications_provider_message_idx ON pgnotify.notifications (provider_message_id)
    WHERE provider_message_id IS NOT NULL;

-- The queue table churns: vacuum it early so dead tuples never slow the claim.
ALTER TABLE pgnotify.notifications SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.02,
    fillfactor = 85
);

-------------------------------------------------------------------------------------------------
-- events: append-only audit log. No foreign key, so writing an event never locks the
-- notification row (a KEY SHARE lock would collide with the claim's FOR UPDATE).
-------------------------------------------------------------------------------------------------
CREATE TABLE pgnotify.events (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    notification_id bigint NOT NULL,
    event           text NOT NULL,
    attempt         integer NOT NULL DEFAULT 0,
    worker          text,
    provider        text,
    duration_ms     real,
    error_code      text,
    error           text,
    detail          jsonb,
    created_at      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgnotify.events IS
    'What happened to each notification: claimed, sent, retry_scheduled, failed, dead, cancelled, '
    'lease_expired, released, replayed. The queued step is the notification''s created_at.';
CREATE INDEX events_notification_idx ON pgnotify.events (notification_id, id);
CREATE INDEX events_errors_idx ON pgnotify.events (created_at) WHERE error IS NOT NULL;

-------------------------------------------------------------------------------------------------
-- templates: key x channel x locale x version; a send uses the newest version.
-------------------------------------------------------------------------------------------------
CREATE TABLE pgnotify.templates (
    key         text NOT NULL,
    channel     text NOT NULL,
    locale      text NOT NULL DEFAULT '',
    version     integer NOT NULL DEFAULT 1,
    subject     text,
    body        text,
    html_body   text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (key, channel, locale, version),
    CONSTRAINT templates_channel_is_known CHECK
        (channel IN ('email', 'sms', 'push', 'webhook', 'inapp')),
    CONSTRAINT templates_has_content CHECK
        (subject IS NOT NULL OR body IS NOT NULL OR html_body IS NOT NULL),
    CONSTRAINT templates_version_positive CHECK (version >= 1)
);
COMMENT ON COLUMN pgnotify.templates.locale IS
    'Empty string = the default. A notification in fr-CA uses fr-CA, else fr, else the default.';

-------------------------------------------------------------------------------------------------
-- inbox: in-app messages, one per notification; a NOTIFY on pgnotify_inbox tells live clients.
-------------------------------------------------------------------------------------------------
CREATE TABLE pgnotify.inbox (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    notification_id bigint NOT NULL UNIQUE,
    user_id         text NOT NULL,
    category        text,
    title           text,
    body            text,
    data            jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    read_at         timestamptz
);
CREATE INDEX inbox_user_idx ON pgnotify.inbox (user_id, id DESC);
CREATE INDEX inbox_unread_idx ON pgnotify.inbox (user_id) WHERE read_at IS NULL;

-------------------------------------------------------------------------------------------------
-- Validation: clear, field-named errors at INSERT time (SQLSTATE 23514, COLUMN set).
-------------------------------------------------------------------------------------------------
CREATE FUNCTION pgnotify.reject(col text, msg text, hint text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql AS $fn$
BEGIN
    IF hint IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = format('pgnotify: %s', msg),
            SCHEMA = 'pgnotify', TABLE = 'notifications', COLUMN = col;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = format('pgnotify: %s', msg),
        HINT = hint, SCHEMA = 'pgnotify', TABLE = 'notifications', COLUMN = col;
END
$fn$;

CREATE FUNCTION pgnotify.validate_notification() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    max_payload integer := coalesce(
        nullif(current_setting('pgnotify.max_payload_bytes', true), '')::integer, 262144);
    payload_size integer;
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.status IS NOT NULL AND NEW.status NOT IN ('queued', 'scheduled') THEN
            PERFORM pgnotify.reject('status', format(
                'status must be queued (or left out) on insert, not %L', NEW.status));
        END IF;
        NEW.attempts := 0;
        NEW.locked_by := NULL;
        NEW.locked_until := NULL;
        NEW.sent_at := NULL;
        NEW.created_at := now();
    END IF;
    NEW.updated_at := now();

    IF NEW.channel IS NULL THEN
        PERFORM pgnotify.reject('channel', 'channel is required',
            'one of email, sms, push, webhook, inapp');
    ELSIF NEW.channel NOT IN ('email', 'sms', 'push', 'webhook', 'inapp') THEN
        PERFORM pgnotify.reject('channel', format('unknown channel %L', left(NEW.channel, 40)),
            'one of email, sms, push, webhook, inapp');
    END IF;

    IF NEW.recipient IS NULL AND NEW.channel = 'inapp' THEN
        NEW.recipient := NEW.user_id;  -- an in-app message goes to its user
    END IF;
    IF NEW.recipient IS NULL OR btrim(NEW.recipient) = '' THEN
        PERFORM pgnotify.reject('recipient', format('recipient is required for channel %s',
            NEW.channel), CASE NEW.channel
                WHEN 'email' THEN 'an email address'
                WHEN 'sms' THEN 'a phone number, best in E.164 form (+14155550123)'
                WHEN 'push' THEN 'a device token'
                WHEN 'webhook' THEN 'an http(s) URL'
                ELSE 'a user id (or set user_id)' END);
    END IF;
    IF NEW.recipient ~ '[[:cntrl:]]' THEN
        PERFORM pgnotify.reject('recipient', 'recipient must not contain control characters');
    END IF;
    IF NEW.channel = 'email' AND (length(NEW.recipient) > 254 OR NEW.recipient !~
            '^[^[:space:]@"(),:;<>\[\\\]]+@[^[:space:]@"(),:;<>\[\\\].]+(\.[^[:space:]@"(),:;<>\[\\\].]+)+$') THEN
        PERFORM pgnotify.reject('recipient', 'recipient is not a valid email address',
            'expected local@domain.tld, without a display name');
    ELSIF NEW.channel = 'sms' AND (NEW.recipient !~ '^\+?[0-9() .-]{4,32}$'
            OR length(regexp_replace(NEW.recipient, '[^0-9]', '', 'g')) NOT BETWEEN 4 AND 15) THEN
        PERFORM pgnotify.reject('recipient', 'recipient is not a valid phone number',
            'expected E.164 like +14155550123 (a national number uses the worker''s default region)');
    ELSIF NEW.channel = 'push' AND (length(NEW.recipient) > 4096 OR NEW.recipient ~ '[[:space:]]') THEN
        PERFORM pgnotify.reject('recipient', 'recipient is not a valid device token or user id');
    ELSIF NEW.channel = 'webhook' THEN
        IF length(NEW.recipient) > 2048 OR NEW.recipient !~* '^https?://[^/?#[:space:]]+([/?#][^[:space:]]*)?$' THEN
            PERFORM pgnotify.reject('recipient', 'recipient is not a valid http(s) URL',
                'expected https://host[:port]/path');
        ELSIF substring(NEW.recipient from '^[^:]+://([^/?#]*)') LIKE '%@%' THEN
            PERFORM pgnotify.reject('recipient', 'webhook URL must not carry credentials (user@host)',
                'the worker signs each request; put no secrets in the URL');
        ELSIF NEW.recipient ~* '^https?://(169\.254\.[0-9.]+|\[?fd00:ec2::254\]?|metadata\.google\.internal)([:/?#]|$)' THEN
            PERFORM pgnotify.reject('recipient',
                'webhook URL points at a cloud metadata address, which is never allowed');
        END IF;
    ELSIF NEW.channel = 'inapp' AND length(NEW.recipient) > 256 THEN
        PERFORM pgnotify.reject('recipient', 'recipient (user id) is longer than 256 characters');
    END IF;

    IF NEW.template IS NULL AND NEW.body IS NULL AND NEW.html_body IS NULL
            AND NEW.channel NOT IN ('webhook', 'inapp') THEN
        PERFORM pgnotify.reject('template', format('a %s notification needs a template or a body',
            NEW.channel), 'set template => ''key'' (a row in pgnotify.templates) or body => ''...''');
    END IF;
    IF NEW.template IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM pgnotify.templates t WHERE t.key = NEW.template AND t.channel = NEW.channel) THEN
        PERFORM pgnotify.reject('template', format('unknown template %L for channel %s',
            left(NEW.template, 100), NEW.channel), 'insert it into pgnotify.templates first');
    END IF;
    IF NEW.subject ~ '[\r\n]' THEN
        PERFORM pgnotify.reject('subject', 'subject must not contain line breaks');
    END IF;
    IF NEW.locale IS NOT NULL AND NEW.locale !~ '^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$' THEN
        PERFORM pgnotify.reject('locale', format('locale %L is not a language tag', left(NEW.locale, 40)),
            'like en, fr, fr-CA, pt_BR');
    END IF;
    IF length(NEW.category) > 100 THEN
        PERFORM pgnotify.reject('category', 'category is longer than 100 characters');
    END IF;
    IF length(NEW.idempotency_key) > 255 OR NEW.idempotency_key = '' THEN
        PERFORM pgnotify.reject('idempotency_key', 'idempotency_key must be 1 to 255 characters');
    END IF;

    NEW.payload := coalesce(NEW.payload, '{}'::jsonb);
    IF jsonb_typeof(NEW.payload) <> 'object' THEN
        PERFORM pgnotify.reject('payload', format('payload must be a JSON object, not %s',
            jsonb_typeof(NEW.payload)), 'for example {"name": "Ada"}');
    END IF;
    payload_size := pg_column_size(NEW.payload);
    IF payload_size > max_payload THEN
        PERFORM pgnotify.reject('payload', format('payload is %s bytes, over the %s byte limit',
            payload_size, max_payload),
            'send ids and let templates stay small, or raise pgnotify.max_payload_bytes');
    END IF;

    NEW.priority := coalesce(NEW.priority, 0);
    NEW.max_attempts := coalesce(NEW.max_attempts, 10);
    IF NEW.max_attempts NOT BETWEEN 1 AND 1000 THEN
        PERFORM pgnotify.reject('max_attempts', format('max_attempts must be between 1 and 1000, not %s',
            NEW.max_attempts));
    END IF;
    IF NEW.run_at IS NULL OR NEW.run_at = '-infinity' THEN
        NEW.run_at := now();
    ELSIF NEW.run_at = 'infinity' THEN
        PERFORM pgnotify.reject('run_at', 'run_at must be a finite time',
            'to hold a notification back, insert it later or cancel it');
    END IF;
    IF TG_OP = 'INSERT' THEN
        NEW.status := CASE WHEN NEW.run_at > now() THEN 'scheduled' ELSE 'queued' END;
    END IF;
    RETURN NEW;
END
$fn$;

CREATE TRIGGER notifications_validate
    BEFORE INSERT OR UPDATE OF channel, recipient, template, subject, locale, payload,
        max_attempts, idempotency_key
    ON pgnotify.notifications
    FOR EACH ROW EXECUTE FUNCTION pgnotify.validate_notification();

-------------------------------------------------------------------------------------------------
-- Wake-ups. One NOTIFY per statement and channel, payload = the channel name ('scheduled' when
-- only future rows came in), never the row: no 8000-byte limit, no per-row cost.
-------------------------------------------------------------------------------------------------
CREATE FUNCTION pgnotify.notify_inserted() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    wake text;
BEGIN
    FOR wake IN
        SELECT DISTINCT CASE WHEN status = 'queued' THEN channel ELSE 'scheduled' END FROM new_rows
    LOOP
        PERFORM pg_notify('pgnotify', wake);
    END LOOP;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER notifications_notify
    AFTER INSERT ON pgnotify.notifications
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgnotify.notify_inserted();

-- A changed template reaches every worker's cache at once.
CREATE FUNCTION pgnotify.notify_templates_changed() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify('pgnotify', 'templates');
    RETURN NULL;
END
$fn$;

CREATE TRIGGER templates_notify
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON pgnotify.templates
    FOR EACH STATEMENT EXECUTE FUNCTION pgnotify.notify_templates_changed();

-- In-app messages reach live clients through LISTEN pgnotify_inbox.
CREATE FUNCTION pgnotify.notify_inbox() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify('pgnotify_inbox', json_build_object(
        'id', NEW.id, 'user_id', NEW.user_id, 'notification_id', NEW.notification_id)::text);
    RETURN NULL;
END
$fn$;

CREATE TRIGGER inbox_notify
    AFTER INSERT ON pgnotify.inbox
    FOR EACH ROW EXECUTE FUNCTION pgnotify.notify_inbox();

-------------------------------------------------------------------------------------------------
-- SQL API for producers in any language.
-------------------------------------------------------------------------------------------------
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
    idempotency_key text DEFAULT NULL
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
        html_body, user_id, category, locale, priority, run_at, max_attempts, idempotency_key)
    VALUES (enqueue.channel, enqueue.recipient, enqueue.template, enqueue.payload, enqueue.subject,
        enqueue.body, enqueue.html_body, enqueue.user_id, enqueue.category, enqueue.locale,
        enqueue.priority, enqueue.run_at, enqueue.max_attempts, enqueue.idempotency_key)
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

CREATE FUNCTION pgnotify.cancel(notification_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    done bigint;
BEGIN
    UPDATE pgnotify.notifications n SET status = 'cancelled', updated_at = now()
    WHERE n.id = cancel.notification_id AND n.status IN ('queued', 'scheduled')
    RETURNING n.id INTO done;
    IF done IS NULL THEN
        RETURN false;  -- unknown, already being sent, or already finished
    END IF;
    INSERT INTO pgnotify.events (notification_id, event, worker)
    VALUES (done, 'cancelled', session_user);
    RETURN true;
END
$fn$;
COMMENT ON FUNCTION pgnotify.cancel IS
    'Cancel a queued or scheduled notification; false if it is unknown, being sent or finished.';

CREATE FUNCTION pgnotify.retry(notification_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    ch text;
BEGIN
    UPDATE pgnotify.notifications n
    SET status = 'queued', attempts = 0, run_at = now(), updated_at = now()
    WHERE n.id = retry.notification_id AND n.status IN ('failed', 'dead')
    RETURNING n.channel INTO ch;
    IF ch IS NULL THEN
        RETURN false;  -- unknown, or not failed/dead
    END IF;
    INSERT INTO pgnotify.events (notification_id, event, worker)
    VALUES (retry.notification_id, 'replayed', session_user);
    PERFORM pg_notify('pgnotify', ch);
    RETURN true;
END
$fn$;
COMMENT ON FUNCTION pgnotify.retry IS
    'Requeue a failed or dead notification with a fresh attempt budget; false if not failed/dead.';

CREATE FUNCTION pgnotify.inbox_mark_read(p_user_id text, p_ids bigint[] DEFAULT NULL) RETURNS integer
LANGUAGE sql AS $fn$
    WITH marked AS (
        UPDATE pgnotify.inbox SET read_at = now()
        WHERE user_id = p_user_id AND read_at IS NULL AND (p_ids IS NULL OR id = ANY (p_ids))
        RETURNING 1
    )
    SELECT count(*)::integer FROM marked;
$fn$;
COMMENT ON FUNCTION pgnotify.inbox_mark_read IS
    'Mark a user''s inbox messages read (all when p_ids is NULL); returns how many changed.';

-------------------------------------------------------------------------------------------------
-- Monitoring views.
-------------------------------------------------------------------------------------------------
CREATE VIEW pgnotify.queue_status AS
SELECT c.channel,
       count(n.id) FILTER (WHERE n.status = 'queued')                         AS ready,
       count(n.id) FILTER (WHERE n.status = 'scheduled' AND n.attempts = 0)   AS scheduled,
       count(n.id) FILTER (WHERE n.status = 'processing')                     AS processing,
       count(n.id) FILTER (WHERE n.status = 'scheduled' AND n.attempts > 0)   AS retrying,
       count(n.id) FILTER (WHERE n.status = 'dead')                           AS dead,
       count(n.id) FILTER (WHERE n.status = 'failed')                         AS failed,
       coalesce(extract(epoch FROM now() - min(n.run_at) FILTER (WHERE n.status = 'queued')), 0)
           ::double precision                                                 AS oldest_ready_seconds
FROM (VALUES ('email'), ('sms'), ('push'), ('webhook'), ('inapp')) AS c(channel)
LEFT JOIN pgnotify.notifications n
       ON n.channel = c.channel
      AND n.status IN ('queued', 'scheduled', 'processing', 'dead', 'failed')
GROUP BY c.channel
ORDER BY c.channel;
COMMENT ON VIEW pgnotify.queue_status IS
    'Per channel: ready, scheduled, processing, waiting to retry, dead, failed, age of the oldest ready row.';

CREATE VIEW pgnotify.error_summary AS
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
COMMENT ON VIEW pgnotify.error_summary IS 'Errors grouped by channel, provider and message.';

CREATE VIEW pgnotify.processing_timeline AS
SELECT n.id AS notification_id, n.channel, 'queued'::text AS event, 0 AS attempt,
       NULL::text AS worker, NULL::text AS provider, NULL::real AS duration_ms,
       NULL::text AS error_code, NULL::text AS error, n.created_at AS at, 0::bigint AS seq
FROM pgnotify.notifications n
UNION ALL
SELECT e.notification_id, n.channel, e.event, e.attempt, e.worker, e.provider, e.duration_ms,
       e.error_code, e.error, e.created_at, e.id
FROM pgnotify.events e
JOIN pgnotify.notifications n ON n.id = e.notification_id;
COMMENT ON VIEW pgnotify.processing_timeline IS
    'Each notification''s steps in order: filter on notification_id, order by at, seq.';

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (1, 'core');
END
$migration$;
COMMIT;
