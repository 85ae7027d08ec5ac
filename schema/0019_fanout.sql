-- pgnotify-worker migration 0019: batching windows, throttles and topics (issue 15).
--   Batching: a category with a batch_window (pgnotify.set_batching) gathers the rows a producer
--     inserts with a batch_key: the first opens a window (a pgnotify.batches row, plus one
--     notification scheduled for the window's end), the rest join it (status held, hold batch);
--     when the window's notification comes due, its payload gets the items (count, first N) and
--     the items become digested. One open window per (channel, recipient, category, key): an
--     INSERT ... ON CONFLICT on a partial unique index, so concurrent producers share it.
--   Throttles: at most throttle_limit rows per recipient, category and channel in each
--     throttle_window (fixed windows from the Unix epoch, UTC), counted in throttle_counts by
--     take_throttle() at send time; the extra is dropped (skipped), delayed to the next window, or
--     folded into a batch that goes out when the next window opens (pgnotify.set_throttle).
--   Topics: pgnotify.topics and topic_subscriptions (create_topic, subscribe, unsubscribe);
--     notify_topic() fans a notification out to every subscriber in one INSERT ... SELECT.
-- Idempotent: does nothing when version 19 is recorded.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 19) THEN
    RAISE NOTICE 'pgnotify migration 19 (fanout) is already applied';
    RETURN;
END IF;

-------------------------------------------------------------------------------------------------
-- 1. Configuration per category
-------------------------------------------------------------------------------------------------
ALTER TABLE pgnotify.categories
    ADD COLUMN batch_window    interval,
    ADD COLUMN batch_items     integer NOT NULL DEFAULT 10,
    ADD COLUMN throttle_limit  integer,
    ADD COLUMN throttle_window interval,
    ADD COLUMN throttle_action text NOT NULL DEFAULT 'drop',
    ADD CONSTRAINT categories_batch_window_range CHECK
        (batch_window BETWEEN interval '1 second' AND interval '7 days'),
    ADD CONSTRAINT categories_batch_items_range CHECK (batch_items BETWEEN 1 AND 100),
    ADD CONSTRAINT categories_throttle_complete CHECK
        ((throttle_limit IS NULL) = (throttle_window IS NULL)),
    ADD CONSTRAINT categories_throttle_limit_range CHECK (throttle_limit BETWEEN 1 AND 1000000),
    ADD CONSTRAINT categories_throttle_window_range CHECK
        (throttle_window BETWEEN interval '1 second' AND interval '31 days'
         AND extract(epoch FROM throttle_window) = floor(extract(epoch FROM throttle_window))),
    ADD CONSTRAINT categories_throttle_action_known CHECK
        (throttle_action IN ('drop', 'delay', 'batch'));
COMMENT ON COLUMN pgnotify.categories.batch_window IS
    'Rows of this category inserted with a batch_key wait this long after the first, then go out '
    'as one notification with all of them as items (NULL: no batching).';
COMMENT ON COLUMN pgnotify.categories.batch_items IS
    'How many items a batch notification carries in its payload (the rest are counted in more).';
COMMENT ON COLUMN pgnotify.categories.throttle_limit IS
    'At most this many sends per recipient and channel in each throttle_window (NULL: no limit).';
COMMENT ON COLUMN pgnotify.categories.throttle_action IS
    'What happens to a send over the limit: drop (skipped, reason throttled), delay (to the next '
    'window), batch (folded into one notification sent when the next window opens).';

-- set_batching(category, window, items): batch this category's keyed rows (NULL window: stop).
CREATE FUNCTION pgnotify.set_batching(p_category text, p_window interval, p_items integer DEFAULT 10)
RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    IF p_category IS NULL OR btrim(p_category) = '' THEN
        PERFORM pgnotify.reject('category', 'set_batching needs a category');
    END IF;
    IF p_window IS NOT NULL AND NOT p_window BETWEEN interval '1 second' AND interval '7 days' THEN
        PERFORM pgnotify.reject('batch_window', format(
            'a batching window must be between 1 second and 7 days, not %s', p_window));
    END IF;
    IF p_items IS NULL OR p_items NOT BETWEEN 1 AND 100 THEN
        PERFORM pgnotify.reject('batch_items', 'a batch carries 1 to 100 items in its payload');
    END IF;
    INSERT INTO pgnotify.categories (name, batch_window, batch_items)
    VALUES (p_category, p_window, p_items)
    ON CONFLICT (name) DO UPDATE SET batch_window = EXCLUDED.batch_window,
                                     batch_items = EXCLUDED.batch_items;
