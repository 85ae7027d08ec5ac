-- pgnotify-worker migration 0022: a cheap producer INSERT, and no quadratic keyed batch.
--   1. The idempotency check (notifications_validate_idempotency, 0008) looks the key up with
--      the unique index, always. PL/pgSQL caches the lookup's plan per session; planned while
--      notifications is empty and freshly analysed, it was a sequential scan, and a keyed
--      INSERT ... SELECT (notify_topic, enqueue_many, notify_user) re-read every row already
--      inserted for each new row: quadratic (2,000 rows, 1.35 s in the trigger). The trigger
--      function now plans with enable_seqscan off, so the only plan is the unique index
--      notifications_idempotency_key_idx (equality on idempotency_key; the index's predicate
--      idempotency_key IS NOT NULL is implied).
--   2. A contact's time zone is checked against pgnotify.timezone_names, a copy of
--      pg_timezone_names' names taken now (a primary-key lookup) instead of pg_timezone_names
--      itself, which reads every zone file for every row (tens of ms a contact). Equally
--      strict: a name missing from the copy is looked up in pg_timezone_names as before (so a
--      zone added by a tzdata upgrade passes); pgnotify.refresh_timezone_names() renews the
--      copy (after a tzdata upgrade that removes a zone).
-- Idempotent: does nothing when pgnotify.schema_migrations records version 22.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 22) THEN
    RAISE NOTICE 'pgnotify migration 22 (producer speed) is already applied';
    RETURN;
END IF;

-------------------------------------------------------------------------------------------------
-- 1. The idempotency lookup: the unique index, whatever the statistics said when it was planned.
-------------------------------------------------------------------------------------------------
ALTER FUNCTION pgnotify.check_idempotency_key() SET enable_seqscan = off;

-------------------------------------------------------------------------------------------------
-- 2. Time zone names: a copy of pg_timezone_names, filled now.
-------------------------------------------------------------------------------------------------
CREATE TABLE pgnotify.timezone_names (
    name text PRIMARY KEY
);
COMMENT ON TABLE pgnotify.timezone_names IS
    'The names of pg_timezone_names, copied at migration time so that a contact''s time zone is '
    'checked with one index lookup; SELECT pgnotify.refresh_timezone_names() after a tzdata '
    'upgrade. A name missing here is still looked up in pg_timezone_names.';
INSERT INTO pgnotify.timezone_names (name) SELECT DISTINCT name FROM pg_timezone_names;

CREATE FUNCTION pgnotify.refresh_timezone_names() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    changed integer;
    removed integer;
BEGIN
    LOCK TABLE pgnotify.timezone_names IN SHARE ROW EXCLUSIVE MODE;
    DELETE FROM pgnotify.timezone_names t
    WHERE NOT EXISTS (SELECT 1 FROM pg_timezone_names z WHERE z.name = t.name);
    GET DIAGNOSTICS removed = ROW_COUNT;
    INSERT INTO pgnotify.timezone_names (name)
    SELECT DISTINCT name FROM pg_timezone_names
    ON CONFLICT (name) DO NOTHING;
    GET DIAGNOSTICS changed = ROW_COUNT;
    RETURN changed + removed;
END
$fn$;
COMMENT ON FUNCTION pgnotify.refresh_timezone_names IS
    'Make pgnotify.timezone_names the names of pg_timezone_names again (after a tzdata upgrade); '
    'returns how many names were added or removed.';

-- validate_contact(): as in 0008, with the time zone looked up in the copy first.
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
    ELSIF NOT EXISTS (SELECT 1 FROM pgnotify.timezone_names z WHERE z.name = NEW.timezone)
            AND NOT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = NEW.timezone) THEN
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

-------------------------------------------------------------------------------------------------
-- 3. enqueue_many(): as in 0013, but the id of each keyed element is found without scanning
--    the inserted rows once per element (5,000 keyed elements: quadratic, 3 s; now linear), and
--    a key already taken is looked up with the unique index whatever the statistics.
-------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION pgnotify.enqueue_many(notifications jsonb) RETURNS bigint[]
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp
SET enable_seqscan = off AS $fn$
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
        -- the new rows' ids by key: one jsonb object built once (an InitPlan), looked up per
        -- element (a correlated scan of made per element was quadratic); a key that was
        -- already taken: the existing row's id (the unique index, see the SET above)
        SELECT i.n, coalesce(
            ((SELECT jsonb_object_agg(m.idempotency_key, m.id) FROM made m
              WHERE m.idempotency_key IS NOT NULL) ->> i.idempotency_key)::bigint,
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

PERFORM pgnotify.apply_grants();
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_worker') THEN
    GRANT SELECT ON pgnotify.timezone_names TO pgnotify_worker;   -- contacts it writes
END IF;
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_admin') THEN
    GRANT SELECT ON pgnotify.timezone_names TO pgnotify_admin;
    GRANT EXECUTE ON FUNCTION pgnotify.refresh_timezone_names() TO pgnotify_admin;
END IF;
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_producer') THEN
    GRANT SELECT ON pgnotify.timezone_names TO pgnotify_producer; -- contacts it writes
END IF;

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (22, 'producer speed');
END
$migration$;
COMMIT;
