-- pgnotify-worker migration 0018: delivery status back to the app, and the preference centre.
--   NOTIFY pgnotify_status: every change of a notification's status (a row trigger, fired only
--     when the status differs) and every provider report (delivered, bounced, opened, clicked...)
--     sends a small JSON payload: {"id","event","status","channel","category","user_id"}. Stable:
--     docs/app-apis.md. No recipient, nothing secret; at most ~2 KB (user_id 256 characters,
--     category 100), far under NOTIFY's 8000 bytes.
--   status_webhooks: apps that want those events over HTTP register a URL (for one category or
--     all); each matching event is enqueued as a notification on the webhook channel (category
--     pgnotify_status), so it is signed, retried, dead-lettered and isolated per destination like
--     any webhook. A pgnotify_status row's own changes never produce a status webhook (no loop).
--   wait_for(id, timeout_seconds): polls with back-off until the row is final or the time is up.
--   save_preferences(user, changes, source): what the preference centre and the preference API
--     write: channel x category settings, time zone, quiet hours, global unsubscribe, in one
--     call, critical categories refused, each change kept in preference_history with its source.
-- Idempotent: does nothing when version 18 is recorded.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 18) THEN
    RAISE NOTICE 'pgnotify migration 18 (status_and_preferences) is already applied';
    RETURN;
END IF;

-------------------------------------------------------------------------------------------------
-- Status webhooks.
-------------------------------------------------------------------------------------------------
INSERT INTO pgnotify.categories (name, description, channels) VALUES
    ('pgnotify_status', 'Status events of notifications sent to the app (status_webhooks)',
     '{webhook}')
ON CONFLICT (name) DO NOTHING;

