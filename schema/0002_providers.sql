-- pgnotify-worker migration 0002: device registry, suppressions, inbound provider events.
-- Idempotent: does nothing when pgnotify.schema_migrations records version 2.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 2) THEN
    RAISE NOTICE 'pgnotify migration 2 (providers) is already applied';
    RETURN;
END IF;

-------------------------------------------------------------------------------------------------
-- devices: push tokens per user. A push to a user goes to every active device of that user.
-------------------------------------------------------------------------------------------------
CREATE TABLE pgnotify.devices (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id             text NOT NULL,
    platform            text NOT NULL,
    token               text NOT NULL UNIQUE,
    active              boolean NOT NULL DEFAULT true,
    created_at          timestamptz NOT NULL DEFAULT now(),
    last_seen_at        timestamptz NOT NULL DEFAULT now(),
    deactivated_at      timestamptz,
    deactivation_reason text,
    CONSTRAINT devices_platform_is_known CHECK (platform IN ('ios', 'android', 'web')),
    CONSTRAINT devices_token_not_blank CHECK (btrim(token) <> '' AND length(token) <= 4096)
);
CREATE INDEX devices_user_idx ON pgnotify.devices (user_id) WHERE active;
COMMENT ON TABLE pgnotify.devices IS
    'Push tokens. Register with pgnotify.register_device(); dead tokens are deactivated by the worker.';

CREATE FUNCTION pgnotify.register_device(p_user_id text, p_platform text, p_token text)
RETURNS bigint LANGUAGE sql AS $fn$
    INSERT INTO pgnotify.devices (user_id, platform, token)
    VALUES (p_user_id, p_platform, p_token)
    ON CONFLICT (token) DO UPDATE
        SET user_id = EXCLUDED.user_id, platform = EXCLUDED.platform, active = true,
            last_seen_at = now(), deactivated_at = NULL, deactivation_reason = NULL
    RETURNING id;
$fn$;
COMMENT ON FUNCTION pgnotify.register_device IS
    'Register (or refresh) a push token for a user; a token seen again is reactivated and moved.';

-------------------------------------------------------------------------------------------------
-- suppressions: addresses never to send to again (hard bounce, complaint, SMS STOP).
-------------------------------------------------------------------------------------------------
CREATE TABLE pgnotify.suppressions (
    channel     text NOT NULL,
    address     text NOT NULL,
    reason      text NOT NULL,
    source      text NOT NULL,
    detail      jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (channel, address),
    CONSTRAINT suppressions_channel_is_known CHECK (channel IN ('email', 'sms', 'push', 'webhook'))
);
COMMENT ON TABLE pgnotify.suppressions IS
    'Addresses not to send to: hard bounces, spam complaints, SMS STOP. Emails are lower case.';

-------------------------------------------------------------------------------------------------
-- Inbound provider events (delivered, bounced, ...) are events too; external_id drops repeats.
-------------------------------------------------------------------------------------------------
ALTER TABLE pgnotify.events ADD COLUMN external_id text;
CREATE UNIQUE INDEX events_external_idx ON pgnotify.events (provider, external_id)
    WHERE external_id IS NOT NULL;

-------------------------------------------------------------------------------------------------
-- A push without a recipient goes to every active device of its user: recipient 'user:<id>'.
-- Triggers fire in name order, so this runs before notifications_validate; the WHEN clause
-- keeps it off every other row's path.
-------------------------------------------------------------------------------------------------
CREATE FUNCTION pgnotify.default_push_recipient() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    NEW.recipient := 'user:' || NEW.user_id;
    RETURN NEW;
END
$fn$;

CREATE TRIGGER notifications_defaults
    BEFORE INSERT ON pgnotify.notifications
    FOR EACH ROW
    WHEN (NEW.channel = 'push' AND NEW.recipient IS NULL AND NEW.user_id IS NOT NULL)
    EXECUTE FUNCTION pgnotify.default_push_recipient();

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (2, 'providers');
END
$migration$;
COMMIT;
