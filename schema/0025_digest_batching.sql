-- pgnotify-worker migration 0025: the daily/weekly digest as a batching window, and batching per
-- workflow send step (issue 15).
--   Digests: a row held for a daily or weekly digest joins a pgnotify.batches window (reason
--     'digest', one open per channel, recipient and kind) whose close is the recipient's next
--     local digest moment (pgnotify.digest_schedule: the local hour, and the weekday of the weekly
--     one, in contacts.timezone; DST-correct). The window's notification (the digest, digest_of =
--     the kind) is scheduled for that moment and closed by close_batch() like every window: its
--     payload gets the items (with `line`), the items become digested. build_digests() no longer
--     builds anything: it keeps digest_schedule in line with the worker's settings, gathers held
--     rows that have no window (those held before this migration), and closes the windows due by
--     `at`. The rows held before this migration are gathered here, at once.
--   Workflow steps: a send step may carry batch {key, window, items}: the sends of that step for
--     one user and key within the window fold into one notification with items
--     (pgnotify.workflow_fold(), reason 'workflow').
-- Idempotent: does nothing when version 25 is recorded.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 25) THEN
    RAISE NOTICE 'pgnotify migration 25 (digest batching) is already applied';
    RETURN;
END IF;

-------------------------------------------------------------------------------------------------
-- 1. Windows of every origin
-------------------------------------------------------------------------------------------------
ALTER TABLE pgnotify.batches
    ADD COLUMN max_items integer,   -- items carried in the payload (NULL: the category's)
    ADD COLUMN shown_key text,      -- the key the template sees as batch_key (workflow windows)
    DROP CONSTRAINT batches_reason_known,
    ADD CONSTRAINT batches_reason_known
        CHECK (reason IN ('batch', 'throttle', 'digest', 'workflow')),
    ADD CONSTRAINT batches_max_items_range CHECK (max_items BETWEEN 1 AND 100);
COMMENT ON COLUMN pgnotify.batches.reason IS
    'batch (a producer''s batch_key), throttle (sends over a throttle folded), digest (rows held '
    'for the daily/weekly digest; batch_key is the kind), workflow (a workflow send step''s batch)';

-- The local moment digests go out at, per kind (kept in line with PGNOTIFY_DIGEST_HOUR and
-- PGNOTIFY_DIGEST_WEEKDAY by the digest jobs, which call build_digests with them).
CREATE TABLE pgnotify.digest_schedule (
    kind       text PRIMARY KEY,
    local_hour integer NOT NULL DEFAULT 8,
    weekday    integer NOT NULL DEFAULT 1,
    CONSTRAINT digest_schedule_kind_known CHECK (kind IN ('daily', 'weekly')),
    CONSTRAINT digest_schedule_hour_range CHECK (local_hour BETWEEN 0 AND 23),
    CONSTRAINT digest_schedule_weekday_range CHECK (weekday BETWEEN 1 AND 7)
);
INSERT INTO pgnotify.digest_schedule (kind) VALUES ('daily'), ('weekly') ON CONFLICT DO NOTHING;
COMMENT ON TABLE pgnotify.digest_schedule IS
    'When digests close, on the recipient''s clock: local_hour (0-23), and for weekly the ISO '
    'weekday (1 = Monday). The digest jobs set it from the worker''s settings.';

-- digest_closes_at(): the first local digest moment strictly after `after` in zone `tz`
-- (local_hour every day, or on the ISO weekday for weekly). Computed per local date, so a DST
-- change keeps the wall-clock hour (08:00 stays 08:00); an unknown zone counts as UTC.
CREATE FUNCTION pgnotify.digest_closes_at(kind text, tz text, after timestamptz, local_hour integer,
                                          weekday integer)
RETURNS timestamptz
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    zone text := coalesce(tz, 'UTC');
    found timestamptz;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgnotify.timezone_names z WHERE z.name = zone)
            AND NOT EXISTS (SELECT 1 FROM pg_timezone_names z WHERE z.name = zone) THEN
        zone := 'UTC';
    END IF;
    SELECT (d + make_interval(hours => local_hour)) AT TIME ZONE zone INTO found
    FROM generate_series(date_trunc('day', after AT TIME ZONE zone) - interval '1 day',
                         date_trunc('day', after AT TIME ZONE zone) + interval '8 days',
                         interval '1 day') d
    WHERE (d + make_interval(hours => local_hour)) AT TIME ZONE zone > after
      AND (kind = 'daily' OR extract(isodow FROM d) = weekday)
    ORDER BY d LIMIT 1;
    RETURN found;
