-- pgnotify-worker migration 0017: workflows -- named, versioned sequences of steps (send on a
-- channel, delay, condition on an earlier step or a preference, stop) that the workers run for
-- one user at a time, with every run's state in rows.
--   workflows, workflow_steps: the definitions (pgnotify.define_workflow(), or plain INSERTs of
--     both, checked at COMMIT by a deferred constraint trigger).
--   workflow_runs, workflow_run_steps: each run (current step, next_at) and what each step did.
--   trigger(), cancel_run(): the producer's calls; an inbox row becoming read cancels the runs
--     that said so (cancel_if), at once.
--   workflow_runs_view, and processing_timeline with the workflow rows and two columns more.
-- Idempotent: does nothing when version 17 is recorded.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 17) THEN
    RAISE NOTICE 'pgnotify migration 17 (workflows) is already applied';
    RETURN;
END IF;

-------------------------------------------------------------------------------------------------
-- Definitions.
-------------------------------------------------------------------------------------------------
CREATE TABLE pgnotify.workflows (
    name        text NOT NULL,
    version     integer NOT NULL,
    category    text,
    description text,
    definition  jsonb,               -- the steps as given to define_workflow() (NULL: INSERTed)
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version),
    CONSTRAINT workflows_name_format CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$'),
    CONSTRAINT workflows_version_positive CHECK (version >= 1)
);
COMMENT ON TABLE pgnotify.workflows IS
    'Workflow definitions, one row per version; a run uses the newest version when triggered.';

CREATE TABLE pgnotify.workflow_steps (
    workflow    text NOT NULL,
    version     integer NOT NULL,
    position    integer NOT NULL,
    name        text NOT NULL,
    kind        text NOT NULL,
    channel     text,
    template    text,
    settings    jsonb NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (workflow, version, position),
    CONSTRAINT workflow_steps_name_unique UNIQUE (workflow, version, name),
    FOREIGN KEY (workflow, version) REFERENCES pgnotify.workflows (name, version)
        ON DELETE CASCADE
);
COMMENT ON TABLE pgnotify.workflow_steps IS
    'The steps of a workflow version, run in position order: send (channel, template; settings '
    'subject, body, html_body, overrides, priority, category), delay (seconds/minutes/hours/days '
    'or until HH:MM local), condition (step + is, or preference + is; then/else), stop. Any step '
    'may carry cancel_if {step, is}. See docs/workflows.md.';

-- Row checks: what one step can be judged on by itself, with the field named.
CREATE FUNCTION pgnotify.validate_workflow_step() RETURNS trigger
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
                               'cancel_if']
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
CREATE TRIGGER workflow_steps_validate BEFORE INSERT OR UPDATE ON pgnotify.workflow_steps
    FOR EACH ROW EXECUTE FUNCTION pgnotify.validate_workflow_step();

