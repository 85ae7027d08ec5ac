-- pgnotify-worker migration 0026: apply_grants() grants everything, whenever the roles appear.
--   apply_grants() (0006) knew the objects of 0006 only. Every later migration granted its own
--   new objects explicitly, and only to roles that existed at that moment. An operator who
--   migrates first and creates the roles afterwards (the migrating user lacks CREATEROLE, or the
--   roles are managed elsewhere) and then runs SELECT pgnotify.apply_grants(), as the NOTICE and
--   docs/sql-api.md say, got none of the grants of 0007..0025: the worker then failed at run time
--   (claim(), destinations, provider_limits, channel_health, workflows, ...).
--   1. pgnotify.role_grants: one row per (role, object, columns) with the privileges to grant;
--      object is 'pgnotify.name' (a routine with its argument types), or 'pgnotify' for SCHEMA.
--      It holds every GRANT of migrations 0007..0025 (pgnotify_scaler's of 0014 included);
--      `since` names the migration that introduced the grant.
--   2. apply_grants(), from its newest definition (0006), keeps its base grants and its REVOKE
--      from PUBLIC (which also covers the explicit REVOKEs from PUBLIC of 0023 and 0024: they
--      are on routines), then grants every row of role_grants whose role exists. A row naming an
--      object that does not exist is an error (the migration that drops an object deletes its
--      rows). Each object name is resolved through regclass/regprocedure, so it is quoted.
--   3. Partitions of pgnotify.events: admins may read them (as 0021 grants), nobody may write
--      them directly; rows go through the parent. events_before_0021 had kept the grants of the
--      table it was (worker SELECT, INSERT, DELETE; admin INSERT, UPDATE, DELETE): revoked.
-- For the next migration: insert your grants into pgnotify.role_grants (ON CONFLICT DO NOTHING)
-- and end with PERFORM pgnotify.apply_grants(); no explicit GRANT ... IF EXISTS (pg_roles ...)
-- any more. tests/test_roles.py compares a database migrated with the roles present against one
-- whose roles were created afterwards, so a grant outside role_grants fails the suite.
-- No ALTER DEFAULT PRIVILEGES (see docs/sql-api.md): none are set, and none are set here.
-- Idempotent: does nothing when pgnotify.schema_migrations records version 26.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 26) THEN
    RAISE NOTICE 'pgnotify migration 26 (complete grants) is already applied';
    RETURN;
END IF;

CREATE TABLE pgnotify.role_grants (
    role       text NOT NULL CHECK (role ~ '^pgnotify_[a-z_]+$'),
    kind       text NOT NULL CHECK (kind IN ('TABLE', 'SEQUENCE', 'FUNCTION', 'PROCEDURE', 'SCHEMA')),
    object     text NOT NULL CHECK (kind = 'SCHEMA' OR object LIKE 'pgnotify.%'),
    columns    text[] NOT NULL DEFAULT '{}' CHECK (columns = '{}' OR kind = 'TABLE'),
    privileges text[] NOT NULL CHECK (cardinality(privileges) > 0 AND privileges <@
                   ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'USAGE', 'EXECUTE']),
    since      integer NOT NULL,
    PRIMARY KEY (role, kind, object, columns)
);
COMMENT ON TABLE pgnotify.role_grants IS
    'The grants apply_grants() makes beyond its base set (0006): one row per role, object and '
    'column list. A migration adds its rows, then calls apply_grants().';