END
$fn$;
COMMENT ON FUNCTION pgnotify.digest_closes_at IS
    'The first local digest moment (local_hour; weekly: on the ISO weekday) after `after` in '
    'time zone tz, DST-correct.';

-- join_batch(): put row `item` into the open window of its key (opening one, with its
-- notification scheduled for `closes`, when there is none). The upsert locks the window row until
-- the caller's transaction ends, so the window's notification cannot close it meanwhile.
-- From 0019, with the window's item count and shown key, and a digest's own notification: the
-- 'digest' category, digest_of = the kind, the recipient's locale, scheduled no earlier than now
-- (a window whose moment has passed, for rows held long ago, closes at once).
DROP FUNCTION pgnotify.join_batch(pgnotify.notifications, text, text, timestamptz);
CREATE FUNCTION pgnotify.join_batch(item pgnotify.notifications, p_key text, p_reason text,
                                    closes timestamptz, p_items integer DEFAULT NULL,
                                    p_shown text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    b_id bigint;
    opened boolean;
    sender bigint;
    ttl interval;
    tpl boolean;
BEGIN
    INSERT INTO pgnotify.batches AS b (channel, recipient, user_id, category, batch_key, reason,
                                       closes_at, max_items, shown_key)
    VALUES (item.channel, item.recipient, item.user_id,
            CASE WHEN p_reason = 'digest' THEN 'digest' ELSE coalesce(item.category, '') END,
            p_key, p_reason, closes, p_items, p_shown)
    ON CONFLICT (channel, recipient, category, batch_key) WHERE closed_at IS NULL
    DO UPDATE SET items = b.items + 1
    RETURNING b.id, (b.xmax = 0) INTO b_id, opened;
    IF opened AND p_reason = 'digest' THEN
        tpl := EXISTS (SELECT 1 FROM pgnotify.templates t
                       WHERE t.key = 'digest' AND t.channel = item.channel);
        SELECT c.ttl INTO ttl FROM pgnotify.categories c WHERE c.name = 'digest';
        INSERT INTO pgnotify.notifications (channel, recipient, user_id, category, template,
            subject, body, locale, payload, run_at, expires_at, digest_of, batch_of)
        VALUES (item.channel, item.recipient, item.user_id, 'digest',
            CASE WHEN tpl THEN 'digest' END,
            CASE WHEN NOT tpl THEN 'Your {{ items | length }} updates' END,
            CASE WHEN NOT tpl THEN E'{% for item in items %}- {{ item.line }}\n{% endfor %}' END,
            (SELECT c.locale FROM pgnotify.contacts c WHERE c.user_id = item.user_id),
            jsonb_build_object('kind', p_key, 'items', '[]'::jsonb),
            greatest(closes, now() + interval '1 millisecond'),
            greatest(closes, now()) + ttl, p_key, b_id)
        RETURNING id INTO sender;
        UPDATE pgnotify.batches SET notification_id = sender WHERE id = b_id;
    ELSIF opened THEN
        SELECT c.ttl INTO ttl FROM pgnotify.categories c WHERE c.name = item.category;
        INSERT INTO pgnotify.notifications (channel, recipient, user_id, category, template,
            subject, body, html_body, locale, payload, priority, max_attempts, run_at, expires_at,
            group_id, traceparent, batch_of)
        VALUES (item.channel, item.recipient, item.user_id, item.category, item.template,
            item.subject, item.body, item.html_body, item.locale, item.payload, item.priority,
            item.max_attempts, closes, closes + ttl, item.group_id, item.traceparent, b_id)
        RETURNING id INTO sender;
        UPDATE pgnotify.batches SET notification_id = sender WHERE id = b_id;
    END IF;
    INSERT INTO pgnotify.events (notification_id, event, detail)
    SELECT item.id, 'batched', jsonb_build_object('batch_id', b.id, 'closes_at', b.closes_at)
    FROM pgnotify.batches b WHERE b.id = b_id;
    RETURN b_id;
END
$fn$;

-------------------------------------------------------------------------------------------------
-- 2. The digest as a window
-------------------------------------------------------------------------------------------------
-- digest_window_close(): when the held row's digest window of `kind` for this user closes.
CREATE FUNCTION pgnotify.digest_window_close(item pgnotify.notifications)
RETURNS timestamptz
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT pgnotify.digest_closes_at(item.hold,
               (SELECT c.timezone FROM pgnotify.contacts c WHERE c.user_id = item.user_id),
               coalesce(item.held_at, now()), s.local_hour, s.weekday)
    FROM pgnotify.digest_schedule s WHERE s.kind = item.hold;
$fn$;

-- digest_hold(): a row the worker holds for the daily/weekly digest joins that digest's window.
CREATE FUNCTION pgnotify.digest_hold() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    NEW.held_at := coalesce(NEW.held_at, now());
    NEW.batch_id := pgnotify.join_batch(NEW, NEW.hold, 'digest',
                                        pgnotify.digest_window_close(NEW));
    RETURN NEW;
END
$fn$;
CREATE TRIGGER notifications_window_digest BEFORE UPDATE OF status ON pgnotify.notifications
    FOR EACH ROW WHEN (NEW.status = 'held' AND NEW.hold IN ('daily', 'weekly')
                       AND NEW.batch_id IS NULL)
    EXECUTE FUNCTION pgnotify.digest_hold();

-- digest_items(): the items of a digest window, oldest first, as the digest has always carried
-- them (0011): id, category, subject, template, payload, created_at and `line` -- the item's
-- subject, else the first line of its body (inline, else its template's), with {{ variable }}
-- filled from its payload and other markup left out.
CREATE FUNCTION pgnotify.digest_items(p_batch bigint) RETURNS jsonb
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    item record;
    line text;
    var text;
    items jsonb := '[]'::jsonb;
BEGIN
    FOR item IN
        SELECT n.id, n.category, n.subject, n.template, n.payload, n.created_at,
               coalesce(nullif(btrim(coalesce(n.subject, t.subject)), ''),
                        substring(coalesce(n.body, t.body) FROM '[^\s][^\n]*')) AS source
        FROM pgnotify.notifications n
        LEFT JOIN LATERAL (
            SELECT t.subject, t.body FROM pgnotify.templates t
            WHERE t.key = n.template AND t.channel = n.channel
              AND t.locale IN (coalesce(n.locale, ''), split_part(coalesce(n.locale, ''), '-', 1), '')
            ORDER BY t.locale = coalesce(n.locale, '') DESC, t.locale = '' ASC, t.version DESC
            LIMIT 1
        ) t ON n.subject IS NULL OR n.body IS NULL
        WHERE n.batch_id = p_batch AND n.status = 'held'
        ORDER BY n.created_at, n.id
    LOOP
        line := item.source;
        IF line IS NOT NULL THEN
            FOR var IN
                SELECT DISTINCT m[1]
                FROM regexp_matches(line, '\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}', 'g') AS m
            LOOP
                IF jsonb_typeof(item.payload -> var) IN ('string', 'number', 'boolean') THEN
                    line := regexp_replace(line, '\{\{\s*' || var || '\s*\}\}',
                                           replace(item.payload ->> var, '\', '\\'), 'g');
                END IF;
            END LOOP;
            line := regexp_replace(line, '\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}', '', 'g');
            line := nullif(left(btrim(regexp_replace(line, '\s+', ' ', 'g')), 200), '');
        END IF;
        items := items || jsonb_build_object(
            'id', item.id, 'category', item.category, 'subject', item.subject,
            'template', item.template, 'payload', item.payload, 'created_at', item.created_at,
            'line', coalesce(line, item.category, item.template, 'update'));
    END LOOP;
    RETURN items;
END
$fn$;

-- close_batch(): from 0019. When a window's notification is promoted (its closes_at has come),
-- the window closes and the notification's payload gets its items; a producer still adding to
-- the window holds its row: the notification waits a second instead. A window's notification
-- cancelled before it is due cancels the window and its items. Now for every kind of window:
--   batch, throttle, workflow: the first item's payload plus count, items (the first max_items,
--     else the category's batch_items: id, created_at, payload), more, batch_key;
--   digest: kind, items (all of them, with line, as build_digests made them) and count; the
--     `digest` template when one exists for the channel now, else the default subject and body.
CREATE OR REPLACE FUNCTION pgnotify.close_batch() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    b pgnotify.batches;
    shown integer;
    total integer;
    items jsonb;
    first_payload jsonb;
    tpl boolean;
BEGIN
    IF NEW.status <> 'queued' THEN
        UPDATE pgnotify.batches SET closed_at = now()
        WHERE id = NEW.batch_of AND closed_at IS NULL;
        WITH gone AS (
            UPDATE pgnotify.notifications n SET status = 'cancelled', updated_at = now()
            WHERE n.batch_id = NEW.batch_of AND n.status = 'held'
            RETURNING n.id
        )
        INSERT INTO pgnotify.events (notification_id, event, detail)
        SELECT id, 'cancelled', jsonb_build_object('batch_notification', NEW.id) FROM gone;
        RETURN NEW;
    END IF;
    SELECT * INTO b FROM pgnotify.batches x
    WHERE x.id = NEW.batch_of AND x.closed_at IS NULL FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        IF EXISTS (SELECT 1 FROM pgnotify.batches x
                   WHERE x.id = NEW.batch_of AND x.closed_at IS NULL) THEN
            NEW.status := 'scheduled';  -- a producer is joining right now: next second
            NEW.run_at := now() + interval '1 second';
        END IF;
        RETURN NEW;
    END IF;
    UPDATE pgnotify.batches SET closed_at = now() WHERE id = b.id;
    IF b.reason = 'digest' THEN
        items := pgnotify.digest_items(b.id);
        total := jsonb_array_length(items);
    ELSE
        shown := coalesce(b.max_items, (SELECT c.batch_items FROM pgnotify.categories c
                                        WHERE c.name = b.category), 10);
        SELECT count(*),
               coalesce(jsonb_agg(jsonb_build_object('id', i.id, 'created_at', i.created_at,
                                                     'payload', i.payload)
                                  ORDER BY i.created_at, i.id) FILTER (WHERE i.k <= shown), '[]'),
               (array_agg(i.payload ORDER BY i.created_at, i.id))[1]
        INTO total, items, first_payload
        FROM (SELECT n.id, n.created_at, n.payload,
                     row_number() OVER (ORDER BY n.created_at, n.id) AS k
              FROM pgnotify.notifications n
              WHERE n.batch_id = b.id AND n.status = 'held') i;
    END IF;
    IF total = 0 THEN  -- every item was cancelled meanwhile
        NEW.status := 'cancelled';
        NEW.last_error := 'every item of the batch was cancelled';
        RETURN NEW;
    END IF;
    IF b.reason = 'digest' THEN
        tpl := EXISTS (SELECT 1 FROM pgnotify.templates t
                       WHERE t.key = 'digest' AND t.channel = NEW.channel);
        NEW.template := CASE WHEN tpl THEN 'digest' END;
        NEW.subject := CASE WHEN NOT tpl THEN 'Your {{ items | length }} updates' END;
        NEW.body := CASE WHEN NOT tpl THEN
            E'{% for item in items %}- {{ item.line }}\n{% endfor %}' END;
        NEW.locale := (SELECT c.locale FROM pgnotify.contacts c WHERE c.user_id = NEW.user_id);
        NEW.payload := jsonb_build_object('kind', b.batch_key, 'items', items, 'count', total);
    ELSE
        NEW.payload := coalesce(first_payload, '{}'::jsonb) || jsonb_build_object(
            'batch_key', CASE b.reason WHEN 'batch' THEN b.batch_key
                                       WHEN 'workflow' THEN b.shown_key END,
            'count', total, 'items', items, 'more', greatest(total - shown, 0));
    END IF;
    WITH gone AS (
        UPDATE pgnotify.notifications n
        SET status = 'digested', digest_id = NEW.id, updated_at = now()
        WHERE n.batch_id = b.id AND n.status = 'held'
        RETURNING n.id
    )
    INSERT INTO pgnotify.events (notification_id, event, detail)
    SELECT id, 'digested', jsonb_build_object('digest_id', NEW.id, 'batch_id', b.id) FROM gone;
    RETURN NEW;
END
$fn$;

-- gather_digest_rows(): held daily/weekly rows without a window join theirs (the rows held
-- before this migration; a row held by any path that skipped the trigger), oldest first, so a
-- window closes at the moment after its oldest item. Returns how many.
CREATE FUNCTION pgnotify.gather_digest_rows(p_kind text) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    gathered integer := 0;
    todo bigint;
BEGIN
    FOR todo IN
        SELECT x.id FROM pgnotify.notifications x
        WHERE x.status = 'held' AND x.hold = p_kind AND x.batch_id IS NULL
        ORDER BY x.held_at NULLS LAST, x.id
    LOOP
        UPDATE pgnotify.notifications n
        SET batch_id = pgnotify.join_batch(n, n.hold, 'digest', pgnotify.digest_window_close(n)),
            held_at = coalesce(n.held_at, now())
        WHERE n.id = todo AND n.status = 'held' AND n.batch_id IS NULL;
        gathered := gathered + 1;
    END LOOP;
    RETURN gathered;
END
$fn$;

-- build_digests(): once the builder of digests, now a thin caller of the windows. It
--   1. records local_hour/weekday (when given) as the kind's schedule, re-aiming the open
--      windows of that kind at the new moment (the digest jobs pass the worker's settings);
--   2. gathers held rows that have no window yet (gather_digest_rows);
--   3. closes the windows of that kind whose moment is not after `at` (the scheduler closes them
--      too, at their moment; an explicit `at` lets tests and operators close them now).
-- Returns the digests that closed with items (an empty or fully cancelled window counts 0).
CREATE OR REPLACE FUNCTION pgnotify.build_digests(kind text, at timestamptz DEFAULT now(),
                                       local_hour integer DEFAULT NULL,
                                       weekday integer DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_column
DECLARE
    was pgnotify.digest_schedule;
    made integer;
    ch text[];
BEGIN
    IF kind IS NULL OR kind NOT IN ('daily', 'weekly') THEN
        RAISE EXCEPTION 'pgnotify: digest kind must be daily or weekly, not %', kind;
    END IF;
    SELECT * INTO was FROM pgnotify.digest_schedule s WHERE s.kind = build_digests.kind;
    IF (local_hour IS NOT NULL AND local_hour IS DISTINCT FROM was.local_hour)
            OR (weekday IS NOT NULL AND weekday IS DISTINCT FROM was.weekday) THEN
        UPDATE pgnotify.digest_schedule s
        SET local_hour = coalesce(build_digests.local_hour, s.local_hour),
            weekday = coalesce(build_digests.weekday, s.weekday)
        WHERE s.kind = build_digests.kind;
        -- the open windows of this kind: at the new moment after their oldest item
        WITH aimed AS (
            UPDATE pgnotify.batches b
            SET closes_at = pgnotify.digest_window_close(first_item)
            FROM (SELECT DISTINCT ON (n.batch_id) n AS first_item, n.batch_id
                  FROM pgnotify.notifications n
                  JOIN pgnotify.batches w ON w.id = n.batch_id
                  WHERE w.reason = 'digest' AND w.batch_key = build_digests.kind
                    AND w.closed_at IS NULL AND n.status = 'held'
                  ORDER BY n.batch_id, n.held_at, n.id) f
            WHERE b.id = f.batch_id
            RETURNING b.notification_id, b.closes_at
        )
        UPDATE pgnotify.notifications n
        SET run_at = greatest(aimed.closes_at, now() + interval '1 millisecond'),
            updated_at = now()
        FROM aimed WHERE n.id = aimed.notification_id AND n.status = 'scheduled';
    END IF;
    PERFORM pgnotify.gather_digest_rows(build_digests.kind);
    WITH due AS (
        SELECT b.notification_id FROM pgnotify.batches b
        WHERE b.reason = 'digest' AND b.batch_key = build_digests.kind AND b.closed_at IS NULL
          AND b.closes_at <= build_digests.at
        ORDER BY b.closes_at
        FOR UPDATE SKIP LOCKED
    ), closed AS (
        UPDATE pgnotify.notifications n
        SET status = 'queued', run_at = least(n.run_at, now()), updated_at = now()
        FROM due WHERE n.id = due.notification_id AND n.status = 'scheduled'
        RETURNING n.channel, n.status
    )
    SELECT count(*) FILTER (WHERE status = 'queued'),
           array_agg(DISTINCT channel) FILTER (WHERE status = 'queued')
    INTO made, ch
    FROM closed;
    -- wake the channels that have a digest to send (as the scheduler's promote does)
    PERFORM pg_notify('pgnotify', c) FROM unnest(ch) AS c;
    RETURN made;
END
$fn$;
COMMENT ON FUNCTION pgnotify.build_digests IS
    'Digests are batching windows now: record the schedule (local_hour/weekday, when given), '
    'gather held rows without a window, close the windows of this kind due by `at`; returns the '
    'digests closed with items.';

-------------------------------------------------------------------------------------------------
-- 3. Batching per workflow send step
-------------------------------------------------------------------------------------------------
-- workflow_fold(): the just-made notification of a batched workflow send step joins its
-- window: one per channel, recipient, step scope and key (the scope names the workflow and the
-- step); the window closes `window_secs` after the first send. Returns the window's close.
-- A row already folded (the step repeated after a crash) is left as it is.
CREATE FUNCTION pgnotify.workflow_fold(p_id bigint, p_scope text, p_key text, window_secs float8,
                                       p_items integer)
RETURNS timestamptz
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    UPDATE pgnotify.notifications n
    SET status = 'held', hold = 'batch', held_at = now(), updated_at = now(),
        batch_id = pgnotify.join_batch(n, p_scope || ':' || coalesce(p_key, ''), 'workflow',
                                       now() + make_interval(secs => window_secs), p_items, p_key)
    WHERE n.id = p_id AND n.status = 'queued' AND n.batch_id IS NULL;
    RETURN (SELECT b.closes_at FROM pgnotify.notifications n
            JOIN pgnotify.batches b ON b.id = n.batch_id WHERE n.id = p_id);
END
$fn$;
COMMENT ON FUNCTION pgnotify.workflow_fold IS
    'Fold a workflow send step''s notification into the step''s batching window for its user '
    'and key; returns when the window closes.';

-- validate_workflow_step(): from 0017, with a send step's batch {key, window, items}.
CREATE OR REPLACE FUNCTION pgnotify.validate_workflow_step() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    allowed text[];
    extra text;
    who text := format('step %L of workflow %L', left(NEW.name, 63), left(NEW.workflow, 100));
    checks text[] := ARRAY['sent', 'delivered', 'read', 'seen', 'clicked', 'failed', 'bounced',
                           'skipped'];
    channels text[] := ARRAY['email', 'sms', 'push', 'webhook', 'inapp'];
    amount numeric;
    total numeric := 0;
    unit text;
    c jsonb;
    m text[];
BEGIN
    IF NEW.name IS NULL OR NEW.name !~ '^[A-Za-z0-9_-]{1,63}$' THEN
        PERFORM pgnotify.reject_in('workflow_steps', 'name', format(
            'step name %L in workflow %L must be 1 to 63 letters, digits, _ or -',
            left(NEW.name, 80), left(NEW.workflow, 100)));
    END IF;
    IF NEW.name IN ('stop', 'next') THEN
        PERFORM pgnotify.reject_in('workflow_steps', 'name', format(
            'step name %L is reserved (then/else use it): choose another name', NEW.name));
    END IF;
    allowed := CASE NEW.kind
        WHEN 'send' THEN ARRAY['subject', 'body', 'html_body', 'overrides', 'priority', 'category',
                               'cancel_if', 'batch']
        WHEN 'delay' THEN ARRAY['seconds', 'minutes', 'hours', 'days', 'until', 'cancel_if']
        WHEN 'condition' THEN ARRAY['step', 'is', 'preference', 'category', 'then', 'else',
                                    'cancel_if']
        WHEN 'stop' THEN ARRAY['reason']
    END;
    IF allowed IS NULL THEN
        PERFORM pgnotify.reject_in('workflow_steps', 'kind', format(
            'unknown step kind %L in %s', left(NEW.kind, 40), who),
            'one of send, delay, condition, stop');
    END IF;
    IF jsonb_typeof(NEW.settings) IS DISTINCT FROM 'object' THEN
        PERFORM pgnotify.reject_in('workflow_steps', 'settings',
            format('the settings of %s must be a JSON object', who));
    END IF;
    SELECT string_agg(quote_literal(k), ', ') INTO extra
    FROM jsonb_object_keys(NEW.settings) AS k WHERE k <> ALL (allowed);
    IF extra IS NOT NULL THEN
        PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
            '%s (%s) has no setting %s', who, NEW.kind, extra),
            format('a %s step takes: name, kind%s, %s', NEW.kind,
                CASE WHEN NEW.kind = 'send' THEN ', channel, template' ELSE '' END,
                array_to_string(allowed, ', ')));
    END IF;
    IF NEW.kind <> 'send' AND (NEW.channel IS NOT NULL OR NEW.template IS NOT NULL) THEN
        PERFORM pgnotify.reject_in('workflow_steps', 'channel', format(
            '%s is a %s step: only a send step has a channel and a template', who, NEW.kind));
    END IF;

    IF NEW.kind = 'send' THEN
        IF NEW.channel IS NULL THEN
            PERFORM pgnotify.reject_in('workflow_steps', 'channel',
                format('%s sends on no channel', who), 'channel: one of email, sms, push, webhook, inapp');
        END IF;
        IF NEW.channel <> ALL (channels) THEN
            PERFORM pgnotify.reject_in('workflow_steps', 'channel', format(
                'unknown channel %L in %s', left(NEW.channel, 40), who),
                'one of email, sms, push, webhook, inapp');
        END IF;
        IF NEW.template IS NULL AND NOT NEW.settings ? 'body' AND NOT NEW.settings ? 'html_body'
                AND NEW.channel NOT IN ('webhook', 'inapp') THEN
            PERFORM pgnotify.reject_in('workflow_steps', 'template', format(
                '%s has neither a template nor a body', who),
                'name a template (pgnotify.templates) or give subject and body');
        END IF;
        IF NEW.settings ? 'overrides' AND jsonb_typeof(NEW.settings -> 'overrides') <> 'object' THEN
            PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
                'overrides of %s must be a JSON object (merged over the run''s payload)', who));
        END IF;
        IF NEW.settings ? 'priority' AND (jsonb_typeof(NEW.settings -> 'priority') <> 'number'
                OR (NEW.settings ->> 'priority')::numeric NOT BETWEEN -32768 AND 32767
                OR (NEW.settings ->> 'priority')::numeric % 1 <> 0) THEN
            PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
                'priority of %s must be an integer from -32768 to 32767', who));
        END IF;
        FOREACH unit IN ARRAY ARRAY['subject', 'body', 'html_body', 'category'] LOOP
            IF NEW.settings ? unit AND jsonb_typeof(NEW.settings -> unit) <> 'string' THEN
                PERFORM pgnotify.reject_in('workflow_steps', 'settings',
                    format('%s of %s must be a string', unit, who));
            END IF;
        END LOOP;
        IF NEW.settings ? 'batch' THEN
            c := NEW.settings -> 'batch';
            IF jsonb_typeof(c) <> 'object' THEN
                PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
                    'batch of %s must be an object', who),
                    'e.g. {"key": "{{ payload.thread_id }}", "window": "15 minutes", "items": 10}');
            END IF;
            SELECT string_agg(quote_literal(k), ', ') INTO extra
            FROM jsonb_object_keys(c) AS k WHERE k NOT IN ('key', 'window', 'items');
            IF extra IS NOT NULL THEN
                PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
                    'batch of %s has no setting %s', who, extra), 'batch takes: key, window, items');
            END IF;
            m := regexp_match(CASE WHEN jsonb_typeof(c -> 'window') = 'string'
                                   THEN c ->> 'window' END,
                              '^\s*([0-9]{1,7})\s*(second|minute|hour|day)s?\s*$');
            amount := m[1]::numeric * CASE m[2] WHEN 'second' THEN 1 WHEN 'minute' THEN 60
                                                WHEN 'hour' THEN 3600 WHEN 'day' THEN 86400 END;
            IF amount IS NULL OR amount NOT BETWEEN 1 AND 7 * 86400 THEN
                PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
                    'window of the batch of %s must be a time from 1 second to 7 days, like '
                    '"15 minutes", not %s', who, coalesce(left(c ->> 'window', 40), 'missing')),
                    'a number and one of second(s), minute(s), hour(s), day(s)');
            END IF;
            IF c ? 'key' AND (jsonb_typeof(c -> 'key') <> 'string'
                    OR (c ->> 'key') !~ ('^\s*(\{\{\s*(payload\.)?[A-Za-z_][A-Za-z0-9_]*'
                                         '(\.[A-Za-z_][A-Za-z0-9_]*)*\s*\}\}|(payload\.)?'
                                         '[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)\s*$'))
                    THEN
                PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
                    'key of the batch of %s must name a payload field, not %s', who,
                    left(c ->> 'key', 60)),
                    'e.g. "{{ payload.thread_id }}" or "thread_id" (a dotted path into the payload)');
            END IF;
            IF c ? 'items' AND (jsonb_typeof(c -> 'items') <> 'number'
                    OR (c ->> 'items')::numeric NOT BETWEEN 1 AND 100
                    OR (c ->> 'items')::numeric % 1 <> 0) THEN
                PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
                    'items of the batch of %s must be an integer from 1 to 100', who));
            END IF;
        END IF;
    ELSIF NEW.kind = 'delay' THEN
        IF NEW.settings ? 'until' THEN
            IF NEW.settings ?| ARRAY['seconds', 'minutes', 'hours', 'days'] THEN
                PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
                    '%s has both until and a fixed interval: give one', who));
            END IF;
            IF coalesce(NEW.settings ->> 'until', '') !~ '^([01][0-9]|2[0-3]):[0-5][0-9]$' THEN
                PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
                    'until of %s must be a local time HH:MM (00:00 to 23:59), not %s', who,
                    left(NEW.settings ->> 'until', 40)),
                    'e.g. "09:00": the next 09:00 in the recipient''s time zone (contacts.timezone)');
            END IF;
        ELSE
            FOREACH unit IN ARRAY ARRAY['seconds', 'minutes', 'hours', 'days'] LOOP
                IF NEW.settings ? unit THEN
                    IF jsonb_typeof(NEW.settings -> unit) <> 'number' THEN
                        PERFORM pgnotify.reject_in('workflow_steps', 'settings',
                            format('%s of %s must be a number', unit, who));
                    END IF;
                    amount := (NEW.settings ->> unit)::numeric;
                    IF amount < 0 THEN
                        PERFORM pgnotify.reject_in('workflow_steps', 'settings',
                            format('%s of %s must not be negative', unit, who));
                    END IF;
                    total := total + amount * CASE unit WHEN 'seconds' THEN 1 WHEN 'minutes' THEN 60
                        WHEN 'hours' THEN 3600 ELSE 86400 END;
                END IF;
            END LOOP;
            IF total <= 0 OR total > 366 * 86400 THEN
                PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
                    '%s must wait more than 0 seconds and at most 366 days', who),
                    'seconds, minutes, hours and/or days (they add up), or until "HH:MM"');
            END IF;
        END IF;
    ELSIF NEW.kind = 'condition' THEN
        IF (NEW.settings ? 'step') = (NEW.settings ? 'preference') THEN
            PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
                '%s must test either an earlier step ("step") or a preference ("preference")', who));
        END IF;
        IF NEW.settings ? 'step' AND coalesce(NEW.settings ->> 'is', '') <> ALL (checks) THEN
            PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
                'unknown condition %L in %s', left(NEW.settings ->> 'is', 40), who),
                'is: one of ' || array_to_string(checks, ', '));
        END IF;
        IF NEW.settings ? 'preference' THEN
            IF coalesce(NEW.settings ->> 'preference', '') <> ALL (channels) THEN
                PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
                    'unknown channel %L in the preference condition of %s',
                    left(NEW.settings ->> 'preference', 40), who),
                    'one of email, sms, push, webhook, inapp');
            END IF;
            IF coalesce(NEW.settings ->> 'is', '') NOT IN ('on', 'off', 'immediate', 'daily', 'weekly') THEN
                PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
                    'unknown preference test %L in %s', left(NEW.settings ->> 'is', 40), who),
                    'is: on (anything but off), off, immediate, daily or weekly');
            END IF;
        END IF;
    END IF;
    IF NEW.settings ? 'cancel_if' THEN
        c := NEW.settings -> 'cancel_if';
        IF jsonb_typeof(c) <> 'object' OR NOT c ? 'step' OR NOT c ? 'is'
                OR (SELECT count(*) FROM jsonb_object_keys(c)) <> 2 THEN
            PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
                'cancel_if of %s must be {"step": <an earlier send step>, "is": <condition>}', who));
        END IF;
        IF coalesce(c ->> 'is', '') <> ALL (checks) THEN
            PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
                'unknown condition %L in cancel_if of %s', left(c ->> 'is', 40), who),
                'is: one of ' || array_to_string(checks, ', '));
        END IF;
    END IF;
    RETURN NEW;