-- Whole-workflow checks: references go to earlier send steps, jumps go forward (so no cycle).
CREATE FUNCTION pgnotify.validate_workflow(p_workflow text, p_version integer) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    s record;
    ref record;
    target record;
    refs jsonb;
    field text;
    name_of text;
    who text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgnotify.workflows w
                   WHERE w.name = p_workflow AND w.version = p_version) THEN
        RETURN;  -- deleted in the same transaction
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgnotify.workflow_steps st
                   WHERE st.workflow = p_workflow AND st.version = p_version) THEN
        PERFORM pgnotify.reject_in('workflow_steps', 'workflow', format(
            'workflow %L version %s has no steps', p_workflow, p_version));
    END IF;
    FOR s IN SELECT * FROM pgnotify.workflow_steps st
             WHERE st.workflow = p_workflow AND st.version = p_version ORDER BY st.position LOOP
        who := format('step %L of workflow %L', s.name, p_workflow);
        -- what the step looks at: its condition's step and its cancel_if's step
        FOR field, name_of, refs IN
            SELECT 'step', s.settings ->> 'step', s.settings
            WHERE s.kind = 'condition' AND s.settings ? 'step'
            UNION ALL
            SELECT 'cancel_if', s.settings -> 'cancel_if' ->> 'step', s.settings -> 'cancel_if'
            WHERE s.settings ? 'cancel_if'
        LOOP
            SELECT * INTO ref FROM pgnotify.workflow_steps st
            WHERE st.workflow = p_workflow AND st.version = p_version AND st.name = name_of;
            IF NOT FOUND THEN
                PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
                    '%s: %s refers to unknown step %L', who, field, left(name_of, 63)),
                    'the steps are: ' || (SELECT string_agg(st.name, ', ' ORDER BY st.position)
                        FROM pgnotify.workflow_steps st
                        WHERE st.workflow = p_workflow AND st.version = p_version));
            END IF;
            IF ref.position >= s.position THEN
                PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
                    '%s: %s refers to step %L, which %s', who, field, ref.name,
                    CASE WHEN ref.position = s.position THEN 'is this step'
                         ELSE 'comes later' END),
                    'a condition or cancel_if can only look at an earlier send step');
            END IF;
            IF ref.kind <> 'send' THEN
                PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
                    '%s: %s refers to step %L, a %s step: only a send step has an outcome',
                    who, field, ref.name, ref.kind));
            END IF;
            IF refs ->> 'is' IN ('read', 'seen') AND ref.channel <> 'inapp' THEN
                PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
                    '%s: %L needs an in-app step, and step %L sends on %s', who, refs ->> 'is',
                    ref.name, ref.channel), 'only inbox messages (channel inapp) are read');
            END IF;
        END LOOP;
        -- where a condition goes: a later step, 'next' or 'stop'
        IF s.kind = 'condition' THEN
            FOREACH field IN ARRAY ARRAY['then', 'else'] LOOP
                name_of := s.settings ->> field;
                CONTINUE WHEN name_of IS NULL OR name_of IN ('next', 'stop');
                SELECT * INTO target FROM pgnotify.workflow_steps st
                WHERE st.workflow = p_workflow AND st.version = p_version AND st.name = name_of;
                IF NOT FOUND THEN
                    PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
                        '%s: %s goes to unknown step %L', who, field, left(name_of, 63)),
                        'a later step''s name, "next" or "stop"');
                END IF;
                IF target.position <= s.position THEN
                    PERFORM pgnotify.reject_in('workflow_steps', 'settings', format(
                        '%s: %s goes back to step %L, which would make a cycle', who, field,
                        target.name), 'workflows run forward: then/else name a later step');
                END IF;
            END LOOP;
        END IF;
    END LOOP;
END
$fn$;
COMMENT ON FUNCTION pgnotify.validate_workflow IS
    'Raise 23514 naming the problem if a workflow version is inconsistent (unknown or later '
    'step referred to, a jump backwards); checked at COMMIT for plain INSERTs.';

CREATE FUNCTION pgnotify.validate_workflow_commit() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_TABLE_NAME = 'workflows' THEN
        PERFORM pgnotify.validate_workflow(NEW.name, NEW.version);
    ELSE
        PERFORM pgnotify.validate_workflow(NEW.workflow, NEW.version);
    END IF;
    RETURN NULL;
END
$fn$;
CREATE CONSTRAINT TRIGGER workflows_complete AFTER INSERT OR UPDATE ON pgnotify.workflows
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION pgnotify.validate_workflow_commit();
CREATE CONSTRAINT TRIGGER workflow_steps_consistent AFTER INSERT OR UPDATE ON pgnotify.workflow_steps
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION pgnotify.validate_workflow_commit();

-- define_workflow(): a new version from a JSON array of steps; the same definition again
-- returns the newest version unchanged (safe to run at every deploy).
CREATE FUNCTION pgnotify.define_workflow(name text, steps jsonb, category text DEFAULT NULL,
                                         description text DEFAULT NULL)
RETURNS integer
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    newest pgnotify.workflows;
    made integer;
    bad bigint;
    known text;
