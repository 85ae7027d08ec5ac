-- pgnotify-worker migration 0003: recipients, categories, preferences, consent, lifecycle,
-- digests, notify_user(), periodic jobs, monitoring views.
-- Idempotent: does nothing when pgnotify.schema_migrations records version 3.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 3) THEN
    RAISE NOTICE 'pgnotify migration 3 (recipients) is already applied';
    RETURN;
END IF;

-------------------------------------------------------------------------------------------------
-- Statuses this migration adds: held (waiting for a digest), digested (went out in one),
-- expired (past expires_at: not sent). Add first: older workers never produce them.
-------------------------------------------------------------------------------------------------
ALTER TABLE pgnotify.notifications DROP CONSTRAINT notifications_status_is_known;
ALTER TABLE pgnotify.notifications ADD CONSTRAINT notifications_status_is_known CHECK (status IN
    ('scheduled', 'queued', 'processing', 'sent', 'failed', 'dead', 'cancelled', 'skipped',
     'held', 'digested', 'expired'));
ALTER TABLE pgnotify.notifications
    ADD COLUMN group_id   uuid,
    ADD COLUMN expires_at timestamptz,
    ADD COLUMN hold       text,          -- daily | weekly while held for a digest
    ADD COLUMN held_at    timestamptz,
    ADD COLUMN digest_id  bigint,        -- the digest this row went out in
    ADD COLUMN digest_of  text;          -- on a digest notification: daily | weekly
ALTER TABLE pgnotify.notifications ADD CONSTRAINT notifications_hold_is_known
    CHECK (hold IN ('daily', 'weekly') AND digest_of IS NULL OR hold IS NULL);
CREATE INDEX notifications_held_idx ON pgnotify.notifications (user_id, channel, hold, held_at)
    WHERE status = 'held';
CREATE INDEX notifications_group_idx ON pgnotify.notifications (group_id) WHERE group_id IS NOT NULL;
CREATE INDEX notifications_digest_idx ON pgnotify.notifications (digest_id) WHERE digest_id IS NOT NULL;
CREATE INDEX notifications_finished_idx ON pgnotify.notifications (updated_at)
    WHERE status IN ('sent', 'cancelled', 'skipped', 'digested', 'expired', 'failed', 'dead');
CREATE INDEX notifications_user_idx ON pgnotify.notifications (user_id) WHERE user_id IS NOT NULL;

-- cancel() also takes back a row held for a digest: it is left out of the digest.
CREATE OR REPLACE FUNCTION pgnotify.cancel(notification_id bigint) RETURNS boolean
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    done bigint;
BEGIN
    UPDATE pgnotify.notifications n SET status = 'cancelled', updated_at = now()
    WHERE n.id = cancel.notification_id AND n.status IN ('queued', 'scheduled', 'held')
    RETURNING n.id INTO done;
    IF done IS NULL THEN
        RETURN false;  -- unknown, already being sent, or already finished
    END IF;
    INSERT INTO pgnotify.events (notification_id, event, worker)
    VALUES (done, 'cancelled', session_user);
    RETURN true;
END
$fn$;

-------------------------------------------------------------------------------------------------
-- contacts: how to reach a user, and when not to.
-------------------------------------------------------------------------------------------------
CREATE TABLE pgnotify.contacts (
    user_id          text PRIMARY KEY,
    email            text,
    phone            text,
    locale           text,
    timezone         text NOT NULL DEFAULT 'UTC',
    webhook_url      text,
    quiet_start      time,
    quiet_end        time,
    unsubscribed_at  timestamptz,   -- global unsubscribe: nothing but critical categories
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT contacts_quiet_hours_pair CHECK ((quiet_start IS NULL) = (quiet_end IS NULL))
);
COMMENT ON TABLE pgnotify.contacts IS
    'Per user: addresses, locale, time zone, quiet hours (local, may wrap midnight), global unsubscribe.';