END
$fn$;

-------------------------------------------------------------------------------------------------
-- 4. The rows held before this migration join their windows now (moments already passed close
--    at once: the scheduler sends them on its next poll).
-------------------------------------------------------------------------------------------------
PERFORM pgnotify.gather_digest_rows('daily');
PERFORM pgnotify.gather_digest_rows('weekly');

PERFORM pgnotify.apply_grants();
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_producer') THEN
    GRANT EXECUTE ON FUNCTION
        pgnotify.join_batch(pgnotify.notifications, text, text, timestamptz, integer, text)
        TO pgnotify_producer;
END IF;
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_worker') THEN
    GRANT SELECT ON pgnotify.digest_schedule TO pgnotify_worker;
    GRANT EXECUTE ON FUNCTION
        pgnotify.join_batch(pgnotify.notifications, text, text, timestamptz, integer, text),
        pgnotify.digest_hold(), pgnotify.digest_window_close(pgnotify.notifications),
        pgnotify.digest_closes_at(text, text, timestamptz, integer, integer),
        pgnotify.workflow_fold(bigint, text, text, float8, integer)
        TO pgnotify_worker;
END IF;
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_admin') THEN
    GRANT SELECT, UPDATE ON pgnotify.digest_schedule TO pgnotify_admin;
    GRANT EXECUTE ON FUNCTION
        pgnotify.digest_closes_at(text, text, timestamptz, integer, integer)
        TO pgnotify_admin;
END IF;

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (25, 'digest batching');
END
$migration$;
COMMIT;