END
$fn$;
COMMENT ON FUNCTION pgnotify.set_batching IS
    'Batch rows of a category inserted with a batch_key in windows of p_window (NULL: stop), '
    'carrying the first p_items items in the payload; creates the category when missing.';

-- set_throttle(category, limit, window, action): at most limit per recipient and channel per
-- window; NULL limit removes the throttle.
CREATE FUNCTION pgnotify.set_throttle(p_category text, p_limit integer, p_window interval DEFAULT NULL,
                                      p_action text DEFAULT 'drop')
RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    IF p_category IS NULL OR btrim(p_category) = '' THEN
        PERFORM pgnotify.reject('category', 'set_throttle needs a category');
    END IF;
    IF p_limit IS NOT NULL AND p_limit NOT BETWEEN 1 AND 1000000 THEN
        PERFORM pgnotify.reject('throttle_limit', format(
            'a throttle allows 1 to 1000000 sends per window, not %s', p_limit),
            'SELECT pgnotify.set_throttle(category, NULL) removes the throttle');
    END IF;
    IF p_limit IS NOT NULL AND (p_window IS NULL
            OR NOT p_window BETWEEN interval '1 second' AND interval '31 days'
            OR extract(epoch FROM p_window) <> floor(extract(epoch FROM p_window))) THEN
        PERFORM pgnotify.reject('throttle_window', format(
            'a throttle window must be whole seconds between 1 second and 31 days, not %s',
            coalesce(p_window::text, 'NULL')));
    END IF;
    IF p_action IS NULL OR p_action NOT IN ('drop', 'delay', 'batch') THEN
        PERFORM pgnotify.reject('throttle_action', format(
            'unknown throttle action %L', left(p_action, 40)), 'one of drop, delay, batch');
    END IF;
    INSERT INTO pgnotify.categories (name, throttle_limit, throttle_window, throttle_action)
    VALUES (p_category, p_limit, CASE WHEN p_limit IS NOT NULL THEN p_window END, p_action)
    ON CONFLICT (name) DO UPDATE SET throttle_limit = EXCLUDED.throttle_limit,
                                     throttle_window = EXCLUDED.throttle_window,
                                     throttle_action = EXCLUDED.throttle_action;
END
$fn$;
COMMENT ON FUNCTION pgnotify.set_throttle IS
    'At most p_limit sends of a category per recipient and channel in each p_window (fixed '
    'windows from the Unix epoch, UTC); the extra: drop, delay or batch. NULL limit: no throttle.';

-------------------------------------------------------------------------------------------------
-- 2. Batches
-------------------------------------------------------------------------------------------------
ALTER TABLE pgnotify.notifications
    ADD COLUMN batch_key text,     -- producer: gather with rows of the same key in a window
    ADD COLUMN batch_id  bigint,   -- on an item: the batch it joined
    ADD COLUMN batch_of  bigint;   -- on a batch's own notification: the batch it sends
ALTER TABLE pgnotify.notifications DROP CONSTRAINT notifications_hold_is_known;
ALTER TABLE pgnotify.notifications ADD CONSTRAINT notifications_hold_is_known
    CHECK (hold IN ('daily', 'weekly', 'batch') AND digest_of IS NULL OR hold IS NULL) NOT VALID;
ALTER TABLE pgnotify.notifications VALIDATE CONSTRAINT notifications_hold_is_known;
CREATE INDEX notifications_batch_idx ON pgnotify.notifications (batch_id, created_at, id)
    WHERE batch_id IS NOT NULL;