CREATE FUNCTION pgnotify.validate_contact() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    NEW.updated_at := now();
    IF NEW.email IS NOT NULL AND NEW.email !~
            '^[^[:space:]@"(),:;<>\[\\\]]+@[^[:space:]@"(),:;<>\[\\\].]+(\.[^[:space:]@"(),:;<>\[\\\].]+)+$' THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', COLUMN = 'email', TABLE = 'contacts',
            MESSAGE = 'pgnotify: contact email is not a valid email address';
    END IF;
    IF NEW.phone IS NOT NULL AND NEW.phone !~ '^\+?[0-9() .-]{4,32}$' THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', COLUMN = 'phone', TABLE = 'contacts',
            MESSAGE = 'pgnotify: contact phone is not a phone number';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_timezone_names WHERE name = NEW.timezone) THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', COLUMN = 'timezone', TABLE = 'contacts',
            MESSAGE = format('pgnotify: unknown time zone %L', left(NEW.timezone, 60)),
            HINT = 'an IANA name such as Europe/Paris or America/New_York';
    END IF;
    IF NEW.webhook_url IS NOT NULL AND NEW.webhook_url !~* '^https?://[^/?#[:space:]@]+' THEN
        RAISE EXCEPTION USING ERRCODE = 'check_violation', COLUMN = 'webhook_url', TABLE = 'contacts',
            MESSAGE = 'pgnotify: contact webhook_url is not an http(s) URL';
    END IF;
    RETURN NEW;
END
$fn$;
CREATE TRIGGER contacts_validate BEFORE INSERT OR UPDATE ON pgnotify.contacts
    FOR EACH ROW EXECUTE FUNCTION pgnotify.validate_contact();

-------------------------------------------------------------------------------------------------
-- categories: what a notification is about, and the rules that come with it.
-------------------------------------------------------------------------------------------------
CREATE TABLE pgnotify.categories (
    name                text PRIMARY KEY,
    description         text,
    critical            boolean NOT NULL DEFAULT false,  -- ignores digests, quiet hours, opt-outs
    requires_consent    boolean NOT NULL DEFAULT false,  -- sent only with a recorded opt-in
    default_preference  text NOT NULL DEFAULT 'immediate',
    channels            text[] NOT NULL DEFAULT '{email,sms,push,inapp}',  -- notify_user default
    ttl                 interval,                         -- default expires_at = created + ttl
    CONSTRAINT categories_default_is_known CHECK
        (default_preference IN ('immediate', 'daily', 'weekly', 'off')),
    CONSTRAINT categories_not_both CHECK (NOT (critical AND requires_consent)),
    CONSTRAINT categories_channels_known CHECK
        (channels <@ ARRAY['email', 'sms', 'push', 'webhook', 'inapp'])
);
COMMENT ON TABLE pgnotify.categories IS
    'Notification categories. critical: security and password resets; requires_consent: marketing.';
INSERT INTO pgnotify.categories (name, description, critical, channels) VALUES
    ('security', 'Sign-ins, password resets, codes', true, '{email,sms,push,inapp}'),
    ('system_alert', 'pgnotify operational alerts to admins', true, '{email,webhook}'),
    ('digest', 'Digests of held notifications', false, '{email,push,inapp}');
INSERT INTO pgnotify.categories (name, description, requires_consent, channels) VALUES
    ('marketing', 'Newsletters and offers', true, '{email}');
INSERT INTO pgnotify.categories (name, description, channels) VALUES
    ('chat', 'New messages in a room', '{inapp,push,email}');

-------------------------------------------------------------------------------------------------
-- preferences: per user x channel ('*' = any) x category ('*' = any); the most specific wins:
-- (channel, category) > (*, category) > (channel, *) > (*, *) > the category default.
-------------------------------------------------------------------------------------------------
CREATE TABLE pgnotify.preferences (
    user_id     text NOT NULL,
    channel     text NOT NULL DEFAULT '*',
    category    text NOT NULL DEFAULT '*',
    setting     text NOT NULL,
    source      text NOT NULL DEFAULT 'app',
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, channel, category),
    CONSTRAINT preferences_setting_is_known CHECK (setting IN ('immediate', 'daily', 'weekly', 'off')),
    CONSTRAINT preferences_channel_is_known CHECK
        (channel IN ('*', 'email', 'sms', 'push', 'webhook', 'inapp'))
);

