-- pgnotify-worker migration 0013: the producer's INSERT costs its transaction almost nothing
-- (issue 12). Measured with bench/producers.py: half of an INSERT's cost was the commit-time
-- NOTIFY (PostgreSQL serialises every committing transaction that notified on one global lock),
-- most of the rest the PL/pgSQL validation trigger.
--   1. Column defaults (status, priority, max_attempts, run_at, payload) instead of assignments
--      in the trigger, and a fast path in validate_notification(): two expressions pass a row
--      that needs nothing filled in and nothing rejected; every other row takes the full path of
--      0006, with the same field-named messages. (A CHECK constraint or a trigger WHEN clause of
--      the same expression costs more: PostgreSQL prepares those for every statement, PL/pgSQL
--      once per session.)
--   2. NOTIFY only when no worker is awake. A worker busy on a channel holds an advisory lock
--      (the channel's wake token); the insert trigger notifies only when nobody holds it. The
--      hand-over: every inserting transaction holds a shared hand-over lock until it ends, and a
--      worker about to sleep releases its token, waits until it can take the hand-over lock (no
--      transaction that may have seen it awake is still open), and claims once more.
--   3. pgnotify.enqueue_many(jsonb): many notifications in one statement.
-- Idempotent: does nothing when pgnotify.schema_migrations records version 13.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 13) THEN
    RAISE NOTICE 'pgnotify migration 13 (producer path) is already applied';
    RETURN;
END IF;

-------------------------------------------------------------------------------------------------
-- 1. Defaults where a plain INSERT leaves a column out (the trigger used to fill them in).
-------------------------------------------------------------------------------------------------
ALTER TABLE pgnotify.notifications
    ALTER COLUMN status SET DEFAULT 'queued',
    ALTER COLUMN priority SET DEFAULT 0,
    ALTER COLUMN max_attempts SET DEFAULT 10,
    ALTER COLUMN run_at SET DEFAULT now(),
    ALTER COLUMN payload SET DEFAULT '{}'::jsonb;