BEGIN
    IF define_workflow.name IS NULL OR define_workflow.name !~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$' THEN
        PERFORM pgnotify.reject_in('workflows', 'name', format(
            'workflow name %L must be 1 to 100 letters, digits, _ . : or - (starting with a '
            'letter or digit)', left(define_workflow.name, 120)));
    END IF;
    IF jsonb_typeof(define_workflow.steps) IS DISTINCT FROM 'array'
            OR jsonb_array_length(define_workflow.steps) = 0 THEN
        PERFORM pgnotify.reject_in('workflow_steps', 'workflow', format(
            'the steps of workflow %L must be a non-empty JSON array of step objects',
            define_workflow.name));
    END IF;
    SELECT i INTO bad FROM jsonb_array_elements(define_workflow.steps) WITH ORDINALITY AS e(s, i)
    WHERE jsonb_typeof(s) <> 'object' OR NOT s ? 'kind' ORDER BY i LIMIT 1;
    IF bad IS NOT NULL THEN
        PERFORM pgnotify.reject_in('workflow_steps', 'kind', format(
            'step %s of workflow %L must be a JSON object with a "kind"', bad, define_workflow.name),
            'e.g. {"name": "email", "kind": "send", "channel": "email", "template": "welcome"}');
    END IF;
    SELECT i INTO bad FROM jsonb_array_elements(define_workflow.steps) WITH ORDINALITY AS e(s, i)
    WHERE jsonb_typeof(s -> 'name') NOT IN ('string') OR jsonb_typeof(s -> 'channel') <> 'string'
       OR jsonb_typeof(s -> 'template') <> 'string' OR jsonb_typeof(s -> 'kind') <> 'string'
    ORDER BY i LIMIT 1;
    IF bad IS NOT NULL THEN
        PERFORM pgnotify.reject_in('workflow_steps', 'name', format(
            'step %s of workflow %L: name, kind, channel and template must be strings', bad,
            define_workflow.name));
    END IF;
    SELECT s ->> 'name' INTO known FROM jsonb_array_elements(define_workflow.steps) AS e(s)
    WHERE s ? 'name' GROUP BY s ->> 'name' HAVING count(*) > 1 LIMIT 1;
    IF known IS NOT NULL THEN
        PERFORM pgnotify.reject_in('workflow_steps', 'name', format(
            'workflow %L has two steps named %L', define_workflow.name, left(known, 63)),
            'give each step its own "name"');
    END IF;
    -- one definer at a time per name: versions are numbered without gaps or collisions
    PERFORM pg_advisory_xact_lock(hashtext('pgnotify.workflow:' || define_workflow.name));
    SELECT * INTO newest FROM pgnotify.workflows w
    WHERE w.name = define_workflow.name ORDER BY w.version DESC LIMIT 1;
    IF FOUND AND newest.definition = define_workflow.steps
            AND newest.category IS NOT DISTINCT FROM define_workflow.category
            AND newest.description IS NOT DISTINCT FROM define_workflow.description THEN
        RETURN newest.version;
    END IF;
    made := coalesce(newest.version, 0) + 1;
    INSERT INTO pgnotify.workflows (name, version, category, description, definition)
    VALUES (define_workflow.name, made, define_workflow.category, define_workflow.description,
            define_workflow.steps);
    INSERT INTO pgnotify.workflow_steps (workflow, version, position, name, kind, channel,
                                         template, settings)
    SELECT define_workflow.name, made, e.i, coalesce(e.s ->> 'name', 'step' || e.i),
           e.s ->> 'kind', e.s ->> 'channel', e.s ->> 'template',
           e.s - 'name' - 'kind' - 'channel' - 'template'
    FROM jsonb_array_elements(define_workflow.steps) WITH ORDINALITY AS e(s, i)
    ORDER BY e.i;
    PERFORM pgnotify.validate_workflow(define_workflow.name, made);  -- now, not at COMMIT
    RETURN made;
END
$fn$;
COMMENT ON FUNCTION pgnotify.define_workflow IS
    'Define (a new version of) a workflow from a JSON array of steps; returns the version. The '
    'same definition again returns the newest version without making a new one.';