INSERT INTO pgnotify.role_grants (since, role, kind, object, columns, privileges) VALUES
    -- 0007 reaper
    (7, 'pgnotify_worker', 'FUNCTION', 'pgnotify.reap_expired_leases(integer)', '{}', '{EXECUTE}'),
    -- 0009 destinations
    (9, 'pgnotify_worker', 'TABLE', 'pgnotify.destinations', '{}', '{SELECT,INSERT,UPDATE,DELETE}'),
    (9, 'pgnotify_worker', 'FUNCTION', 'pgnotify.destination_origin(text)', '{}', '{EXECUTE}'),
    (9, 'pgnotify_admin', 'TABLE', 'pgnotify.destinations', '{}', '{SELECT,INSERT,UPDATE,DELETE}'),
    -- 0010 rate limits
    (10, 'pgnotify_worker', 'TABLE', 'pgnotify.provider_limits', '{}', '{SELECT,INSERT,UPDATE}'),
    (10, 'pgnotify_worker', 'FUNCTION',
        'pgnotify.take_tokens(text, integer, boolean, double precision, double precision)', '{}',
        '{EXECUTE}'),
    (10, 'pgnotify_worker', 'FUNCTION', 'pgnotify.pause_provider(text, double precision, text)',
        '{}', '{EXECUTE}'),
    (10, 'pgnotify_admin', 'TABLE', 'pgnotify.provider_limits', '{}',
        '{SELECT,INSERT,UPDATE,DELETE}'),
    -- 0012 delivery modes
    (12, 'pgnotify_worker', 'TABLE', 'pgnotify.delivery_modes', '{}', '{SELECT,INSERT,UPDATE}'),
    (12, 'pgnotify_admin', 'TABLE', 'pgnotify.delivery_modes', '{}',
        '{SELECT,INSERT,UPDATE,DELETE}'),
    -- 0013 producer path
    (13, 'pgnotify_producer', 'FUNCTION', 'pgnotify.wake_lock_key(text)', '{}', '{EXECUTE}'),
    (13, 'pgnotify_producer', 'FUNCTION', 'pgnotify.enqueue_many(jsonb)', '{}', '{EXECUTE}'),
    (13, 'pgnotify_worker', 'FUNCTION', 'pgnotify.wake_lock_key(text)', '{}', '{EXECUTE}'),
    (13, 'pgnotify_worker', 'FUNCTION', 'pgnotify.enqueue_many(jsonb)', '{}', '{EXECUTE}'),
    -- 0014 sendable backlog (and the autoscaler's role)
    (14, 'pgnotify_worker', 'TABLE', 'pgnotify.channel_health', '{}',
        '{SELECT,INSERT,UPDATE,DELETE}'),
    (14, 'pgnotify_worker', 'TABLE', 'pgnotify.sendable_backlog', '{}', '{SELECT}'),
    (14, 'pgnotify_admin', 'TABLE', 'pgnotify.channel_health', '{}',
        '{SELECT,INSERT,UPDATE,DELETE}'),
    (14, 'pgnotify_admin', 'TABLE', 'pgnotify.sendable_backlog', '{}', '{SELECT}'),
    (14, 'pgnotify_scaler', 'SCHEMA', 'pgnotify', '{}', '{USAGE}'),
    (14, 'pgnotify_scaler', 'TABLE', 'pgnotify.sendable_backlog', '{}', '{SELECT}'),
    -- 0015 lean claim (the view was recreated)
    (15, 'pgnotify_worker', 'TABLE', 'pgnotify.processing_timeline', '{}', '{SELECT}'),
    -- 0016 inbox feed
    (16, 'pgnotify_worker', 'TABLE', 'pgnotify.inbox', '{read_at,seen_at,archived_at}',
        '{UPDATE}'),
    (16, 'pgnotify_worker', 'TABLE', 'pgnotify.inbox_counts', '{}', '{SELECT}'),
    (16, 'pgnotify_worker', 'SEQUENCE', 'pgnotify.inbox_seq', '{}', '{USAGE}'),
    (16, 'pgnotify_admin', 'TABLE', 'pgnotify.inbox_counts', '{}', '{SELECT}'),
    (16, 'pgnotify_admin', 'SEQUENCE', 'pgnotify.inbox_seq', '{}', '{USAGE}'),
    (16, 'pgnotify_producer', 'TABLE', 'pgnotify.inbox_counts', '{}', '{SELECT}'),
    -- 0017 workflows
    (17, 'pgnotify_producer', 'FUNCTION',
        'pgnotify.trigger(text, text, jsonb, text, integer, timestamptz)', '{}', '{EXECUTE}'),
    (17, 'pgnotify_producer', 'FUNCTION', 'pgnotify.cancel_run(bigint, text)', '{}', '{EXECUTE}'),
    (17, 'pgnotify_producer', 'FUNCTION', 'pgnotify.cancel_run(text, text)', '{}', '{EXECUTE}'),
    (17, 'pgnotify_worker', 'TABLE', 'pgnotify.workflows', '{}', '{SELECT}'),
    (17, 'pgnotify_worker', 'TABLE', 'pgnotify.workflow_steps', '{}', '{SELECT}'),
    (17, 'pgnotify_worker', 'TABLE', 'pgnotify.workflow_runs_view', '{}', '{SELECT}'),
    (17, 'pgnotify_worker', 'TABLE', 'pgnotify.workflow_runs', '{}', '{SELECT,UPDATE}'),
    (17, 'pgnotify_worker', 'TABLE', 'pgnotify.workflow_run_steps', '{}', '{SELECT,INSERT}'),
    (17, 'pgnotify_worker', 'FUNCTION', 'pgnotify.cancel_run(bigint, text)', '{}', '{EXECUTE}'),
    (17, 'pgnotify_admin', 'TABLE', 'pgnotify.workflows', '{}', '{SELECT,INSERT,UPDATE,DELETE}'),
    (17, 'pgnotify_admin', 'TABLE', 'pgnotify.workflow_steps', '{}',
        '{SELECT,INSERT,UPDATE,DELETE}'),
    (17, 'pgnotify_admin', 'TABLE', 'pgnotify.workflow_runs', '{}',
        '{SELECT,INSERT,UPDATE,DELETE}'),
    (17, 'pgnotify_admin', 'TABLE', 'pgnotify.workflow_run_steps', '{}',
        '{SELECT,INSERT,UPDATE,DELETE}'),
    (17, 'pgnotify_admin', 'TABLE', 'pgnotify.workflow_runs_view', '{}', '{SELECT}'),
    -- 0018 status and preferences
    (18, 'pgnotify_worker', 'FUNCTION', 'pgnotify.save_preferences(text, jsonb, text)', '{}',
        '{EXECUTE}'),
    (18, 'pgnotify_worker', 'FUNCTION', 'pgnotify.wait_for(bigint, double precision)', '{}',
        '{EXECUTE}'),
    (18, 'pgnotify_worker', 'FUNCTION',
        'pgnotify.enqueue_status_webhooks(bigint, text, text, text, text, text)', '{}',
        '{EXECUTE}'),
    (18, 'pgnotify_worker', 'TABLE', 'pgnotify.status_webhooks', '{}', '{SELECT}'),
    (18, 'pgnotify_producer', 'FUNCTION', 'pgnotify.save_preferences(text, jsonb, text)', '{}',
        '{EXECUTE}'),
    (18, 'pgnotify_admin', 'TABLE', 'pgnotify.status_webhooks', '{}',
        '{SELECT,INSERT,UPDATE,DELETE}'),
    (18, 'pgnotify_admin', 'TABLE', 'pgnotify.preference_history', '{}', '{SELECT}'),
    -- 0019 fan-out (its join_batch(notifications, text, text, timestamptz) was replaced in 0025)
    (19, 'pgnotify_producer', 'TABLE', 'pgnotify.notifications', '{batch_key}', '{INSERT}'),
    (19, 'pgnotify_producer', 'TABLE', 'pgnotify.topics', '{}', '{SELECT}'),
    (19, 'pgnotify_producer', 'TABLE', 'pgnotify.topic_subscriptions', '{}', '{SELECT}'),
    (19, 'pgnotify_producer', 'FUNCTION', 'pgnotify.batch_item()', '{}', '{EXECUTE}'),
    (19, 'pgnotify_producer', 'FUNCTION', 'pgnotify.close_batch()', '{}', '{EXECUTE}'),
    (19, 'pgnotify_producer', 'FUNCTION', 'pgnotify.subscribe(text, text)', '{}', '{EXECUTE}'),
    (19, 'pgnotify_producer', 'FUNCTION', 'pgnotify.unsubscribe(text, text)', '{}', '{EXECUTE}'),
    (19, 'pgnotify_producer', 'FUNCTION', 'pgnotify.create_topic(text, text)', '{}', '{EXECUTE}'),
    (19, 'pgnotify_producer', 'FUNCTION',
        'pgnotify.notify_topic(text, text, text, jsonb, text, text[], text, text, integer, text, '
        'text)', '{}', '{EXECUTE}'),
    (19, 'pgnotify_worker', 'TABLE', 'pgnotify.batches', '{}', '{SELECT}'),
    (19, 'pgnotify_worker', 'TABLE', 'pgnotify.throttle_counts', '{}', '{SELECT}'),
    (19, 'pgnotify_worker', 'TABLE', 'pgnotify.topics', '{}', '{SELECT}'),
    (19, 'pgnotify_worker', 'FUNCTION', 'pgnotify.batch_item()', '{}', '{EXECUTE}'),
    (19, 'pgnotify_worker', 'FUNCTION', 'pgnotify.close_batch()', '{}', '{EXECUTE}'),
    (19, 'pgnotify_worker', 'FUNCTION', 'pgnotify.take_throttle(text, text, text, timestamptz)',
        '{}', '{EXECUTE}'),
    -- 0020 console
    (20, 'pgnotify_worker', 'TABLE', 'pgnotify.paused_channels', '{}', '{SELECT}'),
    (20, 'pgnotify_worker', 'FUNCTION', 'pgnotify.pause_channel(text, text, text)', '{}',
        '{EXECUTE}'),
    (20, 'pgnotify_worker', 'FUNCTION', 'pgnotify.resume_channel(text, text)', '{}', '{EXECUTE}'),
    (20, 'pgnotify_admin', 'TABLE', 'pgnotify.paused_channels', '{}',
        '{SELECT,INSERT,UPDATE,DELETE}'),
    (20, 'pgnotify_admin', 'FUNCTION', 'pgnotify.pause_channel(text, text, text)', '{}',
        '{EXECUTE}'),
    (20, 'pgnotify_admin', 'FUNCTION', 'pgnotify.resume_channel(text, text)', '{}', '{EXECUTE}'),
    -- 0021 history partitions (admins read every partition through SELECT ON ALL TABLES)
    (21, 'pgnotify_worker', 'FUNCTION', 'pgnotify.maintain_event_partitions(interval, integer)',
        '{}', '{EXECUTE}'),
    (21, 'pgnotify_worker', 'TABLE', 'pgnotify.event_partitions', '{}', '{SELECT}'),
    (21, 'pgnotify_admin', 'TABLE', 'pgnotify.event_partitions', '{}', '{SELECT}'),
    -- 0022 producer speed
    (22, 'pgnotify_worker', 'TABLE', 'pgnotify.timezone_names', '{}', '{SELECT}'),
    (22, 'pgnotify_admin', 'TABLE', 'pgnotify.timezone_names', '{}', '{SELECT}'),
    (22, 'pgnotify_admin', 'FUNCTION', 'pgnotify.refresh_timezone_names()', '{}', '{EXECUTE}'),
    (22, 'pgnotify_producer', 'TABLE', 'pgnotify.timezone_names', '{}', '{SELECT}'),
    -- 0023 lean worker path
    (23, 'pgnotify_worker', 'FUNCTION',
        'pgnotify.claim(text, integer, text, double precision, timestamptz)', '{}', '{EXECUTE}'),
    (23, 'pgnotify_admin', 'FUNCTION',
        'pgnotify.claim(text, integer, text, double precision, timestamptz)', '{}', '{EXECUTE}'),
    -- 0024 workflow observability
    (24, 'pgnotify_worker', 'FUNCTION',
        'pgnotify.purge_workflow_runs(interval, interval, bigint, integer)', '{}', '{EXECUTE}'),
    (24, 'pgnotify_admin', 'FUNCTION',
        'pgnotify.purge_workflow_runs(interval, interval, bigint, integer)', '{}', '{EXECUTE}'),
    -- 0025 digest batching
    (25, 'pgnotify_producer', 'FUNCTION',
        'pgnotify.join_batch(pgnotify.notifications, text, text, timestamptz, integer, text)', '{}',
        '{EXECUTE}'),
    (25, 'pgnotify_worker', 'TABLE', 'pgnotify.digest_schedule', '{}', '{SELECT}'),
    (25, 'pgnotify_worker', 'FUNCTION',
        'pgnotify.join_batch(pgnotify.notifications, text, text, timestamptz, integer, text)', '{}',
        '{EXECUTE}'),
    (25, 'pgnotify_worker', 'FUNCTION', 'pgnotify.digest_hold()', '{}', '{EXECUTE}'),
    (25, 'pgnotify_worker', 'FUNCTION', 'pgnotify.digest_window_close(pgnotify.notifications)',
        '{}', '{EXECUTE}'),
    (25, 'pgnotify_worker', 'FUNCTION',
        'pgnotify.digest_closes_at(text, text, timestamptz, integer, integer)', '{}', '{EXECUTE}'),
    (25, 'pgnotify_worker', 'FUNCTION',
        'pgnotify.workflow_fold(bigint, text, text, double precision, integer)', '{}',
        '{EXECUTE}'),
    (25, 'pgnotify_admin', 'TABLE', 'pgnotify.digest_schedule', '{}', '{SELECT,UPDATE}'),
    (25, 'pgnotify_admin', 'FUNCTION',
        'pgnotify.digest_closes_at(text, text, timestamptz, integer, integer)', '{}', '{EXECUTE}')
ON CONFLICT DO NOTHING;

-- apply_grants(), as in 0006 plus pgnotify.role_grants. search_path pinned: every name below is
-- qualified, and regclass/regprocedure print schema-qualified names.
CREATE OR REPLACE FUNCTION pgnotify.apply_grants() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    missing text[] := ARRAY(SELECT r FROM unnest(ARRAY['pgnotify_producer', 'pgnotify_worker',
        'pgnotify_admin']) r WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r));
    helpers text := 'pgnotify.reject(text, text, text), pgnotify.reject_in(text, text, text, text), '
        'pgnotify.e164_country_code_length(text), pgnotify.webhook_address(text), '
        'pgnotify.blocked_address_reason(inet), pgnotify.webhook_host_refusal(text)';
    g pgnotify.role_grants%ROWTYPE;
    target text;
    part regclass;