CREATE FUNCTION pgnotify.preference_of(p_user text, p_channel text, p_category text)
RETURNS text LANGUAGE sql STABLE AS $fn$
    SELECT coalesce(
        (SELECT p.setting FROM pgnotify.preferences p
         WHERE p.user_id = p_user AND p.channel IN (p_channel, '*')
           AND p.category IN (coalesce(p_category, '*'), '*')
         ORDER BY (p.category <> '*') DESC, (p.channel <> '*') DESC
         LIMIT 1),
        (SELECT c.default_preference FROM pgnotify.categories c WHERE c.name = p_category),
        'immediate');
$fn$;
COMMENT ON FUNCTION pgnotify.preference_of IS
    'The setting that applies to a user, channel and category: immediate, daily, weekly or off.';

CREATE FUNCTION pgnotify.set_preference(p_user text, p_setting text, p_channel text DEFAULT '*',
                                        p_category text DEFAULT '*', p_source text DEFAULT 'app')
RETURNS void LANGUAGE sql AS $fn$
    INSERT INTO pgnotify.preferences (user_id, channel, category, setting, source)
    VALUES (p_user, p_channel, p_category, p_setting, p_source)
    ON CONFLICT (user_id, channel, category)
    DO UPDATE SET setting = EXCLUDED.setting, source = EXCLUDED.source, updated_at = now();
$fn$;