CREATE TABLE pgnotify.batches (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel         text NOT NULL,
    recipient       text NOT NULL,
    user_id         text,
    category        text NOT NULL,
    batch_key       text NOT NULL,
    reason          text NOT NULL,           -- batch (the producer's key) | throttle (folded)
    items           integer NOT NULL DEFAULT 1,
    opened_at       timestamptz NOT NULL DEFAULT now(),
    closes_at       timestamptz NOT NULL,
    closed_at       timestamptz,
    notification_id bigint,                  -- the notification that sends it
    CONSTRAINT batches_reason_known CHECK (reason IN ('batch', 'throttle'))
);
CREATE UNIQUE INDEX batches_open_key ON pgnotify.batches (channel, recipient, category, batch_key)
    WHERE closed_at IS NULL;
CREATE INDEX batches_closed_idx ON pgnotify.batches (closed_at) WHERE closed_at IS NOT NULL;
COMMENT ON TABLE pgnotify.batches IS
    'Batching windows: one open row per (channel, recipient, category, batch_key); items joined '
    'so far, when it closes, and the notification (scheduled for closes_at) that sends it.';

-- join_batch(): put row `item` into the open window of its key (opening one, with its
-- notification scheduled for `closes`, when there is none). The upsert locks the window row until
-- the caller's transaction ends, so the window's notification cannot close it meanwhile.
CREATE FUNCTION pgnotify.join_batch(item pgnotify.notifications, p_key text, p_reason text,
                                    closes timestamptz)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    b_id bigint;
    opened boolean;
    sender bigint;
    ttl interval;
BEGIN
    INSERT INTO pgnotify.batches AS b (channel, recipient, user_id, category, batch_key, reason,
                                       closes_at)
    VALUES (item.channel, item.recipient, item.user_id, item.category, p_key, p_reason, closes)
    ON CONFLICT (channel, recipient, category, batch_key) WHERE closed_at IS NULL
    DO UPDATE SET items = b.items + 1
    RETURNING b.id, (b.xmax = 0) INTO b_id, opened;
    IF opened THEN
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

-- batch_item(): the INSERT of a row with a batch_key joins its window (after validation, hence
-- the name sorting after notifications_validate*); a row the worker holds with hold 'batch' (a
-- throttled send folded) joins the window that closes when the next throttle window opens.
-- It runs on every INSERT (no WHEN clause: see 0013), so a row without a key returns at once.
CREATE FUNCTION pgnotify.batch_item() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    cat pgnotify.categories;
    secs numeric;
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.batch_key IS NULL THEN
            RETURN NEW;
        END IF;
        IF btrim(NEW.batch_key) = '' OR length(NEW.batch_key) > 255 THEN
            PERFORM pgnotify.reject('batch_key', 'batch_key must be 1 to 255 characters');
        END IF;
        SELECT c.* INTO cat FROM pgnotify.categories c WHERE c.name = NEW.category;
        IF cat.batch_window IS NULL THEN
            PERFORM pgnotify.reject('batch_key', format(
                'category %s has no batching window, so batch_key %L cannot be honoured',
                coalesce(quote_literal(left(NEW.category, 100)), 'NULL'), left(NEW.batch_key, 100)),
                'SELECT pgnotify.set_batching(''<category>'', interval ''15 minutes'') first, '
                'or leave batch_key out');
        END IF;
        NEW.batch_id := pgnotify.join_batch(NEW, NEW.batch_key, 'batch',
                                            now() + cat.batch_window);
    ELSE
        SELECT extract(epoch FROM c.throttle_window) INTO secs
        FROM pgnotify.categories c WHERE c.name = NEW.category;
        -- the end of the current throttle window (as core.throttle.window_of computes it)
        NEW.batch_id := pgnotify.join_batch(NEW, coalesce(NEW.batch_key, 'throttled'), 'throttle',
            CASE WHEN secs IS NULL THEN now()
                 ELSE to_timestamp(((floor(extract(epoch FROM now()) / secs) + 1) * secs)::float8)
            END);
    END IF;
    NEW.status := 'held';
    NEW.hold := 'batch';
    NEW.held_at := now();
    RETURN NEW;
END
$fn$;
CREATE TRIGGER notifications_window BEFORE INSERT ON pgnotify.notifications
    FOR EACH ROW EXECUTE FUNCTION pgnotify.batch_item();
CREATE TRIGGER notifications_window_fold BEFORE UPDATE OF status ON pgnotify.notifications
    FOR EACH ROW WHEN (NEW.status = 'held' AND NEW.hold = 'batch' AND NEW.batch_id IS NULL)
    EXECUTE FUNCTION pgnotify.batch_item();

-- close_batch(): when a window's notification is promoted (its closes_at has come), the window
-- closes and the notification's payload gets its items: the first item's payload plus count,
-- items (the first batch_items: id, created_at, payload), more (the rest) and batch_key. A
-- producer still adding to the window holds its row: the notification waits a second instead.
-- A window's notification cancelled before it is due cancels the window and its items.
CREATE FUNCTION pgnotify.close_batch() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    b pgnotify.batches;
    shown integer;
    total integer;
    items jsonb;
    first_payload jsonb;
BEGIN
    IF NEW.status <> 'queued' THEN
        UPDATE pgnotify.batches SET closed_at = now()
        WHERE id = NEW.batch_of AND closed_at IS NULL;
        WITH gone AS (
            UPDATE pgnotify.notifications n SET status = 'cancelled', updated_at = now()
            WHERE n.batch_id = NEW.batch_of AND n.status = 'held' AND n.hold = 'batch'
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
    shown := coalesce((SELECT c.batch_items FROM pgnotify.categories c
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
          WHERE n.batch_id = b.id AND n.status = 'held' AND n.hold = 'batch') i;
    IF total = 0 THEN  -- every item was cancelled meanwhile
        NEW.status := 'cancelled';
        NEW.last_error := 'every item of the batch was cancelled';
        RETURN NEW;
    END IF;
    NEW.payload := coalesce(first_payload, '{}'::jsonb) || jsonb_build_object(
        'batch_key', CASE WHEN b.reason = 'batch' THEN b.batch_key END,
        'count', total, 'items', items, 'more', greatest(total - shown, 0));
    WITH gone AS (
        UPDATE pgnotify.notifications n
        SET status = 'digested', digest_id = NEW.id, updated_at = now()
        WHERE n.batch_id = b.id AND n.status = 'held' AND n.hold = 'batch'
        RETURNING n.id
    )
    INSERT INTO pgnotify.events (notification_id, event, detail)
    SELECT id, 'digested', jsonb_build_object('digest_id', NEW.id, 'batch_id', b.id) FROM gone;
    RETURN NEW;
END
$fn$;
CREATE TRIGGER notifications_window_close BEFORE UPDATE OF status ON pgnotify.notifications
    FOR EACH ROW WHEN (OLD.status = 'scheduled' AND NEW.status IN ('queued', 'cancelled')
                       AND NEW.batch_of IS NOT NULL)
    EXECUTE FUNCTION pgnotify.close_batch();

-------------------------------------------------------------------------------------------------
-- 3. Throttles
-------------------------------------------------------------------------------------------------
CREATE TABLE pgnotify.throttle_counts (
    subject      text NOT NULL,         -- the user id, else the recipient
    category     text NOT NULL,
    channel      text NOT NULL,
    window_start timestamptz NOT NULL,
    sent         integer NOT NULL,
    PRIMARY KEY (subject, category, channel, window_start)
);
COMMENT ON TABLE pgnotify.throttle_counts IS
    'Sends counted per recipient, category, channel and throttle window (take_throttle); a '
    'subject''s older windows are deleted when its next window opens.';

-- take_throttle(): take one send of the category's allowance for this subject and channel in
-- the window holding `at`. Returns allowed (false: the window is full), the count, the limit,
-- the window and the category's action; allowed with NULL limit when the category has none.
CREATE FUNCTION pgnotify.take_throttle(p_subject text, p_category text, p_channel text,
                                       at timestamptz DEFAULT now(),
                                       OUT allowed boolean, OUT used integer, OUT max_sends integer,
                                       OUT window_start timestamptz, OUT window_end timestamptz,
                                       OUT action text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_column
DECLARE
    secs numeric;
    fresh boolean;
BEGIN
    SELECT c.throttle_limit, extract(epoch FROM c.throttle_window), c.throttle_action
    INTO max_sends, secs, action
    FROM pgnotify.categories c WHERE c.name = p_category;
    allowed := true;
    IF max_sends IS NULL THEN
        RETURN;
    END IF;
    at := coalesce(at, now());
    -- fixed windows from the Unix epoch: [k * secs, (k + 1) * secs)
    window_start := to_timestamp((floor(extract(epoch FROM at) / secs) * secs)::float8);
    window_end := to_timestamp(((floor(extract(epoch FROM at) / secs) + 1) * secs)::float8);
    INSERT INTO pgnotify.throttle_counts AS t (subject, category, channel, window_start, sent)
    VALUES (p_subject, p_category, p_channel, take_throttle.window_start, 1)
    ON CONFLICT (subject, category, channel, window_start)
    DO UPDATE SET sent = t.sent + 1 WHERE t.sent < take_throttle.max_sends
    RETURNING t.sent, (t.xmax = 0) INTO used, fresh;
    IF NOT FOUND THEN
        allowed := false;
        used := max_sends;
    ELSIF fresh THEN
        DELETE FROM pgnotify.throttle_counts t
        WHERE t.subject = p_subject AND t.category = p_category AND t.channel = p_channel
          AND t.window_start < take_throttle.window_start;
    END IF;
END
$fn$;
COMMENT ON FUNCTION pgnotify.take_throttle IS
    'Count one send of a category for a subject (user id, else recipient) and channel in the '
    'throttle window holding `at`; allowed is false when the window is already full.';

-------------------------------------------------------------------------------------------------
-- 4. Topics
-------------------------------------------------------------------------------------------------
CREATE TABLE pgnotify.topics (
    name        text PRIMARY KEY,
    description text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT topics_name_valid CHECK (length(name) BETWEEN 1 AND 200 AND name !~ '[[:cntrl:]]')
);
CREATE TABLE pgnotify.topic_subscriptions (
    topic      text NOT NULL REFERENCES pgnotify.topics (name) ON DELETE CASCADE,
    user_id    text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, user_id),
    CONSTRAINT topic_subscriptions_user_valid CHECK (length(user_id) BETWEEN 1 AND 256)
);
CREATE INDEX topic_subscriptions_user_idx ON pgnotify.topic_subscriptions (user_id);
COMMENT ON TABLE pgnotify.topics IS 'Named audiences: notify_topic() reaches every subscriber.';
COMMENT ON TABLE pgnotify.topic_subscriptions IS 'Who follows which topic (subscribe/unsubscribe).';

CREATE FUNCTION pgnotify.create_topic(p_topic text, p_description text DEFAULT NULL)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF p_topic IS NULL OR length(p_topic) NOT BETWEEN 1 AND 200 OR p_topic ~ '[[:cntrl:]]' THEN
        PERFORM pgnotify.reject('topic', 'a topic name is 1 to 200 characters, no control characters');
    END IF;
    INSERT INTO pgnotify.topics (name, description) VALUES (p_topic, p_description)
    ON CONFLICT (name) DO UPDATE SET description = coalesce(EXCLUDED.description,
                                                            pgnotify.topics.description);
    RETURN true;
END
$fn$;
COMMENT ON FUNCTION pgnotify.create_topic IS 'Create a topic (or update its description).';

CREATE FUNCTION pgnotify.subscribe(p_topic text, p_user_id text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    added integer;
BEGIN
    IF p_user_id IS NULL OR length(p_user_id) NOT BETWEEN 1 AND 256 THEN
        PERFORM pgnotify.reject('user_id', 'subscribe needs a user_id of 1 to 256 characters');
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgnotify.topics t WHERE t.name = p_topic) THEN
        PERFORM pgnotify.reject('topic', format('unknown topic %s',
            coalesce(quote_literal(left(p_topic, 100)), 'NULL')),
            'SELECT pgnotify.create_topic(''<topic>'') first');
    END IF;
    INSERT INTO pgnotify.topic_subscriptions (topic, user_id) VALUES (p_topic, p_user_id)
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS added = ROW_COUNT;
    RETURN added > 0;
END
$fn$;
COMMENT ON FUNCTION pgnotify.subscribe IS
    'Subscribe a user to a topic; true when newly subscribed, false when already.';

CREATE FUNCTION pgnotify.unsubscribe(p_topic text, p_user_id text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    gone integer;
BEGIN
    DELETE FROM pgnotify.topic_subscriptions s WHERE s.topic = p_topic AND s.user_id = p_user_id;
    GET DIAGNOSTICS gone = ROW_COUNT;
    RETURN gone > 0;
END
$fn$;
COMMENT ON FUNCTION pgnotify.unsubscribe IS
    'Unsubscribe a user from a topic; true when they were subscribed.';

-- notify_topic(): one row per subscriber and channel they can be reached on (and have not
-- turned off), in one INSERT ... SELECT inside the caller's transaction; every row then takes
-- the normal send-time path (preferences, suppressions, quiet hours, throttles). With an
-- idempotency_key, each row's key is <key>:<channel>:<user> (a long user id by its md5), so a
-- repeated call adds rows only for subscribers who had none. Returns the number of rows made.
CREATE FUNCTION pgnotify.notify_topic(
    topic           text,
    category        text,
    template        text DEFAULT NULL,
    payload         jsonb DEFAULT '{}'::jsonb,
    idempotency_key text DEFAULT NULL,
    channels        text[] DEFAULT NULL,
    subject         text DEFAULT NULL,
    body            text DEFAULT NULL,
    priority        integer DEFAULT 0,
    batch_key       text DEFAULT NULL,
    exclude_user    text DEFAULT NULL
) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
#variable_conflict use_column
DECLARE
    wanted text[];
    unknown text;
    usable text[];
    is_critical boolean;
    group_uid uuid := gen_random_uuid();
    made bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgnotify.topics t WHERE t.name = notify_topic.topic) THEN
        PERFORM pgnotify.reject('topic', format('unknown topic %s',
            coalesce(quote_literal(left(notify_topic.topic, 100)), 'NULL')),
            'SELECT pgnotify.create_topic(''<topic>'') first');
    END IF;
    IF notify_topic.idempotency_key IS NOT NULL
            AND length(notify_topic.idempotency_key) NOT BETWEEN 1 AND 120 THEN
        PERFORM pgnotify.reject('idempotency_key',
            'idempotency_key must be 1 to 120 characters for notify_topic',
            'each row stores <key>:<channel>:<user>, at most 255 characters');
    END IF;
    IF notify_topic.priority NOT BETWEEN -32768 AND 32767 THEN
        PERFORM pgnotify.reject('priority', 'priority must be between -32768 and 32767');
    END IF;
    wanted := coalesce(notify_topic.channels,
        (SELECT c.channels FROM pgnotify.categories c WHERE c.name = notify_topic.category),
        ARRAY['email', 'sms', 'push', 'inapp']);
    SELECT string_agg(coalesce(quote_literal(left(w, 40)), 'NULL'), ', ') INTO unknown
    FROM unnest(wanted) AS w
    WHERE w IS NULL OR w NOT IN ('email', 'sms', 'push', 'webhook', 'inapp');
    IF unknown IS NOT NULL THEN
        PERFORM pgnotify.reject('channel', format('unknown channel %s in channels', unknown),
            'one of email, sms, push, webhook, inapp');
    END IF;
    IF notify_topic.template IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM pgnotify.templates t WHERE t.key = notify_topic.template) THEN
        PERFORM pgnotify.reject('template', format('unknown template %L',
            left(notify_topic.template, 100)), 'insert it into pgnotify.templates first');
    END IF;
    usable := ARRAY(
        SELECT DISTINCT w FROM unnest(wanted) AS w
        WHERE (notify_topic.template IS NULL OR EXISTS (
                   SELECT 1 FROM pgnotify.templates t
                   WHERE t.key = notify_topic.template AND t.channel = w))
          AND (notify_topic.template IS NOT NULL OR notify_topic.body IS NOT NULL
               OR w IN ('webhook', 'inapp'))
          AND (w <> 'email' OR notify_topic.subject IS NOT NULL
               OR notify_topic.template IS NOT NULL));
    IF cardinality(usable) = 0 THEN
        PERFORM pgnotify.reject('template', format(
            'nothing to send on %s: give a template for one of them, or a body (and a subject '
            'for email)', array_to_string(wanted, ', ')));
    END IF;
    is_critical := coalesce((SELECT c.critical FROM pgnotify.categories c
                             WHERE c.name = notify_topic.category), false);

    INSERT INTO pgnotify.notifications AS n (channel, recipient, user_id, category, template,
        payload, subject, body, locale, priority, group_id, idempotency_key, batch_key)
    SELECT ch.channel, a.recipient, s.user_id, notify_topic.category, notify_topic.template,
           notify_topic.payload, notify_topic.subject, notify_topic.body, ct.locale,
           notify_topic.priority, group_uid,
           CASE WHEN notify_topic.idempotency_key IS NOT NULL THEN
               notify_topic.idempotency_key || ':' || ch.channel || ':' ||
               CASE WHEN length(s.user_id) <= 120 THEN s.user_id ELSE md5(s.user_id) END END,
           notify_topic.batch_key
    FROM pgnotify.topic_subscriptions s
    CROSS JOIN unnest(usable) AS ch(channel)
    LEFT JOIN pgnotify.contacts ct ON ct.user_id = s.user_id
    CROSS JOIN LATERAL (SELECT CASE ch.channel
            WHEN 'email' THEN ct.email
            WHEN 'sms' THEN ct.phone
            WHEN 'webhook' THEN ct.webhook_url
            WHEN 'inapp' THEN s.user_id
            WHEN 'push' THEN CASE WHEN EXISTS (
                    SELECT 1 FROM pgnotify.devices d WHERE d.user_id = s.user_id AND d.active)
                THEN 'user:' || s.user_id END
        END AS recipient) a
    WHERE s.topic = notify_topic.topic
      AND a.recipient IS NOT NULL
      AND s.user_id IS DISTINCT FROM notify_topic.exclude_user
      AND (is_critical OR pgnotify.preference_of(s.user_id, ch.channel, notify_topic.category)
                          <> 'off')
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING;
    GET DIAGNOSTICS made = ROW_COUNT;
    RETURN made;
END
$fn$;
COMMENT ON FUNCTION pgnotify.notify_topic IS
    'Notify every subscriber of a topic (one row per reachable channel not turned off) in one '
    'INSERT inside the caller''s transaction; returns the rows made. Idempotent per '
    '(idempotency_key, subscriber, channel).';

PERFORM pgnotify.apply_grants();
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_producer') THEN
    GRANT INSERT (batch_key) ON pgnotify.notifications TO pgnotify_producer;
    GRANT SELECT ON pgnotify.topics, pgnotify.topic_subscriptions TO pgnotify_producer;
    GRANT EXECUTE ON FUNCTION pgnotify.batch_item(), pgnotify.close_batch(),
        pgnotify.join_batch(pgnotify.notifications, text, text, timestamptz),
        pgnotify.subscribe(text, text), pgnotify.unsubscribe(text, text),
        pgnotify.create_topic(text, text),
        pgnotify.notify_topic(text, text, text, jsonb, text, text[], text, text, integer, text, text)
        TO pgnotify_producer;
END IF;
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_worker') THEN
    GRANT SELECT ON pgnotify.batches, pgnotify.throttle_counts, pgnotify.topics
        TO pgnotify_worker;
    GRANT EXECUTE ON FUNCTION pgnotify.batch_item(), pgnotify.close_batch(),
        pgnotify.join_batch(pgnotify.notifications, text, text, timestamptz),
        pgnotify.take_throttle(text, text, text, timestamptz)
        TO pgnotify_worker;
END IF;

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (19, 'fanout');
END
$migration$;
COMMIT;
