-- pgnotify-worker migration 0004: a reference chat model whose new messages notify people.
-- Rooms belong to organisations; a message notifies the room's members (and, where the room says
-- so, the organisation's members), never its author or members who muted the room, through the
-- preference rules (immediate, digest, or off). The trigger is the pattern to copy onto an
-- application's own tables (see the README).
-- Idempotent: does nothing when pgnotify.schema_migrations records version 4.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 4) THEN
    RAISE NOTICE 'pgnotify migration 4 (chat) is already applied';
    RETURN;
END IF;

CREATE TABLE pgnotify.chat_organization_members (
    organization_id text NOT NULL,
    user_id         text NOT NULL,
    PRIMARY KEY (organization_id, user_id)
);

CREATE TABLE pgnotify.chat_rooms (
    id                  text PRIMARY KEY,
    organization_id     text NOT NULL,
    name                text NOT NULL,
    notify_organization boolean NOT NULL DEFAULT false  -- announcements: everyone in the org
);

CREATE TABLE pgnotify.chat_room_members (
    room_id  text NOT NULL REFERENCES pgnotify.chat_rooms (id) ON DELETE CASCADE,
    user_id  text NOT NULL,
    muted    boolean NOT NULL DEFAULT false,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX chat_room_members_user_idx ON pgnotify.chat_room_members (user_id);

CREATE TABLE pgnotify.chat_messages (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    room_id     text NOT NULL REFERENCES pgnotify.chat_rooms (id),
    author_id   text NOT NULL,
    body        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX chat_messages_room_idx ON pgnotify.chat_messages (room_id, id);

-- One INSERT for every message of the statement, every recipient and every channel the
-- recipient can be reached on: one NOTIFY per channel, whatever the size of the room.
CREATE FUNCTION pgnotify.chat_message_notify() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    WITH recipients AS (
        SELECT m.id AS message_id, m.room_id, m.author_id, m.body, m.created_at, r.name AS room,
               rm.user_id
        FROM new_messages m
        JOIN pgnotify.chat_rooms r ON r.id = m.room_id
        JOIN pgnotify.chat_room_members rm ON rm.room_id = m.room_id AND NOT rm.muted
        UNION
        SELECT m.id, m.room_id, m.author_id, m.body, m.created_at, r.name, om.user_id
        FROM new_messages m
        JOIN pgnotify.chat_rooms r ON r.id = m.room_id AND r.notify_organization
        JOIN pgnotify.chat_organization_members om ON om.organization_id = r.organization_id
        WHERE NOT EXISTS (SELECT 1 FROM pgnotify.chat_room_members muted
                          WHERE muted.room_id = m.room_id AND muted.user_id = om.user_id
                            AND muted.muted)
    ), targets AS (
        SELECT rc.*, ch.channel, pgnotify.address_of(rc.user_id, ch.channel) AS recipient,
               (SELECT ct.locale FROM pgnotify.contacts ct WHERE ct.user_id = rc.user_id) AS locale
        FROM recipients rc
        CROSS JOIN LATERAL unnest(coalesce(
            (SELECT c.channels FROM pgnotify.categories c WHERE c.name = 'chat'),
            ARRAY['inapp', 'push', 'email'])) AS ch(channel)
        WHERE rc.user_id <> rc.author_id
    )
    INSERT INTO pgnotify.notifications (channel, recipient, user_id, category, template, subject,
                                        body, locale, payload)
    SELECT t.channel, t.recipient, t.user_id, 'chat',
           CASE WHEN tpl.key IS NOT NULL THEN 'chat_message' END,
           CASE WHEN tpl.key IS NULL THEN 'New message in {{ room }}' END,
           CASE WHEN tpl.key IS NULL THEN '{{ author_id }}: {{ body }}' END,
           t.locale,
           jsonb_build_object('message_id', t.message_id, 'room_id', t.room_id, 'room', t.room,
                              'author_id', t.author_id, 'body', left(t.body, 500))
    FROM targets t
    LEFT JOIN LATERAL (SELECT t2.key FROM pgnotify.templates t2
                       WHERE t2.key = 'chat_message' AND t2.channel = t.channel LIMIT 1) tpl ON true
    WHERE t.recipient IS NOT NULL
      AND pgnotify.preference_of(t.user_id, t.channel, 'chat') <> 'off';
    RETURN NULL;
END
$fn$;

CREATE TRIGGER chat_messages_notify
    AFTER INSERT ON pgnotify.chat_messages
    REFERENCING NEW TABLE AS new_messages
    FOR EACH STATEMENT EXECUTE FUNCTION pgnotify.chat_message_notify();

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (4, 'chat');
END
$migration$;
COMMIT;