-------------------------------------------------------------------------------------------------
-- consents: opt-ins for categories that require them (marketing), with source and time.
-------------------------------------------------------------------------------------------------
CREATE TABLE pgnotify.consents (
    user_id      text NOT NULL,
    category     text NOT NULL REFERENCES pgnotify.categories (name),
    granted      boolean NOT NULL,
    source       text NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, category)
);
CREATE TABLE pgnotify.consent_history (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id      text NOT NULL,
    category     text NOT NULL,
    granted      boolean NOT NULL,
    source       text NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
CREATE FUNCTION pgnotify.record_consent(p_user text, p_category text, p_granted boolean,
                                        p_source text)
RETURNS void LANGUAGE sql AS $fn$
    INSERT INTO pgnotify.consents (user_id, category, granted, source)
    VALUES (p_user, p_category, p_granted, p_source)
    ON CONFLICT (user_id, category)
    DO UPDATE SET granted = EXCLUDED.granted, source = EXCLUDED.source, recorded_at = now();
    INSERT INTO pgnotify.consent_history (user_id, category, granted, source)
    VALUES (p_user, p_category, p_granted, p_source);
$fn$;
COMMENT ON FUNCTION pgnotify.record_consent IS
    'Record an opt-in (granted) or opt-out for a category; every change is kept in consent_history.';

-------------------------------------------------------------------------------------------------
-- Lifecycle: a category's ttl gives new rows their expires_at.
-------------------------------------------------------------------------------------------------
CREATE FUNCTION pgnotify.default_expiry() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    SELECT now() + c.ttl INTO NEW.expires_at FROM pgnotify.categories c
    WHERE c.name = NEW.category AND c.ttl IS NOT NULL;
    RETURN NEW;
END
$fn$;
CREATE TRIGGER notifications_expiry BEFORE INSERT ON pgnotify.notifications
    FOR EACH ROW WHEN (NEW.category IS NOT NULL AND NEW.expires_at IS NULL)
    EXECUTE FUNCTION pgnotify.default_expiry();

-- address_of(): how a user is reached on a channel (NULL: not at all). The one place that says it.
CREATE FUNCTION pgnotify.address_of(p_user text, p_channel text) RETURNS text
LANGUAGE sql STABLE AS $fn$
    SELECT CASE p_channel
        WHEN 'email' THEN (SELECT c.email FROM pgnotify.contacts c WHERE c.user_id = p_user)
        WHEN 'sms' THEN (SELECT c.phone FROM pgnotify.contacts c WHERE c.user_id = p_user)
        WHEN 'webhook' THEN (SELECT c.webhook_url FROM pgnotify.contacts c WHERE c.user_id = p_user)
        WHEN 'inapp' THEN p_user
        WHEN 'push' THEN CASE WHEN EXISTS (
                SELECT 1 FROM pgnotify.devices d WHERE d.user_id = p_user AND d.active)
            THEN 'user:' || p_user END
    END;
$fn$;
COMMENT ON FUNCTION pgnotify.address_of IS
    'The recipient a user has on a channel: email, phone, webhook URL, their id (in-app), or '
    'user:<id> when they have an active push device; NULL when they cannot be reached there.';

-------------------------------------------------------------------------------------------------
-- notify_user(): one notification per channel the user can be reached on and has not turned
-- off, sharing a group id; nothing for channels without an address or a template. One INSERT,
-- so one NOTIFY per channel however many channels.
-------------------------------------------------------------------------------------------------
CREATE FUNCTION pgnotify.notify_user(
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
    ids bigint[];
    group_uid uuid := gen_random_uuid();
BEGIN
    WITH wanted AS (
        SELECT unnest(coalesce(notify_user.channels,
               (SELECT c.channels FROM pgnotify.categories c WHERE c.name = notify_user.category),
               ARRAY['email', 'sms', 'push', 'inapp'])) AS channel
    ), reachable AS (
        SELECT w.channel, pgnotify.address_of(notify_user.user_id, w.channel) AS recipient,
               (SELECT ct.locale FROM pgnotify.contacts ct WHERE ct.user_id = notify_user.user_id)
                   AS locale
        FROM wanted w
    )
    , made AS (
        INSERT INTO pgnotify.notifications AS n (channel, recipient, user_id, category, template,
            payload, subject, body, locale, priority, run_at, expires_at, group_id, idempotency_key)
        SELECT r.channel, r.recipient, notify_user.user_id, notify_user.category,
               notify_user.template, notify_user.payload, notify_user.subject, notify_user.body,
               r.locale, notify_user.priority, notify_user.run_at, notify_user.expires_at,
               group_uid,
               CASE WHEN notify_user.idempotency_key IS NOT NULL
                    THEN notify_user.idempotency_key || ':' || r.channel END
        FROM reachable r
        WHERE r.recipient IS NOT NULL
          AND pgnotify.preference_of(notify_user.user_id, r.channel, notify_user.category) <> 'off'
          AND (notify_user.template IS NULL OR EXISTS (
                SELECT 1 FROM pgnotify.templates t
                WHERE t.key = notify_user.template AND t.channel = r.channel))
          AND (notify_user.template IS NOT NULL OR notify_user.body IS NOT NULL
               OR r.channel IN ('webhook', 'inapp'))
        ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING n.id
    )
    SELECT coalesce(array_agg(id ORDER BY id), '{}') INTO ids FROM made;
    RETURN ids;
END
$fn$;
COMMENT ON FUNCTION pgnotify.notify_user IS
    'Notify a user on every channel they can be reached on and have not turned off; returns the ids.';

-------------------------------------------------------------------------------------------------
-- Digests: held rows become one digest per user x channel at the user's local digest time.
-- `at` is the moment to build for (tests and backfills pass it; the job passes now()).
-------------------------------------------------------------------------------------------------
CREATE FUNCTION pgnotify.build_digests(kind text, at timestamptz DEFAULT now(),
                                       local_hour integer DEFAULT 8, weekday integer DEFAULT 1)
RETURNS integer
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    made integer := 0;
    grp record;
    new_digest bigint;
    tpl boolean;
BEGIN
    IF kind NOT IN ('daily', 'weekly') THEN
        RAISE EXCEPTION 'pgnotify: digest kind must be daily or weekly, not %', kind;
    END IF;
    FOR grp IN
        WITH users AS (
            SELECT DISTINCT n.user_id, n.channel, n.recipient, coalesce(c.timezone, 'UTC') AS tz,
                   c.locale
            FROM pgnotify.notifications n
            LEFT JOIN pgnotify.contacts c ON c.user_id = n.user_id
            WHERE n.status = 'held' AND n.hold = build_digests.kind
        ), cut AS (
            -- the latest local digest moment not after `at`, in the user's time zone
            SELECT u.*, (
                SELECT (d + make_interval(hours => local_hour)) AT TIME ZONE u.tz
                FROM generate_series(date_trunc('day', at AT TIME ZONE u.tz) - interval '7 days',
                                     date_trunc('day', at AT TIME ZONE u.tz), interval '1 day') d
                WHERE (d + make_interval(hours => local_hour)) AT TIME ZONE u.tz <= at
                  AND (build_digests.kind = 'daily' OR extract(isodow FROM d) = weekday)
                ORDER BY d DESC LIMIT 1) AS cutoff
            FROM users u
        )
        SELECT * FROM cut WHERE cutoff IS NOT NULL
    LOOP
        PERFORM 1 FROM pgnotify.notifications n
        WHERE n.status = 'held' AND n.hold = build_digests.kind AND n.user_id = grp.user_id
          AND n.channel = grp.channel AND n.held_at < grp.cutoff
        LIMIT 1;
        CONTINUE WHEN NOT FOUND;  -- nothing held before this period's cut: send nothing

        tpl := EXISTS (SELECT 1 FROM pgnotify.templates t
                       WHERE t.key = 'digest' AND t.channel = grp.channel);
        INSERT INTO pgnotify.notifications (channel, recipient, user_id, category, template,
            subject, body, locale, payload, digest_of)
        SELECT grp.channel, grp.recipient, grp.user_id, 'digest',
               CASE WHEN tpl THEN 'digest' END,
               CASE WHEN NOT tpl THEN 'Your {{ items | length }} updates' END,
               CASE WHEN NOT tpl THEN
                   E'{% for item in items %}- {{ item.subject or item.category or "update" }}\n{% endfor %}' END,
               grp.locale,
               jsonb_build_object('kind', build_digests.kind, 'items', jsonb_agg(
                   jsonb_build_object('id', n.id, 'category', n.category, 'subject', n.subject,
                                      'template', n.template, 'payload', n.payload,
                                      'created_at', n.created_at)
                   ORDER BY n.created_at, n.id)),
               build_digests.kind
        FROM pgnotify.notifications n
        WHERE n.status = 'held' AND n.hold = build_digests.kind AND n.user_id = grp.user_id
          AND n.channel = grp.channel AND n.held_at < grp.cutoff
        RETURNING id INTO new_digest;

        WITH items AS (
            UPDATE pgnotify.notifications n
            SET status = 'digested', digest_id = new_digest, updated_at = now()
            WHERE n.status = 'held' AND n.hold = build_digests.kind AND n.user_id = grp.user_id
              AND n.channel = grp.channel AND n.held_at < grp.cutoff
            RETURNING n.id
        )
        INSERT INTO pgnotify.events (notification_id, event, detail)
        SELECT id, 'digested', jsonb_build_object('digest_id', new_digest) FROM items;
        made := made + 1;
    END LOOP;
    RETURN made;
END
$fn$;
COMMENT ON FUNCTION pgnotify.build_digests IS
    'Turn held rows into one digest per user and channel once the user''s local digest time has passed.';

-------------------------------------------------------------------------------------------------
-- Periodic jobs: rows with a cron schedule; each due run is claimed by one replica.
-------------------------------------------------------------------------------------------------
CREATE TABLE pgnotify.jobs (
    name                  text PRIMARY KEY,
    schedule              text NOT NULL,            -- cron: minute hour day month weekday
    timezone              text NOT NULL DEFAULT 'UTC',
    command               text NOT NULL,            -- SQL: a statement, or CALL of a procedure
    enabled               boolean NOT NULL DEFAULT true,
    builtin               boolean NOT NULL DEFAULT false,
    timeout_seconds       integer NOT NULL DEFAULT 300,
    next_run_at           timestamptz,              -- NULL: the worker computes it
    last_started_at       timestamptz,
    last_finished_at      timestamptz,
    last_status           text,
    consecutive_failures  integer NOT NULL DEFAULT 0,
    created_at            timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT jobs_timeout_positive CHECK (timeout_seconds > 0)
);
COMMENT ON TABLE pgnotify.jobs IS
    'Periodic jobs. Add a row (schedule in cron syntax, command in SQL); one replica runs each due run.';
CREATE INDEX jobs_due_idx ON pgnotify.jobs (next_run_at) WHERE enabled;

CREATE TABLE pgnotify.job_runs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_name        text NOT NULL,
    scheduled_for   timestamptz,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    status          text NOT NULL DEFAULT 'running',
    rows_affected   bigint,
    error           text,
    worker          text,
    CONSTRAINT job_runs_status_is_known CHECK (status IN ('running', 'succeeded', 'failed'))
);
CREATE INDEX job_runs_job_idx ON pgnotify.job_runs (job_name, id DESC);

-- Retention: delete finished rows (and their events) in small batches, each its own transaction.
CREATE PROCEDURE pgnotify.apply_retention(keep interval DEFAULT '30 days',
                                          keep_dead interval DEFAULT '90 days',
                                          batch integer DEFAULT 5000)
LANGUAGE plpgsql AS $fn$
DECLARE
    removed integer;
BEGIN
    LOOP
        WITH doomed AS (
            SELECT id FROM pgnotify.notifications
            WHERE (status IN ('sent', 'cancelled', 'skipped', 'digested', 'expired')
                   AND updated_at < now() - keep)
               OR (status IN ('dead', 'failed') AND updated_at < now() - keep_dead)
            LIMIT batch
            FOR UPDATE SKIP LOCKED
        ), events_gone AS (
            DELETE FROM pgnotify.events e USING doomed WHERE e.notification_id = doomed.id
        ), inbox_gone AS (
            DELETE FROM pgnotify.inbox i USING doomed
            WHERE i.notification_id = doomed.id AND i.read_at IS NOT NULL
        )
        DELETE FROM pgnotify.notifications n USING doomed WHERE n.id = doomed.id;
        GET DIAGNOSTICS removed = ROW_COUNT;
        RAISE NOTICE 'pgnotify retention: % rows', removed;
        COMMIT;  -- each batch its own transaction: no long locks, vacuum keeps up
        EXIT WHEN removed < batch;
    END LOOP;
    DELETE FROM pgnotify.job_runs WHERE started_at < now() - keep_dead;
    COMMIT;
END
$fn$;

-- The lease reaper as SQL, for the job runner (workers also reap on their own timer).
CREATE FUNCTION pgnotify.requeue_expired_leases() RETURNS integer
LANGUAGE sql AS $fn$
    WITH expired AS (
        SELECT id FROM pgnotify.notifications
        WHERE status = 'processing' AND locked_until < now() - interval '1 minute'
        FOR UPDATE SKIP LOCKED
    ), requeued AS (
        UPDATE pgnotify.notifications n
        SET status = CASE WHEN n.attempts >= n.max_attempts THEN 'dead' ELSE 'queued' END,
            last_error = CASE WHEN n.attempts >= n.max_attempts
                THEN 'lease expired: the worker stopped responding' ELSE n.last_error END,
            locked_by = NULL, locked_until = NULL, updated_at = now()
        FROM expired WHERE n.id = expired.id
        RETURNING n.id, n.status, n.attempts
    ), logged AS (
        INSERT INTO pgnotify.events (notification_id, event, attempt, error_code)
        SELECT id, CASE WHEN status = 'dead' THEN 'dead' ELSE 'lease_expired' END, attempts,
               'lease_expired' FROM requeued
    )
    SELECT count(*)::integer FROM requeued;
$fn$;

-------------------------------------------------------------------------------------------------
-- Monitoring views.
-------------------------------------------------------------------------------------------------
CREATE MATERIALIZED VIEW pgnotify.notifications_dashboard AS
SELECT date_trunc('day', n.created_at)::date AS day,
       n.channel,
       count(*)                                              AS total,
       count(*) FILTER (WHERE n.status = 'sent')             AS sent,
       count(*) FILTER (WHERE n.status = 'failed')           AS failed,
       count(*) FILTER (WHERE n.status = 'dead')             AS dead,
       count(*) FILTER (WHERE n.status = 'skipped')          AS skipped,
       count(*) FILTER (WHERE n.status = 'cancelled')        AS cancelled,
       count(*) FILTER (WHERE n.status IN ('held', 'digested')) AS digested_or_held,
       count(*) FILTER (WHERE n.status = 'expired')          AS expired,
       count(*) FILTER (WHERE n.status IN ('queued', 'scheduled', 'processing')) AS pending,
       round(100.0 * count(*) FILTER (WHERE n.status = 'sent')
             / nullif(count(*) FILTER (WHERE n.status IN ('sent', 'failed', 'dead')), 0), 2)
                                                             AS success_rate,
       avg(extract(epoch FROM n.sent_at - n.created_at)) FILTER (WHERE n.status = 'sent')
                                                             AS avg_seconds_to_sent,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM n.sent_at - n.created_at))
           FILTER (WHERE n.status = 'sent')                  AS p95_seconds_to_sent