BEGIN
    -- Nothing in the schema is executable by PUBLIC (PostgreSQL grants it on every new function).
    REVOKE ALL ON ALL ROUTINES IN SCHEMA pgnotify FROM PUBLIC;
    IF cardinality(missing) > 0 THEN
        RAISE NOTICE 'pgnotify: role(s) % do not exist, so nothing is granted to them; a user with '
            'CREATEROLE can create them (CREATE ROLE pgnotify_producer NOLOGIN; ...) and then '
            'run SELECT pgnotify.apply_grants()', array_to_string(missing, ', ');
    END IF;

    -- Producers (the application): enqueue, maintain their users' contacts, devices, preferences,
    -- consents and chat rows, read the in-app inbox. Never read or change notifications or events.
    IF NOT 'pgnotify_producer' = ANY (missing) THEN
        GRANT USAGE ON SCHEMA pgnotify TO pgnotify_producer;
        GRANT INSERT (channel, recipient, user_id, category, template, subject, body, html_body,
                      locale, payload, priority, max_attempts, run_at, expires_at,
                      idempotency_key, group_id, traceparent)
            ON pgnotify.notifications TO pgnotify_producer;
        -- what the validation triggers of a plain INSERT look up
        GRANT SELECT (key, channel) ON pgnotify.templates TO pgnotify_producer;
        GRANT SELECT ON pgnotify.categories TO pgnotify_producer;
        GRANT SELECT, INSERT, UPDATE, DELETE ON pgnotify.contacts, pgnotify.chat_organization_members,
            pgnotify.chat_rooms, pgnotify.chat_room_members, pgnotify.chat_messages
            TO pgnotify_producer;
        GRANT SELECT ON pgnotify.inbox TO pgnotify_producer;
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO pgnotify_producer', helpers);
        GRANT EXECUTE ON FUNCTION
            pgnotify.enqueue(text, text, text, jsonb, text, text, text, text, text, text, integer,
                             timestamptz, integer, text, text),
            pgnotify.notify_user(text, text, text, jsonb, text[], text, text, integer, timestamptz,
                                 timestamptz, text),
            pgnotify.cancel(bigint),
            pgnotify.register_device(text, text, text),
            pgnotify.set_preference(text, text, text, text, text),
            pgnotify.record_consent(text, text, boolean, text),
            pgnotify.inbox_mark_read(text, bigint[])
            TO pgnotify_producer;
    END IF;

    -- The worker process at run time (migrations are run by the schema owner): claim, complete,
    -- reap, promote, deliver in-app, devices and suppressions, send-time preferences, jobs,
    -- digests, retention, the dashboard refresh, alerts through enqueue().
    IF NOT 'pgnotify_worker' = ANY (missing) THEN
        GRANT USAGE ON SCHEMA pgnotify TO pgnotify_worker;
        GRANT SELECT, INSERT, UPDATE, DELETE ON pgnotify.notifications TO pgnotify_worker;
        GRANT SELECT, INSERT, DELETE ON pgnotify.events, pgnotify.inbox TO pgnotify_worker;
        GRANT SELECT ON pgnotify.templates, pgnotify.categories, pgnotify.consents,
            pgnotify.schema_migrations, pgnotify.queue_status, pgnotify.error_summary,
            pgnotify.failed_report, pgnotify.processing_timeline, pgnotify.notifications_dashboard
            TO pgnotify_worker;
        GRANT SELECT, UPDATE ON pgnotify.devices, pgnotify.jobs TO pgnotify_worker;
        GRANT SELECT, INSERT ON pgnotify.suppressions TO pgnotify_worker;
        GRANT SELECT, INSERT, UPDATE ON pgnotify.contacts, pgnotify.preferences TO pgnotify_worker;
        GRANT SELECT, INSERT, UPDATE, DELETE ON pgnotify.job_runs TO pgnotify_worker;
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO pgnotify_worker', helpers);
        GRANT EXECUTE ON FUNCTION
            pgnotify.enqueue(text, text, text, jsonb, text, text, text, text, text, text, integer,
                             timestamptz, integer, text, text),
            pgnotify.preference_of(text, text, text),
            pgnotify.address_of(text, text),
            pgnotify.build_digests(text, timestamptz, integer, integer),
            pgnotify.requeue_expired_leases(),
            pgnotify.refresh_dashboard()
            TO pgnotify_worker;
        GRANT EXECUTE ON PROCEDURE pgnotify.apply_retention(interval, interval, integer)
            TO pgnotify_worker;
    END IF;

    -- Admins (people and tools): read everything; retry, cancel and replay; manage templates,
    -- categories, preferences, contacts, suppressions and jobs. No DDL, no TRUNCATE.
    IF NOT 'pgnotify_admin' = ANY (missing) THEN
        GRANT USAGE ON SCHEMA pgnotify TO pgnotify_admin;
        GRANT SELECT ON ALL TABLES IN SCHEMA pgnotify TO pgnotify_admin;
        GRANT INSERT, UPDATE, DELETE ON pgnotify.notifications, pgnotify.events, pgnotify.templates,
            pgnotify.inbox, pgnotify.devices, pgnotify.suppressions, pgnotify.contacts,
            pgnotify.categories, pgnotify.preferences, pgnotify.consents,
            pgnotify.consent_history, pgnotify.jobs, pgnotify.job_runs,
            pgnotify.chat_organization_members, pgnotify.chat_rooms, pgnotify.chat_room_members,
            pgnotify.chat_messages
            TO pgnotify_admin;
        GRANT EXECUTE ON ALL ROUTINES IN SCHEMA pgnotify TO pgnotify_admin;
        REVOKE EXECUTE ON FUNCTION pgnotify.apply_grants() FROM pgnotify_admin;
    END IF;

    -- Everything since 0006 (and other roles: pgnotify_scaler): pgnotify.role_grants. A new
    -- migration inserts its rows there; nothing else needs to change here.
    FOR g IN SELECT * FROM pgnotify.role_grants r
             WHERE EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r.role)
             ORDER BY r.since, r.role, r.kind, r.object, r.columns LOOP
        target := CASE g.kind
            WHEN 'TABLE' THEN to_regclass(g.object)::text
            WHEN 'SEQUENCE' THEN to_regclass(g.object)::text
            WHEN 'SCHEMA' THEN (SELECT quote_ident(nspname) FROM pg_namespace
                                WHERE nspname = g.object)
            ELSE to_regprocedure(g.object)::text
        END;
        IF target IS NULL THEN
            RAISE EXCEPTION 'pgnotify.role_grants names % %, which does not exist', g.kind, g.object
                USING HINT = 'the migration that drops or renames an object deletes or updates '
                             'its rows in pgnotify.role_grants';
        END IF;
        EXECUTE format('GRANT %s ON %s %s TO %I',
            (SELECT string_agg(p || CASE WHEN g.columns = '{}' THEN '' ELSE
                                   ' (' || (SELECT string_agg(quote_ident(c), ', ')
                                            FROM unnest(g.columns) c) || ')' END, ', ')
             FROM unnest(g.privileges) p),
            g.kind, target, g.role);
    END LOOP;

    -- Rows of pgnotify.events are read and written through the partitioned table; a partition
    -- (events_before_0021 kept the grants of the table it was) is the admins' to read, no more.
    FOR part IN SELECT inhrelid::regclass FROM pg_inherits
                WHERE inhparent = to_regclass('pgnotify.events') LOOP
        FOR target IN SELECT rolname FROM pg_roles
                      WHERE rolname IN ('pgnotify_producer', 'pgnotify_worker', 'pgnotify_admin') LOOP
            EXECUTE format('REVOKE ALL ON %s FROM %I', part, target);
        END LOOP;
        IF NOT 'pgnotify_admin' = ANY (missing) THEN
            EXECUTE format('GRANT SELECT ON %s TO pgnotify_admin', part);
        END IF;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION pgnotify.apply_grants IS
    'Grant pgnotify_producer, pgnotify_worker and pgnotify_admin (and the roles of '
    'pgnotify.role_grants) what they need, and PUBLIC nothing. Run as the schema owner after '
    'creating a role; idempotent.';

PERFORM pgnotify.apply_grants();

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (26, 'complete grants');
END
$migration$;
COMMIT;
