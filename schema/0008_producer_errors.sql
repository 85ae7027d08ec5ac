-- pgnotify-worker migration 0008: producer mistakes get an answer instead of silence.
--
-- * notify_user() refuses a template that does not exist (or exists for none of the channels the
--   user can be reached on), unknown channel names, a user reachable on none of the channels, and
--   a call with neither template nor body where one is needed; it used to return '{}'. Callers
--   that notify many users at once may SET pgnotify.notify_user_unreachable = 'skip': a user
--   who cannot be reached (no address, or the template is for none of their channels) then
--   gives '{}' and a NOTICE; a misspelt template or channel is refused whatever the setting.
-- * An idempotency key used again for a different notification is refused (23514, column
--   idempotency_key) on every path: enqueue(), notify_user(), INSERT ... ON CONFLICT. The same
--   call again still returns the same id(s) (notify_user() used to return '{}' on a repeat).
-- * preferences, devices, consents, contacts, categories, templates and suppressions refuse bad
--   values with a `pgnotify:` message naming the field and the allowed values, not a raw
--   constraint name.
--
-- Functions replaced here keep their signatures; SECURITY DEFINER and SET options that an
-- earlier migration (or an operator) gave them are re-applied after the replacement.
-- Idempotent: does nothing when pgnotify.schema_migrations records version 8.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
DECLARE
    kept jsonb;
    item jsonb;
    setting text;
    guc text;
    before text;
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 8) THEN
    RAISE NOTICE 'pgnotify migration 8 (producer_errors) is already applied';
    RETURN;
END IF;

-- What the functions replaced below carry beyond their body (CREATE OR REPLACE resets it).
SELECT jsonb_agg(jsonb_build_object('fn', p.oid::regprocedure::text, 'secdef', p.prosecdef,
                                    'config', to_jsonb(p.proconfig)))
INTO kept
FROM pg_proc p
WHERE p.oid IN (
    'pgnotify.enqueue(text, text, text, jsonb, text, text, text, text, text, text, integer, '
        'timestamptz, integer, text, text)'::regprocedure,
    'pgnotify.notify_user(text, text, text, jsonb, text[], text, text, integer, timestamptz, '
        'timestamptz, text)'::regprocedure,
    'pgnotify.validate_contact()'::regprocedure);