FROM pgnotify.notifications n
GROUP BY 1, 2;
CREATE UNIQUE INDEX notifications_dashboard_key ON pgnotify.notifications_dashboard (day, channel);
COMMENT ON MATERIALIZED VIEW pgnotify.notifications_dashboard IS
    'Per day and channel: totals per status, success rate, average and p95 time to sent. '
    'Refreshed by the refresh_dashboard job (REFRESH MATERIALIZED VIEW CONCURRENTLY).';

CREATE VIEW pgnotify.failed_report AS
SELECT n.id, n.channel, n.status, n.category, n.user_id, n.recipient, n.attempts,
       n.max_attempts, n.provider, n.last_error,
       (SELECT e.error_code FROM pgnotify.events e
        WHERE e.notification_id = n.id AND e.error_code IS NOT NULL
        ORDER BY e.id DESC LIMIT 1) AS error_code,
       n.created_at, n.updated_at AS failed_at
FROM pgnotify.notifications n
WHERE n.status IN ('failed', 'dead')
ORDER BY n.updated_at DESC;
COMMENT ON VIEW pgnotify.failed_report IS
    'Failed and dead notifications with their last error: the list to look at, replay with pgnotify.retry(id).';

-- queue_status gains the rows held for digests (a column at the end: old readers are fine).
CREATE OR REPLACE VIEW pgnotify.queue_status AS
SELECT c.channel,
       count(n.id) FILTER (WHERE n.status = 'queued')                         AS ready,
       count(n.id) FILTER (WHERE n.status = 'scheduled' AND n.attempts = 0)   AS scheduled,
       count(n.id) FILTER (WHERE n.status = 'processing')                     AS processing,
       count(n.id) FILTER (WHERE n.status = 'scheduled' AND n.attempts > 0)   AS retrying,
       count(n.id) FILTER (WHERE n.status = 'dead')                           AS dead,
       count(n.id) FILTER (WHERE n.status = 'failed')                         AS failed,
       coalesce(extract(epoch FROM now() - min(n.run_at) FILTER (WHERE n.status = 'queued')), 0)
           ::double precision                                                 AS oldest_ready_seconds,
       count(n.id) FILTER (WHERE n.status = 'held')                           AS held
FROM (VALUES ('email'), ('sms'), ('push'), ('webhook'), ('inapp')) AS c(channel)
LEFT JOIN pgnotify.notifications n
       ON n.channel = c.channel
      AND n.status IN ('queued', 'scheduled', 'processing', 'dead', 'failed', 'held')
GROUP BY c.channel
ORDER BY c.channel;

-- The built-in jobs (the worker fills in next_run_at).
INSERT INTO pgnotify.jobs (name, schedule, command, builtin) VALUES
    ('digest_daily', '*/5 * * * *', 'SELECT pgnotify.build_digests(''daily'')', true),
    ('digest_weekly', '*/15 * * * *', 'SELECT pgnotify.build_digests(''weekly'')', true),
    ('retention', '17 * * * *', 'CALL pgnotify.apply_retention()', true),
    ('reap_leases', '* * * * *', 'SELECT pgnotify.requeue_expired_leases()', true),
    ('refresh_dashboard', '*/5 * * * *',
     'REFRESH MATERIALIZED VIEW CONCURRENTLY pgnotify.notifications_dashboard', true);

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (3, 'recipients');
END
$migration$;
COMMIT;