-------------------------------------------------------------------------------------------------
-- Runs.
-------------------------------------------------------------------------------------------------
CREATE TABLE pgnotify.workflow_runs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workflow        text NOT NULL,
    version         integer NOT NULL,
    user_id         text NOT NULL,
    payload         jsonb NOT NULL DEFAULT '{}'::jsonb,
    status          text NOT NULL DEFAULT 'running',
    current_step    text,
    next_at         timestamptz NOT NULL DEFAULT now(),
    idempotency_key text,
    reason          text,
    evaluations     integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    FOREIGN KEY (workflow, version) REFERENCES pgnotify.workflows (name, version),
    CONSTRAINT workflow_runs_status_is_known CHECK
        (status IN ('running', 'completed', 'cancelled', 'failed')),
    CONSTRAINT workflow_runs_finished CHECK ((status = 'running') = (finished_at IS NULL))
);
COMMENT ON TABLE pgnotify.workflow_runs IS
    'One row per triggered workflow: running (the worker evaluates current_step at next_at) -> '
    'completed | cancelled | failed, with the reason.';
CREATE UNIQUE INDEX workflow_runs_idempotency_key_idx ON pgnotify.workflow_runs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX workflow_runs_due_idx ON pgnotify.workflow_runs (next_at, id) WHERE status = 'running';
CREATE INDEX workflow_runs_user_idx ON pgnotify.workflow_runs (user_id);

CREATE TABLE pgnotify.workflow_run_steps (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id          bigint NOT NULL REFERENCES pgnotify.workflow_runs (id) ON DELETE CASCADE,
    step            text NOT NULL,
    kind            text NOT NULL,
    outcome         text NOT NULL,
    detail          text,
    notification_id bigint,
    worker          text,
    at              timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT workflow_run_steps_once UNIQUE (run_id, step)
);
COMMENT ON TABLE pgnotify.workflow_run_steps IS
    'What each step of a run did: send -> created (notification_id) | unreachable | refused; '
    'delay -> waiting (until); condition -> true | false; stop -> stopped. Once per step.';
CREATE INDEX workflow_run_steps_notification_idx ON pgnotify.workflow_run_steps (notification_id)
    WHERE notification_id IS NOT NULL;