CREATE TABLE pgnotify.status_webhooks (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url         text NOT NULL,
    category    text,  -- NULL: every category (any text: notifications need no categories row)
    events      text[] NOT NULL DEFAULT '{sent,failed,dead,delivered,bounced}',
    enabled     boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX status_webhooks_enabled_idx ON pgnotify.status_webhooks (category) WHERE enabled;
COMMENT ON TABLE pgnotify.status_webhooks IS
    'Where the app hears what happened to its notifications: a URL, for one category (NULL: all) '
    'and the events it wants; each event goes out as a signed webhook (category pgnotify_status).';

CREATE FUNCTION pgnotify.status_events() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT ARRAY['queued', 'scheduled', 'processing', 'sent', 'failed', 'dead', 'cancelled',
                 'skipped', 'held', 'digested', 'expired',
                 'delivered', 'delivery_delayed', 'delivery_failed', 'bounced', 'complained',
                 'dropped', 'opened', 'clicked', 'unsubscribed', 'provider_suppressed'];
$fn$;
COMMENT ON FUNCTION pgnotify.status_events IS
    'The events a status webhook may ask for: statuses and the provider reports we map to.';

CREATE FUNCTION pgnotify.validate_status_webhook() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    reason text;
    unknown text;
BEGIN
    IF NEW.url IS NULL OR length(NEW.url) > 2048
            OR NEW.url !~* '^https?://[^/?#[:space:]@]+([/?#][^[:space:]]*)?$' THEN
        PERFORM pgnotify.reject_in('status_webhooks', 'url',
            'status webhook url is not an http(s) URL (without credentials, at most 2048 characters)',
            'expected https://host[:port]/path');
    END IF;
    IF NEW.url ~* '^https?://(169\.254\.[0-9.]+|\[?fd00:ec2::254\]?|metadata\.google\.internal)([:/?#]|$)' THEN
        PERFORM pgnotify.reject_in('status_webhooks', 'url',
            'status webhook url points at a cloud metadata address, which is never allowed');
    END IF;
    reason := pgnotify.webhook_host_refusal(NEW.url);
    IF reason IS NOT NULL THEN
        PERFORM pgnotify.reject_in('status_webhooks', 'url', 'status ' || reason,
            'allow a private network with PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS '
            '(pgnotify.webhook_allowed_networks)');
    END IF;
    IF length(NEW.category) > 100 OR btrim(NEW.category) = '' THEN
        PERFORM pgnotify.reject_in('status_webhooks', 'category',
            'status webhook category must be 1 to 100 characters, or NULL for every category');
    END IF;
    IF NEW.category = 'pgnotify_status' THEN
        PERFORM pgnotify.reject_in('status_webhooks', 'category',
            'status webhooks cannot watch their own category pgnotify_status (it would loop)');
    END IF;
    IF NEW.events IS NULL OR cardinality(NEW.events) = 0 THEN
        PERFORM pgnotify.reject_in('status_webhooks', 'events',
            'a status webhook needs at least one event', 'e.g. {sent,failed,dead,delivered}');
    END IF;
    SELECT string_agg(DISTINCT coalesce(e, 'NULL'), ', ') INTO unknown
    FROM unnest(NEW.events) e WHERE e IS NULL OR NOT e = ANY (pgnotify.status_events());
    IF unknown IS NOT NULL THEN
        PERFORM pgnotify.reject_in('status_webhooks', 'events',
            format('unknown status webhook event(s) %s', left(unknown, 200)),
            'use ' || array_to_string(pgnotify.status_events(), ', '));
    END IF;
    RETURN NEW;
END
$fn$;
CREATE TRIGGER status_webhooks_validate BEFORE INSERT OR UPDATE ON pgnotify.status_webhooks
    FOR EACH ROW EXECUTE FUNCTION pgnotify.validate_status_webhook();

-- A status event to the status webhooks that want it: one webhook notification each. The body is
-- the Standard Webhooks envelope as text; producer strings in it have '{' written as \u007b, so
-- the template sandbox never reads them as template syntax. A hook whose host is refused in this
-- session is skipped with a warning rather than failing the caller's statement (the worker's
-- completion of a whole batch). A pgnotify_status row's own events never get here (no loop).
CREATE FUNCTION pgnotify.enqueue_status_webhooks(p_id bigint, p_event text, p_status text,
        p_channel text, p_category text, p_user text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp AS $fn$
DECLARE
    hook record;
    data text;
    refusal text;
BEGIN
    IF p_category IS NOT DISTINCT FROM 'pgnotify_status' THEN
        RETURN;  -- a status webhook's own delivery: never announced by another (no loop)
    END IF;
    FOR hook IN
        SELECT w.id, w.url FROM pgnotify.status_webhooks w
        WHERE w.enabled AND (w.category IS NULL OR w.category = p_category)
          AND p_event = ANY (w.events)
    LOOP
        refusal := pgnotify.webhook_host_refusal(hook.url);
        IF refusal IS NOT NULL THEN  -- the hook's id, not its URL (which may carry a token)
            RAISE WARNING 'pgnotify: status webhook % skipped: %', hook.id, refusal;
            CONTINUE;
        END IF;
        data := json_build_object(
            'id', p_id, 'event', p_event, 'status', p_status, 'channel', p_channel,
            'category', left(p_category, 100), 'user_id', left(p_user, 256))::text;
        INSERT INTO pgnotify.notifications (channel, recipient, category, body, payload)
        VALUES ('webhook', hook.url, 'pgnotify_status',
                format('{"type":"notification.%s","timestamp":%s,"data":{%s}', p_event,
                       to_json(now())::text, replace(substr(data, 2), '{', '\u007b')),
                jsonb_build_object('notification_id', p_id, 'event', p_event));
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION pgnotify.enqueue_status_webhooks IS
    'Enqueue one status event to the matching status webhooks (webhook channel, category '
    'pgnotify_status).';

-- The hot path (two status changes per delivery): the NOTIFY, and the webhook function only when
-- a status webhook is enabled at all (an index-only look at an empty or tiny table otherwise).
CREATE FUNCTION pgnotify.notification_status_changed() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    PERFORM pg_notify('pgnotify_status', json_build_object(
        'id', NEW.id, 'event', NEW.status, 'status', NEW.status, 'channel', NEW.channel,
        'category', left(NEW.category, 100), 'user_id', left(NEW.user_id, 256))::text);
    IF NEW.category IS DISTINCT FROM 'pgnotify_status'
            AND EXISTS (SELECT 1 FROM pgnotify.status_webhooks w WHERE w.enabled) THEN
        PERFORM pgnotify.enqueue_status_webhooks(NEW.id, NEW.status, NEW.status, NEW.channel,
                                                 NEW.category, NEW.user_id);
    END IF;
    RETURN NULL;
END
$fn$;
-- Only a real change fires (the WHEN clause costs nothing on lease renewals and the like).
CREATE TRIGGER notifications_status_changed
    AFTER UPDATE OF status ON pgnotify.notifications
    FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION pgnotify.notification_status_changed();

CREATE FUNCTION pgnotify.provider_report_recorded() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    n record;
BEGIN
    SELECT id, status, channel, category, user_id INTO n
    FROM pgnotify.notifications WHERE id = NEW.notification_id;
    IF FOUND THEN
        PERFORM pg_notify('pgnotify_status', json_build_object(
            'id', n.id, 'event', NEW.event, 'status', n.status, 'channel', n.channel,
            'category', left(n.category, 100), 'user_id', left(n.user_id, 256))::text);
        PERFORM pgnotify.enqueue_status_webhooks(n.id, NEW.event, n.status, n.channel, n.category,
                                                 n.user_id);
    END IF;
    RETURN NULL;
END
$fn$;
-- A provider report is the event with an external id (0002): everything else is skipped here.
CREATE TRIGGER events_provider_report
    AFTER INSERT ON pgnotify.events
    FOR EACH ROW WHEN (NEW.external_id IS NOT NULL)
    EXECUTE FUNCTION pgnotify.provider_report_recorded();

-------------------------------------------------------------------------------------------------
-- wait_for(): for scripts and tests. Never takes a row lock; each look is its own statement
-- (a new snapshot under READ COMMITTED), with a pause that doubles from 10 ms up to 1 s.
-------------------------------------------------------------------------------------------------
CREATE FUNCTION pgnotify.wait_for(notification_id bigint, timeout_seconds double precision DEFAULT 30)
RETURNS text
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    deadline timestamptz;
    seen text;
    pause double precision := 0.01;
BEGIN
    IF timeout_seconds IS NULL OR timeout_seconds < 0 OR timeout_seconds > 3600 THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
            MESSAGE = 'pgnotify: wait_for timeout_seconds must be between 0 and 3600';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION USING ERRCODE = 'invalid_transaction_state',
            MESSAGE = format('pgnotify: wait_for needs READ COMMITTED (this transaction is %s: '
                'its snapshot would never see the change)', current_setting('transaction_isolation'));
    END IF;
    deadline := clock_timestamp() + make_interval(secs => timeout_seconds);
    LOOP
        SELECT n.status INTO seen FROM pgnotify.notifications n WHERE n.id = wait_for.notification_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION USING ERRCODE = 'no_data_found',
                MESSAGE = format('pgnotify: no notification %s', notification_id);
        END IF;
        IF seen IN ('sent', 'failed', 'dead', 'cancelled', 'skipped', 'digested', 'expired')
                OR clock_timestamp() >= deadline THEN
            RETURN seen;
        END IF;
        PERFORM pg_sleep(least(pause, greatest(extract(epoch FROM deadline - clock_timestamp()), 0)));
        pause := least(pause * 2, 1.0);
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION pgnotify.wait_for IS
    'Wait (polling with back-off, no locks) until notification id is final, at most '
    'timeout_seconds; returns its status then (the current one at the timeout).';

-------------------------------------------------------------------------------------------------
-- Preferences: history and one writer for the preference centre and the preference API.
-------------------------------------------------------------------------------------------------
CREATE TABLE pgnotify.preference_history (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     text NOT NULL,
    field       text NOT NULL,   -- preference | timezone | quiet_hours | unsubscribed | consent
    channel     text,
    category    text,
    old_value   text,
    new_value   text,
    source      text NOT NULL,
    changed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX preference_history_user_idx ON pgnotify.preference_history (user_id, changed_at);
COMMENT ON TABLE pgnotify.preference_history IS
    'Every change save_preferences() made: what, from what to what, and where it was made.';

-- p_changes: {"preferences": {"<category>": {"<channel>": "immediate|daily|weekly|off"}},
--             "timezone": "Europe/Paris", "quiet_hours": {"start": "22:00", "end": "07:00"} | null,
--             "unsubscribed": true | false}; every key optional. Returns the number of changes.
CREATE FUNCTION pgnotify.save_preferences(p_user text, p_changes jsonb, p_source text)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp AS $fn$
DECLARE
    cat record;
    cell record;
    cur pgnotify.contacts;
    had text;
    changes integer := 0;
    new_start time;
    new_end time;
    new_unsub timestamptz;
BEGIN
    IF p_user IS NULL OR btrim(p_user) = '' OR length(p_user) > 256 THEN
        PERFORM pgnotify.reject_in('preferences', 'user_id', 'a preference needs a user_id');
    END IF;
    IF p_source IS NULL OR btrim(p_source) = '' THEN
        PERFORM pgnotify.reject_in('preferences', 'source', 'a preference change needs a source');
    END IF;
    IF jsonb_typeof(p_changes) IS DISTINCT FROM 'object' THEN
        PERFORM pgnotify.reject_in('preferences', 'preferences', 'the changes must be a JSON object');
    END IF;
    IF p_changes ? 'preferences' AND jsonb_typeof(p_changes -> 'preferences') <> 'object' THEN
        PERFORM pgnotify.reject_in('preferences', 'preferences',
            'preferences must be an object of categories, each an object of channel: setting');
    END IF;
    FOR cat IN SELECT key, value FROM jsonb_each(coalesce(p_changes -> 'preferences', '{}')) LOOP
        IF NOT EXISTS (SELECT 1 FROM pgnotify.categories c WHERE c.name = cat.key)
                OR cat.key = 'pgnotify_status' THEN
            PERFORM pgnotify.reject_in('preferences', 'category',
                format('unknown category %L', left(cat.key, 100)));
        END IF;
        IF jsonb_typeof(cat.value) <> 'object' THEN
            PERFORM pgnotify.reject_in('preferences', 'channel',
                format('preferences.%s must be an object of channel: setting', left(cat.key, 100)));
        END IF;
        FOR cell IN SELECT key, value FROM jsonb_each(cat.value) LOOP
            IF cell.key NOT IN ('email', 'sms', 'push', 'webhook', 'inapp') THEN
                PERFORM pgnotify.reject_in('preferences', 'channel', format(
                    'unknown channel %L in preferences.%s: use email, sms, push, webhook or inapp',
                    left(cell.key, 40), left(cat.key, 100)));
            END IF;
            IF jsonb_typeof(cell.value) <> 'string'
                    OR cell.value #>> '{}' NOT IN ('immediate', 'daily', 'weekly', 'off') THEN
                PERFORM pgnotify.reject_in('preferences', 'setting', format(
                    'preferences.%s.%s must be immediate, daily, weekly or off',
                    left(cat.key, 100), cell.key));
            END IF;
            IF (SELECT c.critical FROM pgnotify.categories c WHERE c.name = cat.key) THEN
                IF cell.value #>> '{}' <> 'immediate' THEN
                    PERFORM pgnotify.reject_in('preferences', 'category', format(
                        'category %s is critical: it is always sent at once and cannot be '
                        'turned off or delayed', cat.key));
                END IF;
                CONTINUE;  -- nothing to store: critical categories ignore preferences
            END IF;
            had := pgnotify.preference_of(p_user, cell.key, cat.key);
            IF (SELECT c.requires_consent FROM pgnotify.categories c WHERE c.name = cat.key)
                    AND cell.value #>> '{}' <> 'off'
                    AND NOT coalesce((SELECT s.granted FROM pgnotify.consents s
                                      WHERE s.user_id = p_user AND s.category = cat.key), false) THEN
                PERFORM pgnotify.record_consent(p_user, cat.key, true, p_source);
                INSERT INTO pgnotify.preference_history (user_id, field, category, old_value,
                                                         new_value, source)
                VALUES (p_user, 'consent', cat.key, 'not granted', 'granted', p_source);
                changes := changes + 1;
            END IF;
            IF had IS DISTINCT FROM cell.value #>> '{}' THEN
                INSERT INTO pgnotify.preferences (user_id, channel, category, setting, source)
                VALUES (p_user, cell.key, cat.key, cell.value #>> '{}', p_source)
                ON CONFLICT (user_id, channel, category) DO UPDATE
                    SET setting = EXCLUDED.setting, source = EXCLUDED.source, updated_at = now();
                INSERT INTO pgnotify.preference_history (user_id, field, channel, category,
                                                         old_value, new_value, source)
                VALUES (p_user, 'preference', cell.key, cat.key, had, cell.value #>> '{}', p_source);
                changes := changes + 1;
            END IF;
        END LOOP;
    END LOOP;

    IF NOT (p_changes ?| ARRAY['timezone', 'quiet_hours', 'unsubscribed']) THEN
        RETURN changes;
    END IF;
    SELECT * INTO cur FROM pgnotify.contacts c WHERE c.user_id = p_user FOR UPDATE;
    IF NOT FOUND THEN  -- a contact row is made only when something changes
        cur.user_id := p_user;
        cur.timezone := 'UTC';
    END IF;
    IF p_changes ? 'timezone' THEN
        IF jsonb_typeof(p_changes -> 'timezone') <> 'string' THEN
            PERFORM pgnotify.reject_in('contacts', 'timezone',
                'timezone must be an IANA name such as Europe/Paris');
        END IF;
        IF cur.timezone IS DISTINCT FROM p_changes ->> 'timezone' THEN
            INSERT INTO pgnotify.contacts (user_id, timezone) VALUES (p_user, p_changes ->> 'timezone')
            ON CONFLICT (user_id) DO UPDATE SET timezone = EXCLUDED.timezone;
            INSERT INTO pgnotify.preference_history (user_id, field, old_value, new_value, source)
            VALUES (p_user, 'timezone', cur.timezone, p_changes ->> 'timezone', p_source);
            changes := changes + 1;
        END IF;
    END IF;
    IF p_changes ? 'quiet_hours' THEN
        IF jsonb_typeof(p_changes -> 'quiet_hours') = 'null' THEN
            new_start := NULL;
            new_end := NULL;
        ELSIF jsonb_typeof(p_changes -> 'quiet_hours') <> 'object'
                OR jsonb_typeof(p_changes -> 'quiet_hours' -> 'start') IS DISTINCT FROM 'string'
                OR jsonb_typeof(p_changes -> 'quiet_hours' -> 'end') IS DISTINCT FROM 'string'
                OR (p_changes #>> '{quiet_hours,start}') !~ '^([01][0-9]|2[0-3]):[0-5][0-9]$'
                OR (p_changes #>> '{quiet_hours,end}') !~ '^([01][0-9]|2[0-3]):[0-5][0-9]$' THEN
            PERFORM pgnotify.reject_in('contacts', 'quiet_hours',
                'quiet_hours must be null or {"start": "HH:MM", "end": "HH:MM"} (local times)',
                'the window may wrap midnight, like 22:00 to 07:00');
        ELSE
            new_start := (p_changes #>> '{quiet_hours,start}')::time;
            new_end := (p_changes #>> '{quiet_hours,end}')::time;
        END IF;
        IF cur.quiet_start IS DISTINCT FROM new_start OR cur.quiet_end IS DISTINCT FROM new_end THEN
            INSERT INTO pgnotify.contacts (user_id, quiet_start, quiet_end)
            VALUES (p_user, new_start, new_end)
            ON CONFLICT (user_id) DO UPDATE
                SET quiet_start = EXCLUDED.quiet_start, quiet_end = EXCLUDED.quiet_end;
            INSERT INTO pgnotify.preference_history (user_id, field, old_value, new_value, source)
            VALUES (p_user, 'quiet_hours',
                    CASE WHEN cur.quiet_start IS NOT NULL
                         THEN to_char(cur.quiet_start, 'HH24:MI') || '-' || to_char(cur.quiet_end, 'HH24:MI') END,
                    CASE WHEN new_start IS NOT NULL
                         THEN to_char(new_start, 'HH24:MI') || '-' || to_char(new_end, 'HH24:MI') END,
                    p_source);
            changes := changes + 1;
        END IF;
    END IF;
    IF p_changes ? 'unsubscribed' THEN
        IF jsonb_typeof(p_changes -> 'unsubscribed') <> 'boolean' THEN
            PERFORM pgnotify.reject_in('contacts', 'unsubscribed', 'unsubscribed must be true or false');
        END IF;
        IF (cur.unsubscribed_at IS NOT NULL) <> (p_changes -> 'unsubscribed')::boolean THEN
            new_unsub := CASE WHEN (p_changes -> 'unsubscribed')::boolean THEN now() END;
            INSERT INTO pgnotify.contacts (user_id, unsubscribed_at) VALUES (p_user, new_unsub)
            ON CONFLICT (user_id) DO UPDATE SET unsubscribed_at = EXCLUDED.unsubscribed_at;
            INSERT INTO pgnotify.preference_history (user_id, field, old_value, new_value, source)
            VALUES (p_user, 'unsubscribed', (cur.unsubscribed_at IS NOT NULL)::text,
                    (new_unsub IS NOT NULL)::text, p_source);
            changes := changes + 1;
        END IF;
    END IF;
    RETURN changes;
END
$fn$;
COMMENT ON FUNCTION pgnotify.save_preferences IS
    'Apply a user''s preference changes (preferences, timezone, quiet_hours, unsubscribed) from '
    'one source, refusing critical opt-outs, and record each change in preference_history.';

PERFORM pgnotify.apply_grants();
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_worker') THEN
    GRANT EXECUTE ON FUNCTION pgnotify.save_preferences(text, jsonb, text),
        pgnotify.wait_for(bigint, double precision),
        pgnotify.enqueue_status_webhooks(bigint, text, text, text, text, text)
        TO pgnotify_worker;
    -- the status trigger looks whether any status webhook is enabled before calling it
    GRANT SELECT ON pgnotify.status_webhooks TO pgnotify_worker;
END IF;
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_producer') THEN
    -- (cancel() changes a status as its owner: the producer needs nothing for the trigger)
    GRANT EXECUTE ON FUNCTION pgnotify.save_preferences(text, jsonb, text) TO pgnotify_producer;
END IF;
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_admin') THEN
    GRANT SELECT, INSERT, UPDATE, DELETE ON pgnotify.status_webhooks TO pgnotify_admin;
    GRANT SELECT ON pgnotify.preference_history TO pgnotify_admin;
END IF;

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (18, 'status_and_preferences');
END
$migration$;
COMMIT;