-------------------------------------------------------------------------------------------------
-- Helpers.
-------------------------------------------------------------------------------------------------
-- reject() for the tables around notifications (reject() itself names pgnotify.notifications).
CREATE OR REPLACE FUNCTION pgnotify.reject_in(tbl text, col text, msg text, hint text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    IF hint IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = format('pgnotify: %s', msg),
            SCHEMA = 'pgnotify', TABLE = tbl, COLUMN = col;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = format('pgnotify: %s', msg),
        HINT = hint, SCHEMA = 'pgnotify', TABLE = tbl, COLUMN = col;
END
$fn$;
COMMENT ON FUNCTION pgnotify.reject_in IS
    'Raise SQLSTATE 23514 with a pgnotify: message, naming the table and column (and a hint).';

-- The recipient as the worker's logs show it (pgnotify_worker.core.redact.mask_recipient).
CREATE OR REPLACE FUNCTION pgnotify.mask_recipient(p_channel text, p_recipient text) RETURNS text
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT CASE
        WHEN p_recipient IS NULL THEN NULL
        WHEN p_channel = 'email' THEN CASE
            WHEN position('@' IN p_recipient) = 0 THEN '***'
            WHEN position('.' IN substr(p_recipient, position('@' IN p_recipient) + 1)) = 0 THEN
                left(p_recipient, 1) || '***@'
                    || left(substr(p_recipient, position('@' IN p_recipient) + 1), 1) || '***'
            ELSE left(p_recipient, 1) || '***@'
                || left(substr(p_recipient, position('@' IN p_recipient) + 1), 1) || '***.'
                || substring(p_recipient FROM '\.([^.]*)$') END
        WHEN p_channel = 'sms' THEN
            CASE WHEN btrim(p_recipient) LIKE '+%' THEN '+' ELSE '' END
            || repeat('*', greatest(length(regexp_replace(p_recipient, '\D', '', 'g')) - 4, 2))
            || CASE WHEN length(regexp_replace(p_recipient, '\D', '', 'g')) > 4
                    THEN right(regexp_replace(p_recipient, '\D', '', 'g'), 4) ELSE '' END
        WHEN p_channel = 'webhook' THEN
            coalesce(lower(substring(p_recipient FROM '^([^:/?#]+://[^/?#]*)')), '<url>') || '/…'
        WHEN length(p_recipient) > 4 THEN left(p_recipient, 4) || '…'
        ELSE '…'
    END;
$fn$;
COMMENT ON FUNCTION pgnotify.mask_recipient IS
    'A recipient masked as in the worker''s logs: a***@e***.com, +1******0123, https://host/…, toke…';

-------------------------------------------------------------------------------------------------
-- Idempotency keys. "The same notification" means the same what and to whom: channel,
-- recipient, user_id, category, template, payload, subject, body, html_body, locale. Delivery
-- options (priority, run_at, max_attempts, expires_at, traceparent) may differ on a retry
-- (a retry that computes now() + interval gets a later run_at): the first row stands.
-------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION pgnotify.idempotency_differences(had pgnotify.notifications,
                                                            want pgnotify.notifications)
RETURNS text[] LANGUAGE sql IMMUTABLE AS $fn$
    SELECT array_remove(ARRAY[
        CASE WHEN had.channel IS DISTINCT FROM want.channel THEN 'channel' END,
        CASE WHEN had.recipient IS DISTINCT FROM want.recipient THEN 'recipient' END,
        CASE WHEN had.user_id IS DISTINCT FROM want.user_id THEN 'user_id' END,
        CASE WHEN had.category IS DISTINCT FROM want.category THEN 'category' END,
        CASE WHEN had.template IS DISTINCT FROM want.template THEN 'template' END,
        CASE WHEN had.payload IS DISTINCT FROM want.payload THEN 'payload' END,
        CASE WHEN had.subject IS DISTINCT FROM want.subject THEN 'subject' END,
        CASE WHEN had.body IS DISTINCT FROM want.body THEN 'body' END,
        CASE WHEN had.html_body IS DISTINCT FROM want.html_body THEN 'html_body' END,
        CASE WHEN had.locale IS DISTINCT FROM want.locale THEN 'locale' END], NULL);
$fn$;
COMMENT ON FUNCTION pgnotify.idempotency_differences IS
    'The fields in which a new notification differs from the row that already has its key.';

-- The refusal. Names the key, the existing row's channel and masked recipient and the fields
-- that differ; never a value of the payload or of any other field.
CREATE OR REPLACE FUNCTION pgnotify.reject_idempotency_reuse(key text, had_channel text,
                                                             had_recipient text, differs text[])
RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pgnotify.reject('idempotency_key', format(
        'idempotency key "%s" was used for a different notification (channel %s, recipient %s); '
        'this one differs in %s', key, had_channel,
        pgnotify.mask_recipient(had_channel, had_recipient), array_to_string(differs, ', ')),
        'a new notification needs a new idempotency key; the same call again returns the '
        'existing id');
END
$fn$;

-- Every INSERT path (enqueue(), notify_user(), INSERT ... ON CONFLICT DO NOTHING, a plain INSERT):
-- a key that is taken by a different notification is refused before the insert. Named to run
-- after notifications_validate (triggers fire in name order), so NEW is normalised. SECURITY
-- DEFINER: a producer may insert without being allowed to read other rows.
CREATE OR REPLACE FUNCTION pgnotify.check_idempotency_key() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    had pgnotify.notifications;
    differs text[];
BEGIN
    SELECT n.* INTO had FROM pgnotify.notifications n
    WHERE n.idempotency_key = NEW.idempotency_key AND n.idempotency_key IS NOT NULL;
    IF FOUND THEN
        differs := pgnotify.idempotency_differences(had, NEW);
        IF cardinality(differs) > 0 THEN
            PERFORM pgnotify.reject_idempotency_reuse(NEW.idempotency_key, had.channel,
                                                      had.recipient, differs);
        END IF;
    END IF;
    RETURN NEW;
END
$fn$;
DROP TRIGGER IF EXISTS notifications_validate_idempotency ON pgnotify.notifications;
CREATE TRIGGER notifications_validate_idempotency
    BEFORE INSERT ON pgnotify.notifications
    FOR EACH ROW WHEN (NEW.idempotency_key IS NOT NULL)
    EXECUTE FUNCTION pgnotify.check_idempotency_key();

-- enqueue(): as in 0005, and a key that a concurrent transaction has just committed for a
-- different notification (the trigger could not see it yet) is refused here.
CREATE OR REPLACE FUNCTION pgnotify.enqueue(
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
    had pgnotify.notifications;
    want pgnotify.notifications;
    differs text[];
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
        -- The key was enqueued before (the trigger compared that row), or by a transaction that
        -- has just committed: compare with what the validation trigger would have stored.
        SELECT n.* INTO had FROM pgnotify.notifications n
        WHERE n.idempotency_key = enqueue.idempotency_key;
        want.channel := enqueue.channel;
        want.recipient := coalesce(enqueue.recipient, CASE enqueue.channel
            WHEN 'inapp' THEN enqueue.user_id WHEN 'push' THEN 'user:' || enqueue.user_id END);
        want.user_id := enqueue.user_id;
        want.category := enqueue.category;
        want.template := enqueue.template;
        want.payload := coalesce(enqueue.payload, '{}'::jsonb);
        want.subject := enqueue.subject;
        want.body := enqueue.body;
        want.html_body := enqueue.html_body;
        want.locale := enqueue.locale;
        differs := pgnotify.idempotency_differences(had, want);
        IF had.id IS NOT NULL AND cardinality(differs) > 0 THEN
            PERFORM pgnotify.reject_idempotency_reuse(enqueue.idempotency_key, had.channel,
                                                      had.recipient, differs);
        END IF;
        new_id := had.id;
    END IF;
    RETURN new_id;
END
$fn$;
COMMENT ON FUNCTION pgnotify.enqueue IS
    'Enqueue one notification; returns its id. Same idempotency_key again: the existing id, no new '
    'row; the key used for a different notification: refused (23514, column idempotency_key).';

-------------------------------------------------------------------------------------------------
-- notify_user(): refuses what is a producer's mistake, returns the same ids on a repeat.
-------------------------------------------------------------------------------------------------
-- How a row made by notify_user() under a key differs from a new call with that key. Only what
-- the caller passed counts: the recipient and locale come from contacts, which may change.
CREATE OR REPLACE FUNCTION pgnotify.notify_user_differences(
    had pgnotify.notifications, wanted text[], p_user_id text, p_category text, p_template text,
    p_payload jsonb, p_subject text, p_body text)
RETURNS text[] LANGUAGE sql IMMUTABLE AS $fn$
    SELECT array_remove(ARRAY[
        CASE WHEN NOT had.channel = ANY (wanted) THEN 'channels' END,
        CASE WHEN had.user_id IS DISTINCT FROM p_user_id THEN 'user_id' END,
        CASE WHEN had.category IS DISTINCT FROM p_category THEN 'category' END,
        CASE WHEN had.template IS DISTINCT FROM p_template THEN 'template' END,
        CASE WHEN had.payload IS DISTINCT FROM coalesce(p_payload, '{}'::jsonb) THEN 'payload' END,
        CASE WHEN had.subject IS DISTINCT FROM p_subject THEN 'subject' END,
        CASE WHEN had.body IS DISTINCT FROM p_body THEN 'body' END], NULL);
$fn$;

CREATE OR REPLACE FUNCTION pgnotify.notify_user(
    user_id         text,
    category        text,
    template        text DEFAULT NULL,
    payload         jsonb DEFAULT '{}'::jsonb,
    channels        text[] DEFAULT NULL,
    subject         text DEFAULT NULL,
    body            text DEFAULT NULL,
    priority        integer DEFAULT 0,
    run_at          timestamptz DEFAULT NULL,
    expires_at      timestamptz DEFAULT NULL,
    idempotency_key text DEFAULT NULL
) RETURNS bigint[]
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    ids bigint[] := '{}';
    group_uid uuid := gen_random_uuid();
    wanted text[];
    unknown text;
    keys text[];
    had pgnotify.notifications;
    differs text[];
    reach_channel text[];
    reach_to text[];
    templated text[];
    usable text[];
    is_critical boolean;
    who text := format('%L', left(notify_user.user_id, 100));
    unreachable text;
    skip_unreachable boolean :=
        current_setting('pgnotify.notify_user_unreachable', true) IS NOT DISTINCT FROM 'skip';
BEGIN
    IF notify_user.user_id IS NULL OR btrim(notify_user.user_id) = '' THEN
        PERFORM pgnotify.reject('user_id', 'notify_user needs a user_id');
    END IF;
    wanted := coalesce(notify_user.channels,
        (SELECT c.channels FROM pgnotify.categories c WHERE c.name = notify_user.category),
        ARRAY['email', 'sms', 'push', 'inapp']);
    SELECT string_agg(coalesce(quote_literal(left(w, 40)), 'NULL'), ', ') INTO unknown
    FROM unnest(wanted) AS w
    WHERE w IS NULL OR w NOT IN ('email', 'sms', 'push', 'webhook', 'inapp');
    IF unknown IS NOT NULL THEN
        PERFORM pgnotify.reject('channel', format('unknown channel %s in channels', unknown),
            'one of email, sms, push, webhook, inapp');
    END IF;
    IF cardinality(wanted) = 0 THEN
        PERFORM pgnotify.reject('channel', 'channels is empty: there is nothing to notify on',
            'leave channels out to use the category''s channels');
    END IF;
    wanted := ARRAY(SELECT w FROM unnest(wanted) WITH ORDINALITY AS u(w, i)
                    GROUP BY w ORDER BY min(i));  -- once each, in the caller's order

    -- The same key again: the rows it made, if the call is the same; refused if it is not.
    IF notify_user.idempotency_key IS NOT NULL THEN
        IF notify_user.idempotency_key = '' OR length(notify_user.idempotency_key) > 247 THEN
            PERFORM pgnotify.reject('idempotency_key',
                'idempotency_key must be 1 to 247 characters for notify_user',
                'notify_user stores <key>:<channel> on each row, at most 255 characters');
        END IF;
        keys := ARRAY(SELECT notify_user.idempotency_key || ':' || ch
                      FROM unnest(ARRAY['email', 'sms', 'push', 'webhook', 'inapp']) AS ch);
        FOR had IN
            SELECT n.* FROM pgnotify.notifications n
            WHERE n.idempotency_key = ANY (keys) AND n.idempotency_key IS NOT NULL ORDER BY n.id
        LOOP
            differs := pgnotify.notify_user_differences(had, wanted, notify_user.user_id,
                notify_user.category, notify_user.template, notify_user.payload,
                notify_user.subject, notify_user.body);
            IF cardinality(differs) > 0 THEN
                PERFORM pgnotify.reject_idempotency_reuse(notify_user.idempotency_key,
                    had.channel, had.recipient, differs);
            END IF;
            ids := ids || had.id;
        END LOOP;
        IF cardinality(ids) > 0 THEN
            RETURN ids;
        END IF;
    END IF;

    IF notify_user.template IS NOT NULL THEN
        templated := ARRAY(SELECT DISTINCT t.channel FROM pgnotify.templates t
                           WHERE t.key = notify_user.template ORDER BY 1);
    END IF;
    SELECT coalesce(array_agg(a.channel ORDER BY a.i), '{}'), coalesce(array_agg(a.recipient ORDER BY a.i), '{}')
    INTO reach_channel, reach_to
    FROM (SELECT u.w AS channel, u.i, pgnotify.address_of(notify_user.user_id, u.w) AS recipient
          FROM unnest(wanted) WITH ORDINALITY AS u(w, i)) a
    WHERE a.recipient IS NOT NULL;

    IF notify_user.template IS NOT NULL AND cardinality(templated) = 0 THEN
        PERFORM pgnotify.reject('template', format('unknown template %L (user %s can be reached on %s)',
            left(notify_user.template, 100), who,
            coalesce(nullif(array_to_string(reach_channel, ', '), ''), 'no channel')),
            'insert it into pgnotify.templates first');
    END IF;
    -- Whether a user can be reached depends on their data, not on the call: a caller that
    -- notifies many users at once (a job, a trigger) may choose to skip those with a NOTICE.
    IF cardinality(reach_channel) = 0 THEN
        unreachable := format('user %s cannot be reached on any of %s', who,
                              array_to_string(wanted, ', '));
        IF skip_unreachable THEN
            RAISE NOTICE 'pgnotify: %', unreachable;
            RETURN ids;
        END IF;
        PERFORM pgnotify.reject('user_id', unreachable,
            'give them an address in pgnotify.contacts (email, phone, webhook_url) or a device '
            '(pgnotify.register_device); inapp reaches every user; SET pgnotify.'
            'notify_user_unreachable = ''skip'' returns ''{}'' instead');
    END IF;
    usable := ARRAY(
        SELECT r FROM unnest(reach_channel) WITH ORDINALITY AS u(r, i)
        WHERE (notify_user.template IS NULL OR r = ANY (templated))
          AND (notify_user.template IS NOT NULL OR notify_user.body IS NOT NULL
               OR r IN ('webhook', 'inapp'))
          -- an email needs a subject (schema 0006): without one or a template it is left out
          AND (r <> 'email' OR notify_user.subject IS NOT NULL OR notify_user.template IS NOT NULL)
        ORDER BY i);
    IF cardinality(usable) = 0 THEN
        IF notify_user.template IS NOT NULL THEN
            unreachable := format(
                'template %L exists for %s, but user %s can be reached on %s only',
                left(notify_user.template, 100), array_to_string(templated, ', '), who,
                array_to_string(reach_channel, ', '));
            IF skip_unreachable THEN
                RAISE NOTICE 'pgnotify: %', unreachable;
                RETURN ids;
            END IF;
            PERFORM pgnotify.reject('template', unreachable,
                'add the template for one of those channels; SET pgnotify.'
                'notify_user_unreachable = ''skip'' returns ''{}'' instead');
        END IF;
        PERFORM pgnotify.reject('template', format(
            'a notification to user %s on %s needs a template or a body', who,
            array_to_string(reach_channel, ', ')),
            'set template => ''key'' (a row in pgnotify.templates) or body => ''...''');
    END IF;

    -- Channels turned off are left out (the user's choice, not a mistake: '{}' when all are),
    -- except for critical categories, which the worker sends whatever the preferences.
    is_critical := coalesce((SELECT c.critical FROM pgnotify.categories c
                          WHERE c.name = notify_user.category), false);
    WITH made AS (
        INSERT INTO pgnotify.notifications AS n (channel, recipient, user_id, category, template,
            payload, subject, body, locale, priority, run_at, expires_at, group_id, idempotency_key)
        SELECT r.channel, r.recipient, notify_user.user_id, notify_user.category,
               notify_user.template, notify_user.payload, notify_user.subject, notify_user.body,
               (SELECT ct.locale FROM pgnotify.contacts ct WHERE ct.user_id = notify_user.user_id),
               notify_user.priority, notify_user.run_at, notify_user.expires_at, group_uid,
               CASE WHEN notify_user.idempotency_key IS NOT NULL
                    THEN notify_user.idempotency_key || ':' || r.channel END
        FROM unnest(reach_channel, reach_to) AS r(channel, recipient)
        WHERE r.channel = ANY (usable)
          AND (is_critical OR pgnotify.preference_of(notify_user.user_id, r.channel,
                                                  notify_user.category) <> 'off')
        ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING n.id
    )
    SELECT coalesce(array_agg(id ORDER BY id), '{}') INTO ids FROM made;

    -- A concurrent call with the key committed first: its rows, if it was the same call.
    IF notify_user.idempotency_key IS NOT NULL THEN
        FOR had IN
            SELECT n.* FROM pgnotify.notifications n
            WHERE n.idempotency_key = ANY (keys) AND n.idempotency_key IS NOT NULL
              AND n.id <> ALL (ids)
        LOOP
            differs := pgnotify.notify_user_differences(had, wanted, notify_user.user_id,
                notify_user.category, notify_user.template, notify_user.payload,
                notify_user.subject, notify_user.body);
            IF cardinality(differs) > 0 THEN
                PERFORM pgnotify.reject_idempotency_reuse(notify_user.idempotency_key,
                    had.channel, had.recipient, differs);
            END IF;
            ids := ids || had.id;
        END LOOP;
        ids := ARRAY(SELECT x FROM unnest(ids) AS x ORDER BY x);
    END IF;
    RETURN ids;
END
$fn$;
COMMENT ON FUNCTION pgnotify.notify_user IS
    'Notify a user on every channel they can be reached on and have not turned off; returns the '
    'ids (''{}'' when they turned every one off). Refuses an unknown template or channel and a '
    'user reachable on none of the channels (pgnotify.notify_user_unreachable = skip: ''{}'' '
    'and a NOTICE). The same idempotency_key again: the same ids.';

-------------------------------------------------------------------------------------------------
-- The tables producers write besides notifications: a pgnotify: message naming the field and
-- the allowed values before a CHECK, NOT NULL or foreign key answers with its raw name.
-- Uniqueness is left to the keys, so INSERT ... ON CONFLICT upserts keep working.
-------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION pgnotify.validate_preference() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NEW.user_id IS NULL OR btrim(NEW.user_id) = '' THEN
        PERFORM pgnotify.reject_in('preferences', 'user_id', 'a preference needs a user_id');
    END IF;
    IF NEW.setting IS NULL OR NEW.setting NOT IN ('immediate', 'daily', 'weekly', 'off') THEN
        PERFORM pgnotify.reject_in('preferences', 'setting', format(
            'unknown preference setting %s: use immediate, daily, weekly or off',
            coalesce(quote_literal(left(NEW.setting, 40)), 'NULL')),
            'immediate sends at once, daily and weekly collect a digest, off sends nothing');
    END IF;
    IF NEW.channel IS NULL OR NEW.channel NOT IN ('*', 'email', 'sms', 'push', 'webhook', 'inapp') THEN
        PERFORM pgnotify.reject_in('preferences', 'channel', format(
            'unknown preference channel %s: use *, email, sms, push, webhook or inapp',
            coalesce(quote_literal(left(NEW.channel, 40)), 'NULL')), '* means every channel');
    END IF;
    IF NEW.category IS NULL OR btrim(NEW.category) = '' THEN
        PERFORM pgnotify.reject_in('preferences', 'category',
            'a preference needs a category, or * for every category');
    END IF;
    IF NEW.source IS NULL THEN
        PERFORM pgnotify.reject_in('preferences', 'source',
            'a preference needs a source (where the choice was made, e.g. app)');
    END IF;
    RETURN NEW;
END
$fn$;
DROP TRIGGER IF EXISTS preferences_validate ON pgnotify.preferences;
CREATE TRIGGER preferences_validate BEFORE INSERT OR UPDATE ON pgnotify.preferences
    FOR EACH ROW EXECUTE FUNCTION pgnotify.validate_preference();

CREATE OR REPLACE FUNCTION pgnotify.validate_device() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NEW.user_id IS NULL OR btrim(NEW.user_id) = '' THEN
        PERFORM pgnotify.reject_in('devices', 'user_id', 'a device needs a user_id');
    END IF;
    IF NEW.platform IS NULL OR NEW.platform NOT IN ('ios', 'android', 'web') THEN
        PERFORM pgnotify.reject_in('devices', 'platform', format(
            'unknown device platform %s: use ios, android or web',
            coalesce(quote_literal(left(NEW.platform, 40)), 'NULL')),
            'web takes the PushSubscription JSON as its token');
    END IF;
    IF NEW.token IS NULL OR btrim(NEW.token) = '' THEN
        PERFORM pgnotify.reject_in('devices', 'token', 'a device needs a token',
            'the FCM registration token, or the Web Push PushSubscription JSON');
    ELSIF length(NEW.token) > 4096 THEN
        PERFORM pgnotify.reject_in('devices', 'token', format(
            'device token is %s characters, over the 4096 limit', length(NEW.token)));
    END IF;
    RETURN NEW;
END
$fn$;
DROP TRIGGER IF EXISTS devices_validate ON pgnotify.devices;
CREATE TRIGGER devices_validate BEFORE INSERT OR UPDATE OF user_id, platform, token
    ON pgnotify.devices FOR EACH ROW EXECUTE FUNCTION pgnotify.validate_device();

CREATE OR REPLACE FUNCTION pgnotify.validate_consent() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    known text;
BEGIN
    IF NEW.user_id IS NULL OR btrim(NEW.user_id) = '' THEN
        PERFORM pgnotify.reject_in('consents', 'user_id', 'a consent needs a user_id');
    END IF;
    IF NEW.category IS NULL OR NOT EXISTS (
            SELECT 1 FROM pgnotify.categories c WHERE c.name = NEW.category) THEN
        SELECT string_agg(c.name, ', ' ORDER BY c.requires_consent DESC, c.name) INTO known
        FROM (SELECT * FROM pgnotify.categories ORDER BY requires_consent DESC, name LIMIT 20) c;
        PERFORM pgnotify.reject_in('consents', 'category', format(
            'unknown category %s for a consent',
            coalesce(quote_literal(left(NEW.category, 100)), 'NULL')),
            format('a row in pgnotify.categories: %s', coalesce(known, 'there are none')));
    END IF;
    IF NEW.granted IS NULL THEN
        PERFORM pgnotify.reject_in('consents', 'granted',
            'a consent is granted (true) or withdrawn (false), not NULL');
    END IF;
    IF NEW.source IS NULL OR btrim(NEW.source) = '' THEN
        PERFORM pgnotify.reject_in('consents', 'source',
            'a consent needs a source (where it was given, e.g. ''signup form'')');
    END IF;
    RETURN NEW;
END
$fn$;
DROP TRIGGER IF EXISTS consents_validate ON pgnotify.consents;
CREATE TRIGGER consents_validate BEFORE INSERT OR UPDATE ON pgnotify.consents
    FOR EACH ROW EXECUTE FUNCTION pgnotify.validate_consent();

-- Contacts: as in 0003, plus quiet hours in pairs, a required user_id and time zone, a phone
-- number held to the digit count a notification is, and what notify_user() would otherwise fail
-- on later (schema 0006's limits: an email over 254 characters, a + number without an assigned
-- country code, a webhook URL to a blocked address written as a number).
CREATE OR REPLACE FUNCTION pgnotify.validate_contact() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    digits text;
    reason text;
BEGIN
    NEW.updated_at := now();
    IF NEW.user_id IS NULL OR btrim(NEW.user_id) = '' THEN
        PERFORM pgnotify.reject_in('contacts', 'user_id', 'a contact needs a user_id');
    END IF;
    IF NEW.email IS NOT NULL AND (length(NEW.email) > 254 OR NEW.email !~
            '^[^[:space:]@"(),:;<>\[\\\]]+@[^[:space:]@"(),:;<>\[\\\].]+(\.[^[:space:]@"(),:;<>\[\\\].]+)+$') THEN
        PERFORM pgnotify.reject_in('contacts', 'email',
            'contact email is not a valid email address',
            'expected local@domain.tld, without a display name');
    END IF;
    IF NEW.phone IS NOT NULL THEN
        digits := translate(NEW.phone, '+() .-', '');
        IF NEW.phone !~ '^\+?[0-9() .-]{4,32}$' OR length(digits) NOT BETWEEN 4 AND 15 THEN
            PERFORM pgnotify.reject_in('contacts', 'phone', 'contact phone is not a phone number',
                'expected E.164 like +14155550123');
        ELSIF left(NEW.phone, 1) = '+' AND (length(digits) < 7
                OR pgnotify.e164_country_code_length(digits) = 0) THEN
            PERFORM pgnotify.reject_in('contacts', 'phone',
                'contact phone is not a valid E.164 phone number',
                'expected + then country code and number, 7 to 15 digits, like +14155550123');
        END IF;
    END IF;
    IF NEW.timezone IS NULL THEN
        PERFORM pgnotify.reject_in('contacts', 'timezone', 'a contact needs a time zone',
            'leave it out for UTC, or an IANA name such as Europe/Paris');
    ELSIF NOT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = NEW.timezone) THEN
        PERFORM pgnotify.reject_in('contacts', 'timezone',
            format('unknown time zone %L', left(NEW.timezone, 60)),
            'an IANA name such as Europe/Paris or America/New_York');
    END IF;
    IF NEW.webhook_url IS NOT NULL THEN
        IF length(NEW.webhook_url) > 2048 OR NEW.webhook_url !~* '^https?://[^/?#[:space:]@]+' THEN
            PERFORM pgnotify.reject_in('contacts', 'webhook_url',
                'contact webhook_url is not an http(s) URL', 'expected https://host[:port]/path');
        END IF;
        reason := pgnotify.webhook_host_refusal(NEW.webhook_url);
        IF reason IS NOT NULL THEN
            PERFORM pgnotify.reject_in('contacts', 'webhook_url', 'contact ' || reason);
        END IF;
    END IF;
    IF (NEW.quiet_start IS NULL) <> (NEW.quiet_end IS NULL) THEN
        PERFORM pgnotify.reject_in('contacts',
            CASE WHEN NEW.quiet_start IS NULL THEN 'quiet_start' ELSE 'quiet_end' END,
            'quiet hours need both quiet_start and quiet_end (or neither)',
            'local times; the window may wrap midnight, like 22:00 to 07:00');
    END IF;
    RETURN NEW;
END
$fn$;

CREATE OR REPLACE FUNCTION pgnotify.validate_category() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    unknown text;
BEGIN
    IF NEW.name IS NULL OR btrim(NEW.name) = '' THEN
        PERFORM pgnotify.reject_in('categories', 'name', 'a category needs a name');
    ELSIF length(NEW.name) > 100 THEN
        PERFORM pgnotify.reject_in('categories', 'name', 'category name is longer than 100 characters');
    END IF;
    IF NEW.default_preference IS NULL
            OR NEW.default_preference NOT IN ('immediate', 'daily', 'weekly', 'off') THEN
        PERFORM pgnotify.reject_in('categories', 'default_preference', format(
            'unknown default_preference %s: use immediate, daily, weekly or off',
            coalesce(quote_literal(left(NEW.default_preference, 40)), 'NULL')));
    END IF;
    IF NEW.critical IS NULL OR NEW.requires_consent IS NULL THEN
        PERFORM pgnotify.reject_in('categories',
            CASE WHEN NEW.critical IS NULL THEN 'critical' ELSE 'requires_consent' END,
            'critical and requires_consent are true or false, not NULL');
    END IF;
    IF NEW.critical AND NEW.requires_consent THEN
        PERFORM pgnotify.reject_in('categories', 'requires_consent',
            'a category cannot be both critical and requires_consent',
            'critical ignores opt-outs (security, password resets); requires_consent needs an '
            'opt-in (marketing)');
    END IF;
    IF NEW.channels IS NULL THEN
        PERFORM pgnotify.reject_in('categories', 'channels', 'a category needs its channels',
            'an array of email, sms, push, webhook, inapp');
    END IF;
    SELECT string_agg(coalesce(quote_literal(left(ch, 40)), 'NULL'), ', ') INTO unknown
    FROM unnest(NEW.channels) AS ch
    WHERE ch IS NULL OR ch NOT IN ('email', 'sms', 'push', 'webhook', 'inapp');
    IF unknown IS NOT NULL THEN
        PERFORM pgnotify.reject_in('categories', 'channels',
            format('unknown channel %s in category channels', unknown),
            'one of email, sms, push, webhook, inapp');
    END IF;
    IF NEW.ttl IS NOT NULL AND NEW.ttl <= interval '0' THEN
        PERFORM pgnotify.reject_in('categories', 'ttl', format('category ttl must be positive, not %s',
            NEW.ttl), 'leave it NULL for notifications that never expire');
    END IF;
    RETURN NEW;
END
$fn$;
DROP TRIGGER IF EXISTS categories_validate ON pgnotify.categories;
CREATE TRIGGER categories_validate BEFORE INSERT OR UPDATE ON pgnotify.categories
    FOR EACH ROW EXECUTE FUNCTION pgnotify.validate_category();

CREATE OR REPLACE FUNCTION pgnotify.validate_template() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NEW.key IS NULL OR btrim(NEW.key) = '' THEN
        PERFORM pgnotify.reject_in('templates', 'key', 'a template needs a key',
            'the name notifications use in template => ''key''');
    END IF;
    IF NEW.channel IS NULL OR NEW.channel NOT IN ('email', 'sms', 'push', 'webhook', 'inapp') THEN
        PERFORM pgnotify.reject_in('templates', 'channel', format(
            'unknown template channel %s: use email, sms, push, webhook or inapp',
            coalesce(quote_literal(left(NEW.channel, 40)), 'NULL')));
    END IF;
    IF NEW.locale IS NULL THEN
        PERFORM pgnotify.reject_in('templates', 'locale',
            'a template needs a locale: '''' for the default', 'like '''', en, fr, fr-CA, pt_BR');
    ELSIF NEW.locale <> '' AND NEW.locale !~ '^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$' THEN
        PERFORM pgnotify.reject_in('templates', 'locale',
            format('template locale %L is not a language tag', left(NEW.locale, 40)),
            'like '''' (the default), en, fr, fr-CA, pt_BR');
    END IF;
    IF NEW.version IS NULL OR NEW.version < 1 THEN
        PERFORM pgnotify.reject_in('templates', 'version', format(
            'template version must be 1 or more, not %s', coalesce(NEW.version::text, 'NULL')),
            'a send uses the highest version');
    END IF;
    IF NEW.subject IS NULL AND NEW.body IS NULL AND NEW.html_body IS NULL THEN
        PERFORM pgnotify.reject_in('templates', 'body',
            format('template %L has no subject, body or html_body', left(NEW.key, 100)));
    END IF;
    RETURN NEW;
END
$fn$;
DROP TRIGGER IF EXISTS templates_validate ON pgnotify.templates;
CREATE TRIGGER templates_validate BEFORE INSERT OR UPDATE ON pgnotify.templates
    FOR EACH ROW EXECUTE FUNCTION pgnotify.validate_template();

CREATE OR REPLACE FUNCTION pgnotify.validate_suppression() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF NEW.channel IS NULL OR NEW.channel NOT IN ('email', 'sms', 'push', 'webhook') THEN
        PERFORM pgnotify.reject_in('suppressions', 'channel', format(
            'unknown suppression channel %s: use email, sms, push or webhook',
            coalesce(quote_literal(left(NEW.channel, 40)), 'NULL')),
            'in-app messages are never suppressed');
    END IF;
    IF NEW.address IS NULL OR btrim(NEW.address) = '' THEN
        PERFORM pgnotify.reject_in('suppressions', 'address', 'a suppression needs an address');
    END IF;
    IF NEW.reason IS NULL OR NEW.source IS NULL THEN
        PERFORM pgnotify.reject_in('suppressions',
            CASE WHEN NEW.reason IS NULL THEN 'reason' ELSE 'source' END,
            'a suppression needs a reason and a source', 'like hard_bounce and support');
    END IF;
    RETURN NEW;
END
$fn$;
DROP TRIGGER IF EXISTS suppressions_validate ON pgnotify.suppressions;
CREATE TRIGGER suppressions_validate BEFORE INSERT OR UPDATE ON pgnotify.suppressions
    FOR EACH ROW EXECUTE FUNCTION pgnotify.validate_suppression();

-------------------------------------------------------------------------------------------------
-- Give the replaced functions back what they carried (SECURITY DEFINER, SET search_path ...).
-------------------------------------------------------------------------------------------------
FOR item IN SELECT * FROM jsonb_array_elements(coalesce(kept, '[]'::jsonb)) LOOP
    IF (item->>'secdef')::boolean THEN
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER', item->>'fn');
    END IF;
    FOR setting IN SELECT jsonb_array_elements_text(
            CASE WHEN jsonb_typeof(item->'config') = 'array' THEN item->'config' ELSE '[]' END)
    LOOP
        guc := split_part(setting, '=', 1);
        before := current_setting(guc, true);
        PERFORM set_config(guc, substr(setting, length(guc) + 2), true);
        EXECUTE format('ALTER FUNCTION %s SET %I FROM CURRENT', item->>'fn', guc);
        PERFORM set_config(guc, coalesce(before, ''), true);
    END LOOP;
END LOOP;

-- the new functions: nothing for PUBLIC (the idempotency check runs as the owner)
PERFORM pgnotify.apply_grants();

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (8, 'producer_errors');
END
$migration$;
COMMIT;