-- trigger(): start a run for a user, in the caller's transaction.
CREATE FUNCTION pgnotify.trigger(workflow text, user_id text, payload jsonb DEFAULT '{}'::jsonb,
                                 idempotency_key text DEFAULT NULL, version integer DEFAULT NULL,
                                 start_at timestamptz DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    chosen integer;
    first_step text;
    known text;
    had pgnotify.workflow_runs;
    differs text[];
    new_id bigint;
BEGIN
    SELECT max(w.version) INTO chosen FROM pgnotify.workflows w WHERE w.name = trigger.workflow;
    IF chosen IS NULL THEN
        SELECT string_agg(quote_literal(k.name), ', ' ORDER BY k.name)
               || CASE WHEN count(*) = 20 THEN ', ...' ELSE '' END INTO known
        FROM (SELECT DISTINCT w.name FROM pgnotify.workflows w ORDER BY w.name LIMIT 20) k;
        PERFORM pgnotify.reject_in('workflow_runs', 'workflow', format('unknown workflow %L; %s',
            left(trigger.workflow, 100), coalesce('known workflows: ' || known,
            'no workflow is defined yet')),
            'define one with SELECT pgnotify.define_workflow(name, steps)');
    END IF;
    IF trigger.version IS NOT NULL THEN
        IF NOT EXISTS (SELECT 1 FROM pgnotify.workflows w
                       WHERE w.name = trigger.workflow AND w.version = trigger.version) THEN
            PERFORM pgnotify.reject_in('workflow_runs', 'version', format(
                'workflow %L has no version %s (the newest is %s)', trigger.workflow,
                trigger.version, chosen));
        END IF;
        chosen := trigger.version;
    END IF;
    IF trigger.user_id IS NULL OR btrim(trigger.user_id) = '' OR length(trigger.user_id) > 256 THEN
        PERFORM pgnotify.reject_in('workflow_runs', 'user_id',
            'trigger needs a user_id (1 to 256 characters)');
    END IF;
    IF jsonb_typeof(coalesce(trigger.payload, '{}'::jsonb)) <> 'object' THEN
        PERFORM pgnotify.reject_in('workflow_runs', 'payload', format(
            'payload must be a JSON object, not %s', jsonb_typeof(trigger.payload)));
    END IF;
    IF trigger.idempotency_key IS NOT NULL
            AND (trigger.idempotency_key = '' OR length(trigger.idempotency_key) > 255) THEN
        PERFORM pgnotify.reject_in('workflow_runs', 'idempotency_key',
            'idempotency_key must be 1 to 255 characters');
    END IF;
    IF trigger.start_at IS NOT NULL AND (trigger.start_at < '2000-01-01 00:00:00+00'
            OR trigger.start_at > now() + interval '10 years') THEN
        PERFORM pgnotify.reject_in('workflow_runs', 'start_at',
            'start_at must be a finite time from 2000-01-01 to 10 years from now');
    END IF;
    SELECT st.name INTO first_step FROM pgnotify.workflow_steps st
    WHERE st.workflow = trigger.workflow AND st.version = chosen ORDER BY st.position LIMIT 1;

    INSERT INTO pgnotify.workflow_runs AS r (workflow, version, user_id, payload, current_step,
                                            next_at, idempotency_key)
    VALUES (trigger.workflow, chosen, trigger.user_id, coalesce(trigger.payload, '{}'::jsonb),
            first_step, coalesce(trigger.start_at, now()), trigger.idempotency_key)
    ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING r.id INTO new_id;
    IF new_id IS NULL THEN
        -- the key started a run before: that run, if it is the same call
        SELECT * INTO had FROM pgnotify.workflow_runs r
        WHERE r.idempotency_key = trigger.idempotency_key;
        differs := array_remove(ARRAY[
            CASE WHEN had.workflow <> trigger.workflow THEN 'workflow' END,
            CASE WHEN had.user_id <> trigger.user_id THEN 'user_id' END,
            CASE WHEN had.payload <> coalesce(trigger.payload, '{}'::jsonb) THEN 'payload' END],
            NULL);
        IF cardinality(differs) > 0 THEN
            PERFORM pgnotify.reject_in('workflow_runs', 'idempotency_key', format(
                'idempotency_key %L already started run %s with a different %s',
                left(trigger.idempotency_key, 100), had.id, array_to_string(differs, ', ')),
                'a new run needs a new key; the same call again returns the same run');
        END IF;
        RETURN had.id;
    END IF;
    IF trigger.start_at IS NULL OR trigger.start_at <= now() THEN
        PERFORM pg_notify('pgnotify', 'workflows');
    END IF;
    RETURN new_id;
END
$fn$;
COMMENT ON FUNCTION pgnotify.trigger IS
    'Start a run of a workflow (its newest version unless given) for a user; returns the run id. '
    'The same idempotency_key again returns the same run.';

-- cancel_run(): stop a running run and take back what it queued and nothing has sent yet.
CREATE FUNCTION pgnotify.cancel_run(run_id bigint, reason text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    done bigint;
BEGIN
    UPDATE pgnotify.workflow_runs r
    SET status = 'cancelled', finished_at = now(), updated_at = now(),
        reason = left(coalesce(cancel_run.reason, 'cancelled by ' || session_user), 1000)
    WHERE r.id = cancel_run.run_id AND r.status = 'running'
    RETURNING r.id INTO done;
    IF done IS NULL THEN
        RETURN false;  -- unknown or already finished
    END IF;
    WITH taken AS (
        UPDATE pgnotify.notifications n SET status = 'cancelled', updated_at = now()
        WHERE n.id IN (SELECT s.notification_id FROM pgnotify.workflow_run_steps s
                       WHERE s.run_id = done AND s.notification_id IS NOT NULL)
          AND n.status IN ('queued', 'scheduled', 'held')
        RETURNING n.id
    )
    INSERT INTO pgnotify.events (notification_id, event, worker, detail)
    SELECT t.id, 'cancelled', session_user, jsonb_build_object('workflow_run', done) FROM taken t;
    RETURN true;
END
$fn$;
CREATE FUNCTION pgnotify.cancel_run(idempotency_key text, reason text DEFAULT NULL)
RETURNS boolean
LANGUAGE sql AS $fn$
    SELECT coalesce((SELECT pgnotify.cancel_run(r.id, cancel_run.reason)
                     FROM pgnotify.workflow_runs r
                     WHERE r.idempotency_key = cancel_run.idempotency_key), false);
$fn$;
COMMENT ON FUNCTION pgnotify.cancel_run(bigint, text) IS
    'Cancel a running workflow run (and its notifications not sent yet); false if unknown or '
    'finished.';
COMMENT ON FUNCTION pgnotify.cancel_run(text, text) IS
    'cancel_run() by the idempotency_key the run was triggered with.';

-- Reading an inbox message cancels, at once, the runs with a step still to come that says
-- cancel_if {"step": <the step that made the message>, "is": "read"}.
CREATE FUNCTION pgnotify.workflow_inbox_read() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    hit record;
BEGIN
    FOR hit IN
        SELECT r.id, rs.step FROM pgnotify.workflow_run_steps rs
        JOIN pgnotify.workflow_runs r ON r.id = rs.run_id AND r.status = 'running'
        WHERE rs.notification_id = NEW.notification_id
          AND EXISTS (
              SELECT 1 FROM pgnotify.workflow_steps s
              WHERE s.workflow = r.workflow AND s.version = r.version
                AND s.settings -> 'cancel_if' ->> 'step' = rs.step
                AND s.settings -> 'cancel_if' ->> 'is' IN ('read', 'seen')
                AND NOT EXISTS (SELECT 1 FROM pgnotify.workflow_run_steps d
                                WHERE d.run_id = r.id AND d.step = s.name))
    LOOP
        PERFORM pgnotify.cancel_run(hit.id,
            format('cancelled: the in-app message of step %L was read', hit.step));
    END LOOP;
    RETURN NULL;
END
$fn$;
CREATE TRIGGER inbox_read_cancels_runs AFTER UPDATE OF read_at ON pgnotify.inbox
    FOR EACH ROW WHEN (OLD.read_at IS NULL AND NEW.read_at IS NOT NULL)
    EXECUTE FUNCTION pgnotify.workflow_inbox_read();

-------------------------------------------------------------------------------------------------
-- Views.
-------------------------------------------------------------------------------------------------
CREATE VIEW pgnotify.workflow_runs_view AS
SELECT r.id AS run_id, r.workflow, r.version, r.user_id,
       CASE WHEN r.status = 'running' AND r.next_at > now() THEN 'waiting' ELSE r.status END
           AS state,
       r.current_step, r.next_at, r.reason, r.idempotency_key,
       (SELECT count(*) FROM pgnotify.workflow_run_steps s WHERE s.run_id = r.id) AS steps_done,
       last.step AS last_step, last.outcome AS last_outcome, last.detail AS last_detail,
       last.notification_id AS last_notification_id,
       r.created_at, r.updated_at, r.finished_at
FROM pgnotify.workflow_runs r
LEFT JOIN LATERAL (SELECT s.step, s.outcome, s.detail, s.notification_id
                   FROM pgnotify.workflow_run_steps s WHERE s.run_id = r.id
                   ORDER BY s.id DESC LIMIT 1) last ON true;
COMMENT ON VIEW pgnotify.workflow_runs_view IS
    'Each run: state (running, waiting, completed, cancelled, failed), the step it is at, the '
    'last step it did and why it stopped.';

-- From the newest definition (0015, lean claim: claimed steps from the outcome's claimed_at and
-- from rows being sent), with the workflow rows after it and two columns appended.
CREATE OR REPLACE VIEW pgnotify.processing_timeline AS
SELECT n.id AS notification_id, n.channel, 'queued'::text AS event, 0 AS attempt,
       NULL::text AS worker, NULL::text AS provider, NULL::real AS duration_ms,
       NULL::text AS error_code, NULL::text AS error, n.created_at AS at, 0::bigint AS seq,
       ws.run_id AS workflow_run_id, ws.step AS workflow_step
FROM pgnotify.notifications n
LEFT JOIN pgnotify.workflow_run_steps ws ON ws.notification_id = n.id
UNION ALL
SELECT e.notification_id, n.channel, e.event, e.attempt, e.worker, e.provider, e.duration_ms,
       e.error_code, e.error, e.created_at, e.id, ws.run_id, ws.step
FROM pgnotify.events e
JOIN pgnotify.notifications n ON n.id = e.notification_id
LEFT JOIN pgnotify.workflow_run_steps ws ON ws.notification_id = e.notification_id
UNION ALL
SELECT e.notification_id, n.channel, 'claimed', e.attempt, e.worker, NULL, NULL, NULL, NULL,
       e.claimed_at, e.id, ws.run_id, ws.step
FROM pgnotify.events e
JOIN pgnotify.notifications n ON n.id = e.notification_id
LEFT JOIN pgnotify.workflow_run_steps ws ON ws.notification_id = e.notification_id
WHERE e.claimed_at IS NOT NULL
UNION ALL
SELECT n.id, n.channel, 'claimed', n.attempts, n.locked_by, NULL, NULL, NULL, NULL,
       n.updated_at, 0, ws.run_id, ws.step
FROM pgnotify.notifications n
LEFT JOIN pgnotify.workflow_run_steps ws ON ws.notification_id = n.id
WHERE n.status = 'processing'
UNION ALL
SELECT s.notification_id, n.channel, 'workflow_' || s.kind, 0, s.worker, NULL, NULL,
       s.outcome, s.detail, s.at, s.id, s.run_id, s.step
FROM pgnotify.workflow_run_steps s
LEFT JOIN pgnotify.notifications n ON n.id = s.notification_id
UNION ALL
SELECT NULL, NULL, 'workflow_' || r.status, 0, NULL, NULL, NULL, NULL, r.reason, r.finished_at,
       0, r.id, r.current_step
FROM pgnotify.workflow_runs r
WHERE r.status <> 'running';
COMMENT ON VIEW pgnotify.processing_timeline IS
    'Each notification''s steps in order: filter on notification_id, order by at, seq. A '
    'claimed step comes from the outcome event''s claimed_at (or the row, while it is sent). A '
    'workflow run''s story: filter on workflow_run_id (workflow_<kind> rows carry the step''s '
    'outcome in error_code and its detail in error; workflow_<status> says why the run ended).';

-------------------------------------------------------------------------------------------------
-- Rights. trigger() and cancel_run() run as the schema owner (producers cannot read runs).
-------------------------------------------------------------------------------------------------
ALTER FUNCTION pgnotify.trigger(text, text, jsonb, text, integer, timestamptz)
    SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp;
ALTER FUNCTION pgnotify.cancel_run(bigint, text)
    SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp;
ALTER FUNCTION pgnotify.cancel_run(text, text)
    SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp;
ALTER FUNCTION pgnotify.workflow_inbox_read()
    SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp;

PERFORM pgnotify.apply_grants();
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_producer') THEN
    GRANT EXECUTE ON FUNCTION pgnotify.trigger(text, text, jsonb, text, integer, timestamptz),
        pgnotify.cancel_run(bigint, text), pgnotify.cancel_run(text, text)
        TO pgnotify_producer;
END IF;
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_worker') THEN
    GRANT SELECT ON pgnotify.workflows, pgnotify.workflow_steps, pgnotify.workflow_runs_view
        TO pgnotify_worker;
    GRANT SELECT, UPDATE ON pgnotify.workflow_runs TO pgnotify_worker;
    GRANT SELECT, INSERT ON pgnotify.workflow_run_steps TO pgnotify_worker;
    GRANT EXECUTE ON FUNCTION pgnotify.cancel_run(bigint, text) TO pgnotify_worker;
END IF;
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_admin') THEN
    GRANT SELECT, INSERT, UPDATE, DELETE ON pgnotify.workflows, pgnotify.workflow_steps,
        pgnotify.workflow_runs, pgnotify.workflow_run_steps TO pgnotify_admin;
    GRANT SELECT ON pgnotify.workflow_runs_view TO pgnotify_admin;
END IF;

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (17, 'workflows');
END
$migration$;
COMMIT;
