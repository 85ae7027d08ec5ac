-- pgnotify-worker migration 0011: a default digest that says what each item is. Without a
-- `digest` template a digest listed only each item's category (`- billing` twice); now every item
-- carries `line` (its subject, else the first line of its body, from its template when it has
-- one, with {{ variable }} filled from its payload) and the default digest lists those lines.
-- Idempotent: does nothing when version 11 is recorded.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 11) THEN
    RAISE NOTICE 'pgnotify migration 11 (default_digest) is already applied';
    RETURN;
END IF;

CREATE OR REPLACE FUNCTION pgnotify.build_digests(kind text, at timestamptz DEFAULT now(),
                                       local_hour integer DEFAULT 8, weekday integer DEFAULT 1)
RETURNS integer
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
DECLARE
    made integer := 0;
    grp record;
    new_digest bigint;
    tpl boolean;
    item record;
    line text;
    var text;
    items jsonb;
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
        -- each item's line: its subject, else the first line of its body (inline, else its
        -- template's), with {{ variable }} filled from its payload and other markup left out
        items := '[]'::jsonb;
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
            WHERE n.status = 'held' AND n.hold = build_digests.kind AND n.user_id = grp.user_id
              AND n.channel = grp.channel AND n.held_at < grp.cutoff
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

        INSERT INTO pgnotify.notifications (channel, recipient, user_id, category, template,
            subject, body, locale, payload, digest_of)
        VALUES (grp.channel, grp.recipient, grp.user_id, 'digest',
               CASE WHEN tpl THEN 'digest' END,
               CASE WHEN NOT tpl THEN 'Your {{ items | length }} updates' END,
               CASE WHEN NOT tpl THEN
                   E'{% for item in items %}- {{ item.line }}\n{% endfor %}' END,
               grp.locale,
               jsonb_build_object('kind', build_digests.kind, 'items', items),
               build_digests.kind)
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

PERFORM pgnotify.apply_grants();

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (11, 'default_digest');
END
$migration$;
COMMIT;