-------------------------------------------------------------------------------------------------
-- 2. Wake-ups without a NOTIFY while a worker is awake.
-- Lock keys (the two-integer advisory lock space, apart from the migrations' bigint key):
--   (72453901, n) the wake token of channel n: held (exclusive, session) by the one worker that
--                 is awake on the channel and claims again within milliseconds;
--   (72453902, n) the hand-over lock of channel n: held shared by every transaction that
--                 inserted a row of the channel, until it ends.
-------------------------------------------------------------------------------------------------
CREATE FUNCTION pgnotify.wake_lock_key(channel text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
    SELECT CASE channel WHEN 'email' THEN 1 WHEN 'sms' THEN 2 WHEN 'push' THEN 3
        WHEN 'webhook' THEN 4 WHEN 'inapp' THEN 5 END;
$fn$;
COMMENT ON FUNCTION pgnotify.wake_lock_key IS
    'n of the advisory locks (72453901, n) (a worker is awake on the channel) and (72453902, n) '
    '(hand-over): 1 email, 2 sms, 3 push, 4 webhook, 5 inapp.';

-------------------------------------------------------------------------------------------------
-- validate_notification(): the fast path first, then the full path of 0006 (unchanged but for
-- the folded INSERT triggers and a nested template lookup); both end with the wake-up decision
-- (NOTIFY only when no worker is awake on the channel).
-------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION pgnotify.validate_notification() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    max_payload integer;
    payload_size integer;
    digits text;
    host text;
    reason text;
    wake integer;
    fast boolean := false;
    col text;
    stamp timestamptz;
BEGIN
    -- The fast path: a new row as a plain INSERT or enqueue() makes it (the column defaults in
    -- place, every field within its limits) passes two expressions and is returned as it is.
    -- Anything else -- a NULL to fill in, a future run_at, a value near or over a limit, a host
    -- written as a number -- takes the full path below, which fills in or rejects with the
    -- field-named message. The expression only lets through what the full path accepts unchanged.
    IF TG_OP = 'INSERT' AND NEW.status = 'queued' AND NEW.attempts = 0 AND NEW.locked_by IS NULL
            AND NEW.locked_until IS NULL AND NEW.sent_at IS NULL AND NEW.held_at IS NULL
            AND NEW.created_at = now() AND NEW.updated_at = now()
            AND coalesce(NEW.run_at <= now() AND NEW.run_at >= '2000-01-01 00:00:00+00', true)
            AND NEW.priority IS NOT NULL AND coalesce(NEW.max_attempts BETWEEN 1 AND 1000, true)
            AND jsonb_typeof(NEW.payload) = 'object' AND pg_column_size(NEW.payload) <= coalesce(
                nullif(current_setting('pgnotify.max_payload_bytes', true), '')::integer, 262144)
            AND coalesce(length(NEW.user_id), 0) <= 256 AND octet_length(NEW.recipient) <= 16384
            AND coalesce(length(NEW.template), 0) <= 255 AND coalesce(length(NEW.subject), 0) <= 998
            AND coalesce(octet_length(NEW.body), 0) <= 262144
            AND coalesce(octet_length(NEW.html_body), 0) <= 1048576
            AND coalesce(length(NEW.locale), 0) <= 35 AND coalesce(length(NEW.category), 0) <= 100
            AND coalesce(length(NEW.idempotency_key) BETWEEN 1 AND 255, true)
            AND btrim(NEW.recipient) <> '' AND NEW.recipient !~ '[[:cntrl:]]'
            AND coalesce(NEW.subject !~ '[\r\n]', true)
            AND coalesce(NEW.locale ~ '^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$', true)
            -- what the INSERT triggers of 0002, 0003, 0005 and 0006 checked or filled in
            AND coalesce(NEW.expires_at BETWEEN '2000-01-01 00:00:00+00'
                AND now() + interval '10 years', NEW.category IS NULL)
            AND coalesce(NEW.traceparent ~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$', true)
            THEN
        -- then the channel's own rules: a PL/pgSQL expression is prepared once per transaction
        -- when first run, so each channel's stands alone and a row pays only for its own
        IF NEW.channel = 'webhook' THEN
            wake := 4;  -- pgnotify.wake_lock_key('webhook')
            fast := length(NEW.recipient) <= 2048
                AND NEW.recipient ~* '^https?://[^/?#[:space:]]+([/?#][^[:space:]]*)?$'
                -- a host name (no user@, not a number, ASCII): no address to judge here
                AND substring(NEW.recipient from '^[^:]+://([^/?#]*)')
                    ~ '^[A-Za-z][-A-Za-z0-9.]*(:[0-9]{1,5})?$'
                AND NEW.recipient !~* '^https?://(169\.254\.[0-9.]+|\[?fd00:ec2::254\]?|metadata\.google\.internal)([:/?#]|$)';
        ELSIF NEW.channel = 'inapp' THEN
            wake := 5;  -- pgnotify.wake_lock_key('inapp')
            fast := length(NEW.recipient) <= 256;
        ELSIF NEW.channel = 'email' THEN
            wake := 1;  -- pgnotify.wake_lock_key('email')
            fast := length(NEW.recipient) <= 254
                AND NEW.recipient ~ '^[^[:space:]@"(),:;<>\[\\\]]+@[^[:space:]@"(),:;<>\[\\\].]+(\.[^[:space:]@"(),:;<>\[\\\].]+)+$'
                AND (NEW.template IS NOT NULL OR NEW.subject IS NOT NULL
                     AND (NEW.body IS NOT NULL OR NEW.html_body IS NOT NULL));
        ELSIF NEW.channel = 'sms' THEN
            wake := 2;  -- pgnotify.wake_lock_key('sms')
            fast := NEW.recipient ~ '^\+?[0-9() .-]{4,32}$'
                AND length(translate(NEW.recipient, '+() .-', '')) BETWEEN 4 AND 15
                AND (left(NEW.recipient, 1) <> '+'
                     OR length(translate(NEW.recipient, '+() .-', '')) >= 7
                        AND pgnotify.e164_country_code_length(
                            translate(NEW.recipient, '+() .-', '')) <> 0)
                AND coalesce(length(NEW.body), 0) <= 1600
                AND (NEW.template IS NOT NULL OR NEW.body IS NOT NULL OR NEW.html_body IS NOT NULL);
        ELSIF NEW.channel = 'push' THEN
            wake := 3;  -- pgnotify.wake_lock_key('push')
            fast := length(NEW.recipient) <= 4096 AND NEW.recipient !~ '[[:space:]]'
                AND coalesce(octet_length(NEW.body), 0) <= 4096
                AND (NEW.template IS NOT NULL OR NEW.body IS NOT NULL OR NEW.html_body IS NOT NULL);
        END IF;
    END IF;
    IF fast THEN
        -- enqueue() passes NULL for what it was not given: the defaults the full path would set
        IF NEW.run_at IS NULL OR NEW.max_attempts IS NULL THEN
            NEW.run_at := coalesce(NEW.run_at, now());
            NEW.max_attempts := coalesce(NEW.max_attempts, 10);
        END IF;
        -- the one lookup: a template must exist for the channel (nested, so a row without a
        -- template never runs the query)
        IF NEW.template IS NOT NULL THEN
            IF NOT EXISTS (SELECT 1 FROM pgnotify.templates t
                    WHERE t.key = NEW.template AND t.channel = NEW.channel) THEN
                PERFORM pgnotify.reject('template', format('unknown template %L for channel %s',
                    left(NEW.template, 100), NEW.channel), 'insert it into pgnotify.templates first');
            END IF;
        END IF;
        -- the wake-up (section 2 of this file): take the hand-over lock, held until the
        -- transaction ends (void, so IS NOT NULL is true), then probe the channel's wake token;
        -- NOTIFY only when no worker holds it
        IF pg_advisory_xact_lock_shared(72453902, wake) IS NOT NULL
                AND pg_try_advisory_lock_shared(72453901, wake) THEN
            PERFORM pg_advisory_unlock_shared(72453901, wake);
            PERFORM pg_notify('pgnotify', NEW.channel);
        END IF;
        RETURN NEW;
    END IF;

    -- The full path. First what four INSERT triggers did before this migration, in their order
    -- (a trigger costs every statement even when its WHEN clause is false):
    max_payload := coalesce(
        nullif(current_setting('pgnotify.max_payload_bytes', true), '')::integer, 262144);
    IF TG_OP = 'INSERT' THEN
        -- notifications_defaults (0002): a push without a recipient goes to the user's devices
        IF NEW.channel = 'push' AND NEW.recipient IS NULL AND NEW.user_id IS NOT NULL THEN
            NEW.recipient := 'user:' || NEW.user_id;
        END IF;
        -- notifications_expiry (0003): a category's ttl gives the row its expires_at
        IF NEW.category IS NOT NULL AND NEW.expires_at IS NULL THEN
            SELECT now() + c.ttl INTO NEW.expires_at FROM pgnotify.categories c
            WHERE c.name = NEW.category AND c.ttl IS NOT NULL;
        END IF;
        -- notifications_times (0006): finite, from 2000-01-01 to 10 years from now
        FOREACH col IN ARRAY ARRAY['run_at', 'expires_at'] LOOP
            stamp := CASE col WHEN 'run_at' THEN NEW.run_at ELSE NEW.expires_at END;
            IF stamp < '2000-01-01 00:00:00+00' OR stamp > now() + interval '10 years' THEN
                PERFORM pgnotify.reject_in('notifications', col, format(
                    '%s must be a finite time from 2000-01-01 to 10 years from now, not %s', col,
                    CASE WHEN isfinite(stamp) THEN to_char(stamp AT TIME ZONE 'UTC',
                        'FMYYYY-MM-DD HH24:MI:SS" UTC"') || CASE WHEN stamp < '0001-01-01 00:00:00+00'
                        THEN ' BC' ELSE '' END ELSE stamp::text END),
                    CASE col WHEN 'run_at' THEN
                        'leave run_at out to send now; to hold a notification back, insert it later or cancel it'
                        WHEN 'expires_at' THEN 'leave expires_at out for no expiry' END);
            END IF;
        END LOOP;
        -- notifications_traceparent (0005)
        IF NEW.traceparent !~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$' THEN
            PERFORM pgnotify.reject('traceparent', 'traceparent is not a W3C traceparent',
                'like 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01');
        END IF;
    END IF;

    -- Then the full path of 0006.
    IF TG_OP = 'INSERT' THEN
        IF NEW.status IS NOT NULL AND NEW.status NOT IN ('queued', 'scheduled') THEN
            PERFORM pgnotify.reject('status', format(
                'status must be queued (or left out) on insert, not %L', left(NEW.status, 40)));
        END IF;
        NEW.attempts := 0;
        NEW.locked_by := NULL;
        NEW.locked_until := NULL;
        NEW.sent_at := NULL;
        NEW.held_at := NULL;
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

    -- Sizes first (one expression on the path of a row that fits), so no regex below ever runs
    -- on an oversized value.
    IF length(NEW.user_id) > 256 OR octet_length(NEW.recipient) > 16384
            OR length(NEW.template) > 255 OR length(NEW.subject) > 998
            OR octet_length(NEW.body) > 262144 OR octet_length(NEW.html_body) > 1048576
            OR length(NEW.locale) > 35 THEN
        IF length(NEW.user_id) > 256 THEN
            PERFORM pgnotify.reject('user_id', format('user_id is %s characters, over the 256 limit',
                length(NEW.user_id)));
        ELSIF octet_length(NEW.recipient) > 16384 THEN
            PERFORM pgnotify.reject('recipient', format('recipient is %s bytes, over the 16384 limit',
                octet_length(NEW.recipient)));
        ELSIF length(NEW.template) > 255 THEN
            PERFORM pgnotify.reject('template', 'template is longer than 255 characters');
        ELSIF length(NEW.subject) > 998 THEN
            PERFORM pgnotify.reject('subject', format('subject is %s characters, over the 998 limit',
                length(NEW.subject)), 'RFC 5322 limits a header line to 998 characters');
        ELSIF octet_length(NEW.body) > 262144 THEN
            PERFORM pgnotify.reject('body', format('body is %s bytes, over the 262144 byte limit',
                octet_length(NEW.body)), 'send ids in the payload and link to the rest');
        ELSIF octet_length(NEW.html_body) > 1048576 THEN
            PERFORM pgnotify.reject('html_body', format(
                'html_body is %s bytes, over the 1048576 byte limit', octet_length(NEW.html_body)),
                'link to large content instead of inlining it');
        ELSE
            PERFORM pgnotify.reject('locale', 'locale is longer than 35 characters',
                'like en, fr, fr-CA, pt_BR');
        END IF;
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
    ELSIF NEW.channel = 'sms' THEN
        digits := translate(NEW.recipient, '+() .-', '');
        IF NEW.recipient !~ '^\+?[0-9() .-]{4,32}$' OR length(digits) NOT BETWEEN 4 AND 15 THEN
            PERFORM pgnotify.reject('recipient', 'recipient is not a valid phone number',
                'expected E.164 like +14155550123 (a national number uses the worker''s default region)');
        ELSIF left(NEW.recipient, 1) = '+' AND (length(digits) < 7
                OR pgnotify.e164_country_code_length(digits) = 0) THEN
            PERFORM pgnotify.reject('recipient', format(
                'recipient is not a valid E.164 phone number: %s',
                CASE WHEN length(digits) < 7 THEN 'fewer than 7 digits'
                     ELSE 'no country calling code ' || left(digits, 3) || ' is assigned' END),
                'expected + then country code and number, 7 to 15 digits, like +14155550123');
        ELSIF octet_length(NEW.body) > 1600 AND length(NEW.body) > 1600 THEN
            PERFORM pgnotify.reject('body', format(
                'body is %s characters, over the 1600 an SMS can carry', length(NEW.body)),
                'Twilio refuses longer messages');
        END IF;
    ELSIF NEW.channel = 'push' AND (length(NEW.recipient) > 4096 OR NEW.recipient ~ '[[:space:]]'
            OR octet_length(NEW.body) > 4096) THEN
        IF octet_length(NEW.body) > 4096 THEN
            PERFORM pgnotify.reject('body', format(
                'body is %s bytes, over the 4096 a push message can carry', octet_length(NEW.body)),
                'FCM refuses larger messages');
        END IF;
        PERFORM pgnotify.reject('recipient', 'recipient is not a valid device token or user id');
    ELSIF NEW.channel = 'webhook' THEN
        host := substring(NEW.recipient from '^[^:]+://([^/?#]*)');
        IF length(NEW.recipient) > 2048 OR NEW.recipient !~* '^https?://[^/?#[:space:]]+([/?#][^[:space:]]*)?$' THEN
            PERFORM pgnotify.reject('recipient', 'recipient is not a valid http(s) URL',
                'expected https://host[:port]/path');
        ELSIF host LIKE '%@%' THEN
            PERFORM pgnotify.reject('recipient', 'webhook URL must not carry credentials (user@host)',
                'the worker signs each request; put no secrets in the URL');
        ELSIF NEW.recipient ~* '^https?://(169\.254\.[0-9.]+|\[?fd00:ec2::254\]?|metadata\.google\.internal)([:/?#]|$)' THEN
            PERFORM pgnotify.reject('recipient',
                'webhook URL points at a cloud metadata address, which is never allowed');
        ELSIF left(host, 1) BETWEEN '0' AND '9' OR left(host, 1) = '['
                OR octet_length(host) <> length(host) THEN
            -- a host written as a number (only such hosts pay for the function call)
            reason := pgnotify.webhook_host_refusal(NEW.recipient);
            IF reason IS NOT NULL THEN
                PERFORM pgnotify.reject('recipient', reason, CASE WHEN reason NOT LIKE '%metadata%' THEN
                    'to deliver to an internal receiver, allow its network in the setting '
                    'pgnotify.webhook_allowed_networks (as in the worker''s PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS)'
                    END);
            END IF;
        END IF;
    ELSIF NEW.channel = 'inapp' AND length(NEW.recipient) > 256 THEN
        PERFORM pgnotify.reject('recipient', 'recipient (user id) is longer than 256 characters');
    END IF;

    -- one expression for a row that has what its channel needs
    IF NEW.template IS NULL AND (NEW.channel = 'email' AND NEW.subject IS NULL
            OR NEW.body IS NULL AND NEW.html_body IS NULL AND NEW.channel NOT IN ('webhook', 'inapp')) THEN
        IF NEW.body IS NULL AND NEW.html_body IS NULL AND NEW.channel NOT IN ('webhook', 'inapp') THEN
            PERFORM pgnotify.reject('template', format('%s %s notification needs a template or a body',
                CASE WHEN NEW.channel IN ('email', 'sms', 'inapp') THEN 'an' ELSE 'a' END, NEW.channel),
                'set template => ''key'' (a row in pgnotify.templates) or body => ''...''');
        END IF;
        PERFORM pgnotify.reject('subject', 'an email needs a subject (or a template that has one)',
            'set subject => ''...'' or template => ''key''');
    END IF;
    IF NEW.template IS NOT NULL THEN  -- nested: a row without a template runs no query
        IF NOT EXISTS (SELECT 1 FROM pgnotify.templates t
                WHERE t.key = NEW.template AND t.channel = NEW.channel) THEN
            PERFORM pgnotify.reject('template', format('unknown template %L for channel %s',
                left(NEW.template, 100), NEW.channel), 'insert it into pgnotify.templates first');
        END IF;
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
    -- run_at and expires_at were checked above (finite, 2000-01-01 to now + 10 years)
    IF NEW.run_at IS NULL THEN
        NEW.run_at := now();
    END IF;
    IF TG_OP = 'INSERT' THEN
        NEW.status := CASE WHEN NEW.run_at > now() THEN 'scheduled' ELSE 'queued' END;
        -- the wake-up, as on the fast path; a future row wakes the scheduler, always
        IF NEW.status = 'scheduled' THEN
            PERFORM pg_notify('pgnotify', 'scheduled');
        ELSE
            wake := pgnotify.wake_lock_key(NEW.channel);
            IF pg_advisory_xact_lock_shared(72453902, wake) IS NOT NULL
                    AND pg_try_advisory_lock_shared(72453901, wake) THEN
                PERFORM pg_advisory_unlock_shared(72453901, wake);
                PERFORM pg_notify('pgnotify', NEW.channel);
            END IF;
        END IF;
    END IF;
    RETURN NEW;
END
$fn$;


-- The wake-up moves into validate_notification() (above): a row trigger that already runs costs
-- less than the statement trigger with its transition table. PostgreSQL sends one NOTIFY per
-- distinct channel and transaction, as before.
DROP TRIGGER notifications_notify ON pgnotify.notifications;
DROP FUNCTION pgnotify.notify_inserted();
-- So do the INSERT triggers with WHEN clauses: PostgreSQL prepares a WHEN clause for every
-- statement, even when it is false. Their UPDATE halves stay (notifications_times_changed, and
-- notifications_traceparent for UPDATE OF traceparent); their functions stay.
DROP TRIGGER notifications_defaults ON pgnotify.notifications;
DROP TRIGGER notifications_expiry ON pgnotify.notifications;
DROP TRIGGER notifications_times ON pgnotify.notifications;
DROP TRIGGER notifications_traceparent ON pgnotify.notifications;
CREATE TRIGGER notifications_traceparent
    BEFORE UPDATE OF traceparent ON pgnotify.notifications
    FOR EACH ROW
    WHEN (NEW.traceparent IS NOT NULL
          AND NEW.traceparent !~ '^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$')
    EXECUTE FUNCTION pgnotify.reject_traceparent();

-------------------------------------------------------------------------------------------------
-- 3. enqueue_many(): a JSON array of objects with enqueue()'s argument names; one statement,
-- one NOTIFY per channel at most. Returns one id per element, in order; an element whose
-- idempotency_key was enqueued before (or earlier in the same array) gets that row's id.
-------------------------------------------------------------------------------------------------
CREATE FUNCTION pgnotify.enqueue_many(notifications jsonb) RETURNS bigint[]
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp AS $fn$
DECLARE
    ids bigint[];
BEGIN
    IF jsonb_typeof(enqueue_many.notifications) IS DISTINCT FROM 'array' THEN
        PERFORM pgnotify.reject('notifications', 'enqueue_many() takes a JSON array of objects',
            'like [{"channel": "inapp", "recipient": "u1", "payload": {"n": 1}}]');
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(enqueue_many.notifications) e(item)
               WHERE jsonb_typeof(e.item) IS DISTINCT FROM 'object') THEN
        PERFORM pgnotify.reject('notifications', 'every element of the array must be an object');
    END IF;
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(enqueue_many.notifications) e(item)
               WHERE (e.item ->> 'priority')::numeric NOT BETWEEN -32768 AND 32767) THEN
        PERFORM pgnotify.reject('priority', 'priority must be between -32768 and 32767');
    END IF;
    WITH input AS (
        SELECT o.n, r.*
        FROM jsonb_array_elements(enqueue_many.notifications) WITH ORDINALITY AS o(item, n)
        CROSS JOIN LATERAL jsonb_to_record(o.item) AS r(
            channel text, recipient text, template text, payload jsonb, subject text, body text,
            html_body text, user_id text, category text, locale text, priority integer,
            run_at timestamptz, max_attempts integer, idempotency_key text, traceparent text)
    ), made AS (
        INSERT INTO pgnotify.notifications AS t (channel, recipient, template, payload, subject,
            body, html_body, user_id, category, locale, priority, run_at, max_attempts,
            idempotency_key, traceparent)
        SELECT i.channel, i.recipient, i.template, coalesce(i.payload, '{}'::jsonb), i.subject,
               i.body, i.html_body, i.user_id, i.category, i.locale, coalesce(i.priority, 0),
               coalesce(i.run_at, now()), coalesce(i.max_attempts, 10), i.idempotency_key,
               i.traceparent
        FROM input i ORDER BY i.n
        ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING t.id, t.idempotency_key
    ), unkeyed AS (
        -- identity values rise in insertion order: the k-th new row without a key is the k-th
        -- element without one
        SELECT z.n, z.id FROM unnest(
            ARRAY(SELECT n FROM input WHERE idempotency_key IS NULL ORDER BY n),
            ARRAY(SELECT id FROM made WHERE idempotency_key IS NULL ORDER BY id)) AS z(n, id)
    ), keyed AS (
        SELECT i.n, coalesce(
            (SELECT m.id FROM made m WHERE m.idempotency_key = i.idempotency_key),
            (SELECT x.id FROM pgnotify.notifications x WHERE x.idempotency_key = i.idempotency_key))
            AS id
        FROM input i WHERE i.idempotency_key IS NOT NULL
    )
    SELECT coalesce(array_agg(id ORDER BY n), '{}') INTO ids
    FROM (SELECT n, id FROM unkeyed UNION ALL SELECT n, id FROM keyed) AS every_row;
    RETURN ids;
END
$fn$;
COMMENT ON FUNCTION pgnotify.enqueue_many IS
    'Enqueue a JSON array of notifications (objects with enqueue()''s argument names) in one '
    'statement; returns their ids in order (an already enqueued idempotency_key: that row''s id).';

-- The new functions get the grants of the rest; apply_grants() keeps PUBLIC out.
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_producer') THEN
    GRANT EXECUTE ON FUNCTION pgnotify.wake_lock_key(text), pgnotify.enqueue_many(jsonb)
        TO pgnotify_producer;
END IF;
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_worker') THEN
    GRANT EXECUTE ON FUNCTION pgnotify.wake_lock_key(text), pgnotify.enqueue_many(jsonb)
        TO pgnotify_worker;
END IF;
PERFORM pgnotify.apply_grants();

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (13, 'producer_path');
END
$migration$;
COMMIT;
