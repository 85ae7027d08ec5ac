"""Every SQL statement the worker runs, each with a one-line comment. Parameters only, never
string formatting. Tests prepare each of them against a freshly migrated database."""

from __future__ import annotations

# claim: lease up to $2 ready rows of channel $1 to worker $3 for $4 seconds, in claim order,
# skipping rows other workers hold (no event row: the outcome's event carries claimed_at, schema
# 0015); with $5, only rows created after it (a dev sink never takes what was enqueued while a
# real provider served the channel).
# Producer-set timestamps come back as epoch seconds and the payload as text, so one row the
# driver could not decode (a date out of Python's range, JSON nested too deep) fails alone
# instead of failing the whole batch. A paused channel (pgnotify.pause_channel) gives nothing.
# The statement is the function pgnotify.claim() (schema 0023), planned for each call (0028: a plan
# kept from a call on an empty table read the whole table on every later claim).
CLAIM = """
SELECT id, uid, channel, recipient, user_id, category, template, subject, body, html_body, locale,
       payload, priority, attempts, max_attempts, created_at, expires_at, digest_of, traceparent,
       claimed_at
FROM pgnotify.claim($1, $2, $3, $4, $5)
"""

# LEASED: the write-back, the heartbeat and the release find their rows by (id, attempt), read
# them through the primary key (`id = ANY($2)`), and fence them with `locked_by = $1 AND status =
# 'processing'` written as `(x || '') = ...`, which no index serves. Written plainly, the planner
# costs "this worker's processing rows" from statistics taken when few rows were processing or
# leased (the state lasts seconds), estimates one row, and starts from there: with a large claim
# in flight (21,000 processing rows under set-based in-app delivery) a write-back of 500 rows
# looped over all 21,000 (10 million comparisons, 3 s) and a heartbeat of 2,000 took 1.4 s,
# holding their locks meanwhile. This way the work is bounded by the batch, whatever the
# statistics say. The write-back takes each row's values by its position in the arrays
# (array_position), not by a join to the unnested batch: estimated at one row, that join was a
# nested loop re-reading the batch for every row (batch^2).
# complete: write many outcomes in one statement, each only while worker $1 still holds that
# row's lease for that attempt (fenced), with one event per written outcome (carrying when the
# attempt was claimed, $15).
COMPLETE = """
WITH r AS (
    SELECT * FROM unnest($2::bigint[], $3::int[], $4::text[], $5::text[], $6::float8[],
                         $7::text[], $8::text[], $9::text[], $10::text[], $11::real[], $12::int[],
                         $13::int[], $14::text[], $15::timestamptz[])
        AS r(id, attempt, status, event, delay, error_code, error, provider,
             provider_message_id, duration_ms, template_version, refund, hold, claimed_at)
), mine AS (
    -- the batch's rows still leased to this worker, read through the primary key (LEASED above),
    -- each with its position in the arrays
    SELECT n.id, array_position($2::bigint[], n.id) AS i
    FROM pgnotify.notifications n
    WHERE n.id = ANY ($2::bigint[]) AND (n.locked_by || '') = $1 AND (n.status || '') = 'processing'
), done AS (
    UPDATE pgnotify.notifications n
    SET status = ($4::text[])[m.i],
        attempts = n.attempts - ($13::int[])[m.i],
        hold = CASE WHEN ($4::text[])[m.i] = 'held' THEN ($14::text[])[m.i] ELSE n.hold END,
        held_at = CASE WHEN ($4::text[])[m.i] = 'held' THEN now() ELSE n.held_at END,
        run_at = CASE WHEN ($4::text[])[m.i] = 'scheduled'
                      THEN now() + make_interval(secs => ($6::float8[])[m.i]) ELSE n.run_at END,
        locked_by = NULL,
        locked_until = NULL,
        last_error = CASE WHEN ($4::text[])[m.i] = 'sent' THEN NULL
                          ELSE coalesce(($8::text[])[m.i], n.last_error) END,
        provider = coalesce(($9::text[])[m.i], n.provider),
        provider_message_id = coalesce(($10::text[])[m.i], n.provider_message_id),
        template_version = coalesce(($12::int[])[m.i], n.template_version),
        sent_at = CASE WHEN ($4::text[])[m.i] = 'sent' THEN now() ELSE n.sent_at END,
        updated_at = now()
    FROM mine m
    WHERE n.id = m.id AND n.attempts = ($3::int[])[m.i]
      AND (n.locked_by || '') = $1 AND (n.status || '') = 'processing'
    RETURNING n.id, n.run_at, n.status
), logged AS (
    INSERT INTO pgnotify.events (notification_id, event, attempt, worker, provider, duration_ms,
                                 error_code, error, detail, claimed_at)
    SELECT r.id, r.event, r.attempt, $1, r.provider, r.duration_ms, r.error_code, r.error,
           CASE WHEN done.status = 'scheduled' THEN jsonb_build_object('retry_at', done.run_at)
                WHEN done.status = 'held' THEN jsonb_build_object('digest', r.hold) END,
           r.claimed_at
    FROM r JOIN done ON done.id = r.id
)
SELECT id FROM done
"""

# heartbeat: extend worker $1's leases on (id, attempt) pairs $2/$3 by $4 seconds; never waits
# on a row lock (the completer may be finishing that row right now).
HEARTBEAT = """
UPDATE pgnotify.notifications n
SET locked_until = now() + make_interval(secs => $4)
WHERE n.id IN (
    SELECT id FROM pgnotify.notifications
    WHERE (id, attempts) IN (SELECT * FROM unnest($2::bigint[], $3::int[]))
      AND id = ANY ($2::bigint[])
      AND (locked_by || '') = $1 AND (status || '') = 'processing'  -- see LEASED above
    FOR UPDATE SKIP LOCKED
)
RETURNING n.id
"""

# release: hand worker $1's unfinished claims (id, attempt pairs $2/$3) back to the queue on
# shutdown without spending the attempt, and wake the other replicas for them.
RELEASE = """
WITH released AS (
    UPDATE pgnotify.notifications n
    SET status = 'queued', attempts = n.attempts - 1, locked_by = NULL, locked_until = NULL,
        updated_at = now()
    WHERE (n.id, n.attempts) IN (SELECT * FROM unnest($2::bigint[], $3::int[]))
      AND n.id = ANY ($2::bigint[])
      AND (n.locked_by || '') = $1 AND (n.status || '') = 'processing'  -- see LEASED above
    RETURNING n.id, n.attempts + 1 AS attempt, n.channel
), logged AS (
    INSERT INTO pgnotify.events (notification_id, event, attempt, worker)
    SELECT id, 'released', attempt, $1 FROM released
)
SELECT channel, count(*) AS released, pg_notify('pgnotify', channel) AS woken
FROM released GROUP BY channel
"""

# reap: requeue up to $1 rows whose lease expired (their worker died or stalled); a row whose
# attempts are spent goes dead instead, so a row that kills its worker cannot loop forever.
# The one reaper is the SQL function (schema 0007), also behind requeue_expired_leases().
REAP = """
SELECT channel, requeued, dead FROM pgnotify.reap_expired_leases($1)
"""

# promote: up to $1 scheduled rows whose time has come become ready; wakes every replica.
PROMOTE = """
WITH due AS (
    SELECT id FROM pgnotify.notifications
    WHERE status = 'scheduled' AND run_at <= now()
    ORDER BY run_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
), promoted AS (
    UPDATE pgnotify.notifications n SET status = 'queued', updated_at = now()
    FROM due WHERE n.id = due.id
    RETURNING n.channel
)
SELECT channel, count(*) AS promoted, pg_notify('pgnotify', channel) AS woken
FROM promoted GROUP BY channel
"""

# next_due: seconds from now until the earliest scheduled row is due (NULL when none is).
NEXT_DUE = """
SELECT extract(epoch FROM min(run_at) - now())::float8 FROM pgnotify.notifications
WHERE status = 'scheduled'
"""

# template: newest version of template $1 for channel $2, preferring locales in the order of $3.
TEMPLATE = """
SELECT key, channel, locale, version, subject, body, html_body FROM pgnotify.templates
WHERE key = $1 AND channel = $2 AND locale = ANY($3::text[])
ORDER BY array_position($3::text[], locale), version DESC
LIMIT 1
"""

# inbox_deliver: store notification $1's in-app message for user $2 once; a retry finds it.
INBOX_DELIVER = """
WITH ins AS (
    INSERT INTO pgnotify.inbox (notification_id, user_id, category, title, body, data)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT (notification_id) DO NOTHING
    RETURNING id
)
SELECT id FROM ins
UNION ALL
SELECT id FROM pgnotify.inbox WHERE notification_id = $1
LIMIT 1
"""

# inbox_deliver_many: store the in-app messages of many notifications (arrays by position) in
# one statement; those already stored (a retry) are found, not stored twice. (notification, id).
INBOX_DELIVER_MANY = """
WITH input AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
        AS t(notification_id, user_id, category, title, body, data)
), ins AS (
    INSERT INTO pgnotify.inbox (notification_id, user_id, category, title, body, data)
    SELECT notification_id, user_id, category, title, body, data::jsonb FROM input
    ON CONFLICT (notification_id) DO NOTHING
    RETURNING notification_id, id
)
SELECT notification_id, id FROM ins
UNION ALL
SELECT i.notification_id, i.id FROM pgnotify.inbox i JOIN input USING (notification_id)
"""

# queue_status: per-channel counts for gauges and /status.
QUEUE_STATUS = """
SELECT channel, ready, scheduled, processing, retrying, dead, failed, held, oldest_ready_seconds
FROM pgnotify.queue_status
"""

# wake_take: take channel $1's wake token (schema 0008) without waiting; false when another
# worker holds it. A session lock on the worker's direct (never pooled) token connection.
WAKE_TAKE = "SELECT pg_try_advisory_lock(72453901, pgnotify.wake_lock_key($1))"

# wake_give_back: give channel $1's wake token back (false when it was not held).
WAKE_GIVE_BACK = "SELECT pg_advisory_unlock(72453901, pgnotify.wake_lock_key($1))"

# wake_handover_done: true when no transaction that inserted into channel $1 is still open (each
# holds the shared hand-over lock until it ends); the exclusive lock is given back at once.
WAKE_HANDOVER_DONE = """
SELECT CASE WHEN pg_try_advisory_lock(72453902, pgnotify.wake_lock_key($1))
            THEN pg_advisory_unlock(72453902, pgnotify.wake_lock_key($1)) ELSE false END
"""

# wake_others: wake every replica for channel $1 (a stopping worker that held its wake token).
WAKE_OTHERS = "SELECT pg_notify('pgnotify', $1)"

# ping: a NOTIFY round trip proving the listener connection delivers.
PING = "SELECT pg_notify($1, $2)"

# alive: the cheapest query that proves the pool reaches the database.
ALIVE = "SELECT 1"

# schema_version: the newest migration applied.
SCHEMA_VERSION = "SELECT coalesce(max(version), 0) FROM pgnotify.schema_migrations"

# schema_exists: whether any migration ever ran here (the migrations table exists).
SCHEMA_EXISTS = "SELECT to_regclass('pgnotify.schema_migrations') IS NOT NULL"

# in_seconds: the database clock $1 seconds from now (timestamps come from the database).
IN_SECONDS = "SELECT now() + make_interval(secs => $1)"

# statement_timeout: a transaction-local statement timeout ($1 like '30s'), pooler-safe.
STATEMENT_TIMEOUT = "SELECT set_config('statement_timeout', $1, true)"

# enqueue: the SQL API, as the CLI calls it.
ENQUEUE = """
SELECT pgnotify.enqueue(channel => $1, recipient => $2, template => $3, payload => $4,
    subject => $5, body => $6, html_body => $7, user_id => $8, category => $9, locale => $10,
    priority => $11, run_at => $12, max_attempts => $13, idempotency_key => $14)
"""

# cancel: the SQL API's cancel.
CANCEL = "SELECT pgnotify.cancel($1)"

# retry: the SQL API's requeue of a failed or dead row.
RETRY = "SELECT pgnotify.retry($1)"

# recent_failures: the last errors, for `pgnotify-worker status`.
RECENT_ERRORS = """
SELECT channel, provider, error_code, error, occurrences, last_seen
FROM pgnotify.error_summary LIMIT $1
"""

# devices_of: the active push devices of user $1.
DEVICES_OF = """
SELECT id, platform, token FROM pgnotify.devices WHERE user_id = $1 AND active ORDER BY id
"""

# deactivate_device: a push service said token $1 is dead; stop using it.
DEACTIVATE_DEVICE = """
UPDATE pgnotify.devices SET active = false, deactivated_at = now(), deactivation_reason = $2
WHERE token = $1 AND active
"""

# suppress: never send to address $2 on channel $1 again (reason $3, source $4, detail $5).
SUPPRESS = """
INSERT INTO pgnotify.suppressions (channel, address, reason, source, detail)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (channel, address) DO NOTHING
"""

# note: an extra event on notification $1 (per-device push outcomes and the like).
NOTE = """
INSERT INTO pgnotify.events (notification_id, event, attempt, worker, provider, error_code, error,
                             detail)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
"""

# provider_event: an inbound delivery report (delivered, bounced...) becomes an event of the
# notification it is about, found by our id $2 or the provider's message id $3; a report seen
# before (same provider $1 and external id $8, in any day's partition; a race within one day
# meets that partition's unique index) is not stored twice. Returns channel, recipient.
PROVIDER_EVENT = """
WITH target AS (
    (SELECT id, channel, recipient, attempts FROM pgnotify.notifications WHERE id = $2)
    UNION ALL
    (SELECT id, channel, recipient, attempts FROM pgnotify.notifications
     WHERE $2::bigint IS NULL AND provider_message_id = $3 ORDER BY id DESC LIMIT 1)
    LIMIT 1
), stored AS (
    INSERT INTO pgnotify.events (notification_id, event, attempt, provider, error_code, error,
                                 detail, external_id)
    SELECT id, $4, attempts, $1, $5, $6, $7, $8 FROM target
    WHERE $8::text IS NULL OR NOT EXISTS (
        SELECT 1 FROM pgnotify.events e WHERE e.provider = $1 AND e.external_id = $8)
    ON CONFLICT DO NOTHING
    RETURNING notification_id
)
SELECT target.id, target.channel, target.recipient, (SELECT count(*) FROM stored) AS stored
FROM target
"""

# send_facts: for rows $1 (their addresses normalised in $2), what the preference rules need,
# read at send time on the database clock, so a change made after enqueue still holds.
SEND_FACTS = """
SELECT x.id,
       coalesce(cat.critical, false) AS critical,
       coalesce(cat.requires_consent, false) AS requires_consent,
       co.granted AS consent,
       CASE WHEN n.user_id IS NULL THEN coalesce(cat.default_preference, 'immediate')
            ELSE pgnotify.preference_of(n.user_id, n.channel, n.category) END AS preference,
       c.unsubscribed_at IS NOT NULL AS unsubscribed,
       EXISTS (SELECT 1 FROM pgnotify.suppressions s
               WHERE s.channel = n.channel AND s.address = x.address) AS suppressed,
       c.quiet_start, c.quiet_end,
       (now() AT TIME ZONE coalesce(c.timezone, 'UTC'))::time AS local_time,
       cat.throttle_limit IS NOT NULL AS throttled
FROM unnest($1::bigint[], $2::text[]) AS x(id, address)
JOIN pgnotify.notifications n ON n.id = x.id
LEFT JOIN pgnotify.contacts c ON c.user_id = n.user_id
LEFT JOIN pgnotify.categories cat ON cat.name = n.category
LEFT JOIN pgnotify.consents co ON co.user_id = n.user_id AND co.category = n.category
"""

# take_throttle: count one send of category $2 to subject $1 (user id, else recipient) on
# channel $3 in its throttle window (schema 0019); allowed false when the window is full.
TAKE_THROTTLE = """
SELECT allowed, used, max_sends, extract(epoch FROM window_start)::float8 AS window_start,
       extract(epoch FROM window_end)::float8 AS window_end, action,
       extract(epoch FROM now())::float8 AS db_now
FROM pgnotify.take_throttle($1, $2, $3)
"""

# job_claim: lock one due job (another replica skips it); the caller advances it in the same
# transaction, so each due run happens once however many replicas poll.
JOB_CLAIM = """
SELECT name, schedule, timezone, command, timeout_seconds, next_run_at, now() AS db_now
FROM pgnotify.jobs
WHERE enabled AND next_run_at <= now()
ORDER BY next_run_at
LIMIT 1
FOR UPDATE SKIP LOCKED
"""

# job_start: move job $1 to its next run $2 and open a run record (scheduled for $3, worker $4).
JOB_START = """
WITH moved AS (
    UPDATE pgnotify.jobs SET next_run_at = $2, last_started_at = now() WHERE name = $1
)
INSERT INTO pgnotify.job_runs (job_name, scheduled_for, worker) VALUES ($1, $3, $4)
RETURNING id
"""

# job_finish: close run $1 (status $2, rows $3, error $4) and keep the job's failure streak.
JOB_FINISH = """
WITH run AS (
    UPDATE pgnotify.job_runs
    SET finished_at = now(), status = $2, rows_affected = $3, error = $4
    WHERE id = $1
    RETURNING job_name
)
UPDATE pgnotify.jobs j
SET last_finished_at = now(), last_status = $2,
    consecutive_failures = CASE WHEN $2 = 'failed' THEN j.consecutive_failures + 1 ELSE 0 END
FROM run WHERE j.name = run.job_name
RETURNING j.name, j.consecutive_failures
"""

# jobs_unscheduled: enabled jobs without a next run yet (new rows), with the database time.
JOBS_UNSCHEDULED = """
SELECT name, schedule, timezone, now() AS db_now
FROM pgnotify.jobs WHERE enabled AND next_run_at IS NULL
"""

# job_schedule: give job $1 its first run time $2 (unless another replica did).
JOB_SCHEDULE = "UPDATE pgnotify.jobs SET next_run_at = $2 WHERE name = $1 AND next_run_at IS NULL"

# job_disable: a job whose schedule cannot be read stops, with the reason as its status.
JOB_DISABLE = "UPDATE pgnotify.jobs SET enabled = false, last_status = $2 WHERE name = $1"

# jobs_next_due: seconds until the next enabled job is due (NULL when none is scheduled).
JOBS_NEXT_DUE = """
SELECT extract(epoch FROM min(next_run_at) - now())::float8 FROM pgnotify.jobs WHERE enabled
"""

# job_command: keep a built-in job's command in line with the settings (digest hour, weekday).
JOB_COMMAND = """
UPDATE pgnotify.jobs SET command = $2 WHERE name = $1 AND builtin AND command IS DISTINCT FROM $2
"""

# jobs_status: every job and its last run, for /status and the metrics.
JOBS_STATUS = """
SELECT name, schedule, timezone, enabled, builtin, next_run_at, last_started_at,
       last_finished_at, last_status, consecutive_failures
FROM pgnotify.jobs ORDER BY name
"""

# opt_out: record an unsubscribe link's request: user $1 from category $2 ('*' = everything
# but critical categories), idempotently.
OPT_OUT = """
WITH everything AS (
    INSERT INTO pgnotify.contacts (user_id, unsubscribed_at)
    SELECT $1, now() WHERE $2 = '*'
    ON CONFLICT (user_id) DO UPDATE
        SET unsubscribed_at = coalesce(pgnotify.contacts.unsubscribed_at, now())
    RETURNING 1
), one AS (
    INSERT INTO pgnotify.preferences (user_id, channel, category, setting, source)
    SELECT $1, '*', $2, 'off', 'unsubscribe_link' WHERE $2 <> '*'
    ON CONFLICT (user_id, channel, category)
        DO UPDATE SET setting = 'off', source = 'unsubscribe_link', updated_at = now()
    RETURNING 1
)
SELECT (SELECT count(*) FROM everything) + (SELECT count(*) FROM one)
"""

# category_is_critical: is category $1 one users cannot opt out of (no unsubscribe link offered)?
CATEGORY_IS_CRITICAL = """
SELECT coalesce((SELECT critical FROM pgnotify.categories WHERE name = $1), false)
"""

# oldest_transaction: other client sessions' oldest open transaction here: seconds, and xid age.
OLDEST_TRANSACTION = """
SELECT coalesce(extract(epoch FROM now() - min(xact_start)), 0)::float8 AS age_seconds,
       coalesce(max(age(backend_xmin)), 0)::bigint AS xmin_age
FROM pg_stat_activity
-- Without pg_read_all_stats, other roles' sessions show NULL xact_start and backend_type (but
-- their backend_xmin): a session with a user is a client; autovacuum has none.
WHERE datname = current_database() AND pid <> pg_backend_pid() AND usename IS NOT NULL
  AND coalesce(backend_type, 'client backend') = 'client backend'
"""

# queue_dead_tuples: dead row versions in the queue tables (a pinned snapshot keeps them); the
# events' are the sum over its day partitions.
QUEUE_DEAD_TUPLES = """
SELECT CASE WHEN s.relname = 'notifications' THEN 'notifications' ELSE 'events' END AS "table",
       sum(s.n_dead_tup)::bigint AS dead
FROM pg_stat_user_tables s
WHERE s.schemaname = 'pgnotify'
  AND (s.relname = 'notifications'
       OR s.relid IN (SELECT i.inhrelid FROM pg_inherits i
                      JOIN pg_class p ON p.oid = i.inhparent
                      JOIN pg_namespace ns ON ns.oid = p.relnamespace
                      WHERE ns.nspname = 'pgnotify' AND p.relname = 'events'))
GROUP BY 1
"""

# destinations: origin, disabled?, reason of every destination recorded as failing or disabled.
DESTINATIONS = """
SELECT origin, disabled_at IS NOT NULL AS disabled, disabled_reason FROM pgnotify.destinations
"""

# destination_failing: destination $1's circuit opened with error $2: failing since the first
# time (kept), disabled when failing for $3 seconds or more; (disabled just now, seconds failing).
DESTINATION_FAILING = """
WITH up AS (
    INSERT INTO pgnotify.destinations AS d (origin, last_error)
    VALUES ($1, $2)
    ON CONFLICT (origin) DO UPDATE
    SET last_error = excluded.last_error, last_failure_at = now(), pauses = d.pauses + 1,
        disabled_at = CASE WHEN d.disabled_at IS NULL
                            AND now() - d.failing_since >= make_interval(secs => $3)
                           THEN now() ELSE d.disabled_at END,
        disabled_reason = CASE WHEN d.disabled_at IS NULL
                                AND now() - d.failing_since >= make_interval(secs => $3)
                               THEN format('failing since %s: %s', d.failing_since, $2)
                               ELSE d.disabled_reason END
    RETURNING d.disabled_at = now() AS disabled_now, d.failing_since
)
SELECT coalesce(disabled_now, false) AS disabled_now,
       extract(epoch FROM now() - failing_since)::float8 AS failing_seconds
FROM up
"""

# destination_recovered: destination $1 answered again: forget it, unless it is disabled.
DESTINATION_RECOVERED = """
DELETE FROM pgnotify.destinations WHERE origin = $1 AND disabled_at IS NULL
"""

# --- shared rate limits (schema/0007): one row per limited provider, for every replica ---------

# limit_upsert: store provider $1's rate $2/s and burst $3 (this replica's settings win; the
# balance is kept, capped at the new burst); returns the rate and burst stored before, if any.
LIMIT_UPSERT = """
WITH before AS (SELECT rate, burst FROM pgnotify.provider_limits WHERE provider = $1)
INSERT INTO pgnotify.provider_limits AS l (provider, rate, burst, tokens)
VALUES ($1, $2, $3, $3)
ON CONFLICT (provider) DO UPDATE
SET rate = excluded.rate, burst = excluded.burst, tokens = least(l.tokens, excluded.burst),
    updated_at = now()
RETURNING (SELECT rate FROM before) AS old_rate, (SELECT burst FROM before) AS old_burst
"""

# take_tokens: take up to $2 tokens of provider $1 now (or, $3 true, reserve $2 ahead), its row
# recreated at rate $4 / burst $5 if lost: granted, ready_in, next_in, paused_for (seconds).
TAKE_TOKENS = """
SELECT granted, ready_in, next_in, paused_for FROM pgnotify.take_tokens($1, $2, $3, $4, $5)
"""

# give_back_tokens: return $2 granted but unused tokens to provider $1 (the claim found fewer
# rows), capped at its burst.
GIVE_BACK_TOKENS = """
UPDATE pgnotify.provider_limits SET tokens = least(burst, tokens + $2)
WHERE provider = $1 AND $2 > 0
"""

# pause_provider: no replica sends through provider $1 for $2 seconds (a 429), reason $3;
# returns seconds until the (possibly longer, already set) pause ends, NULL when not limited.
PAUSE_PROVIDER = """
SELECT extract(epoch FROM until - clock_timestamp())::float8
FROM pgnotify.pause_provider($1, $2, $3) AS until
"""

# provider_limits: every shared limit with its current balance and pause, for /status.
PROVIDER_LIMITS = """
SELECT provider, rate, burst,
       least(burst, tokens + rate * greatest(0, extract(epoch FROM now() - refilled_at)))::float8
           AS tokens,
       greatest(0, extract(epoch FROM paused_until - now()))::float8 AS paused_for,
       pause_reason
FROM pgnotify.provider_limits ORDER BY provider
"""

# show_notification: every column of notification $1, for `pgnotify-worker show`.
SHOW_NOTIFICATION = "SELECT * FROM pgnotify.notifications WHERE id = $1"

# show_timeline: notification $1's steps in order (queued, then its events), for `show`.
SHOW_TIMELINE = """
SELECT event, attempt, worker, provider, duration_ms, error_code, error, at
FROM pgnotify.processing_timeline WHERE notification_id = $1 ORDER BY at, seq
"""

# events_cursor: the newest event id now, where `tail` starts.
EVENTS_CURSOR = "SELECT coalesce(max(id), 0) FROM pgnotify.events"

# events_after: up to $2 events with an id above $1, oldest first, with their channel (`tail`;
# a claim writes no event: an outcome says when its attempt was claimed).
EVENTS_AFTER = """
SELECT e.id, e.notification_id, n.channel, e.event, e.attempt, e.provider, e.duration_ms,
       e.error_code, e.error, e.created_at, e.claimed_at
FROM pgnotify.events e JOIN pgnotify.notifications n ON n.id = e.notification_id
WHERE e.id > $1 ORDER BY e.id LIMIT $2
"""

# outcome: notification $1's status, attempts, provider and last error (`send-test` waits on it).
OUTCOME = """
SELECT status, attempts, provider, last_error FROM pgnotify.notifications WHERE id = $1
"""

# replay_candidates: up to $5 rows in statuses $1 (channel $2, category $3, updated since $4; NULL
# = any), lowest id first: what `replay` would requeue (its --dry-run).
REPLAY_CANDIDATES = """
SELECT id, channel, category, status, updated_at, last_error FROM pgnotify.notifications
WHERE status = ANY($1::text[]) AND ($2::text IS NULL OR channel = $2)
  AND ($3::text IS NULL OR category = $3) AND ($4::timestamptz IS NULL OR updated_at >= $4)
ORDER BY id LIMIT $5
"""

# replay: requeue the rows replay_candidates selects through pgnotify.retry (fresh attempt budget,
# a replayed event, a wake-up); returns each id and whether it was requeued.
REPLAY = """
SELECT m.id, pgnotify.retry(m.id) AS requeued FROM (
    SELECT id FROM pgnotify.notifications
    WHERE status = ANY($1::text[]) AND ($2::text IS NULL OR channel = $2)
      AND ($3::text IS NULL OR category = $3) AND ($4::timestamptz IS NULL OR updated_at >= $4)
    ORDER BY id LIMIT $5
) m ORDER BY m.id
"""

# purge_preview: rows per status that retention would delete now, keeping finished rows for $1
# and failed/dead ones for $2 (the rule of pgnotify.apply_retention).
PURGE_PREVIEW = """
SELECT status, count(*) AS rows FROM pgnotify.notifications
WHERE (status IN ('sent', 'cancelled', 'skipped', 'digested', 'expired')
       AND updated_at < now() - $1::interval)
   OR (status IN ('dead', 'failed') AND updated_at < now() - $2::interval)
GROUP BY status ORDER BY status
"""

# purge_preview_runs: finished workflow runs retention would delete now (the rule of
# pgnotify.purge_workflow_runs, schema 0024): completed and cancelled ones finished before now - $1,
# failed ones before now - $2, and none with a notification that the notifications' pass before
# it would keep (PURGE_PREVIEW's rule).
PURGE_PREVIEW_RUNS = """
SELECT count(*) FROM pgnotify.workflow_runs r
WHERE ((r.status IN ('completed', 'cancelled') AND r.finished_at < now() - $1::interval)
    OR (r.status = 'failed' AND r.finished_at < now() - $2::interval))
  AND NOT EXISTS (
      SELECT 1 FROM pgnotify.workflow_run_steps s
      JOIN pgnotify.notifications n ON n.id = s.notification_id
      WHERE s.run_id = r.id
        AND NOT coalesce((n.status IN ('sent', 'cancelled', 'skipped', 'digested', 'expired')
                          AND n.updated_at < now() - $1::interval)
                      OR (n.status IN ('dead', 'failed') AND n.updated_at < now() - $2::interval),
                      false))
"""

# purge: run retention now (batches of 5,000, each committed; a NOTICE per batch with its count,
# then one per dropped day partition of events).
PURGE = "CALL pgnotify.apply_retention(keep => $1, keep_dead => $2)"

# mark_real: a worker with a real provider serves channels $1 now (dev sinks leave older rows).
MARK_REAL = """
INSERT INTO pgnotify.delivery_modes AS m (channel, real_seen_at)
SELECT unnest($1::text[]), now()
ON CONFLICT (channel) DO UPDATE SET real_seen_at = greatest(m.real_seen_at, excluded.real_seen_at)
"""

# real_seen: the last time a real provider served each of channels $1 (dev-sink claim floors).
REAL_SEEN = """
SELECT channel, real_seen_at FROM pgnotify.delivery_modes WHERE channel = ANY ($1::text[])
"""

# channel_health: worker $1 (version $5) can (or cannot) send channels $2 (sendable $3) for $4
# seconds.
CHANNEL_HEALTH = """
WITH stale AS (
    DELETE FROM pgnotify.channel_health WHERE ctid IN (
        SELECT ctid FROM pgnotify.channel_health
        WHERE valid_until < now() - interval '1 hour' AND worker <> $1
        FOR UPDATE SKIP LOCKED)
)
INSERT INTO pgnotify.channel_health AS h (channel, worker, sendable, seen_at, valid_until, version)
SELECT c.channel, $1, c.sendable, now(), now() + make_interval(secs => $4), $5
FROM unnest($2::text[], $3::boolean[]) AS c(channel, sendable)
ON CONFLICT (channel, worker) DO UPDATE
SET sendable = excluded.sendable, seen_at = excluded.seen_at, valid_until = excluded.valid_until,
    version = excluded.version
"""

# --- admin console (adapters/console): read by the console pages, written by admin actions -----
# The list filters, the same in each console_list/bulk statement: status $1, channel $2,
# category $3, q $4 (a recipient or a user id) or q as an id $5; NULL = any. Run with custom plans
# (CONSOLE_CUSTOM_PLANS) so a NULL filter folds away and each filter becomes an index scan
# (schema 0020's indexes).

# console_custom_plans: plan each console statement for its parameters (NULL filters fold away).
CONSOLE_CUSTOM_PLANS = "SELECT set_config('plan_cache_mode', 'force_custom_plan', true)"

# console_list: up to $7 notifications matching the filters, newest first, below id $6 (keyset).
CONSOLE_LIST = """
SELECT n.id, n.channel, n.recipient, n.user_id, n.category, n.template, n.status, n.attempts,
       n.max_attempts, n.created_at, n.updated_at, n.last_error
FROM pgnotify.notifications n
WHERE ($6::bigint IS NULL OR n.id < $6) AND
      ($1::text IS NULL OR n.status = $1) AND ($2::text IS NULL OR n.channel = $2)
  AND ($3::text IS NULL OR n.category = $3)
  AND ($4::text IS NULL OR n.recipient = $4 OR n.user_id = $4 OR n.id = $5::bigint)
ORDER BY n.id DESC LIMIT $7
"""

# console_bulk_preview: how many rows match the filters and are in statuses $6 (at most $7 + 1
# counted), and the highest id among them: the confirmation acts on ids up to it only.
CONSOLE_BULK_PREVIEW = """
SELECT count(*) AS rows, max(id) AS max_id FROM (
    SELECT n.id FROM pgnotify.notifications n
    WHERE n.status = ANY($6::text[]) AND
      ($1::text IS NULL OR n.status = $1) AND ($2::text IS NULL OR n.channel = $2)
  AND ($3::text IS NULL OR n.category = $3)
  AND ($4::text IS NULL OR n.recipient = $4 OR n.user_id = $4 OR n.id = $5::bigint)
    LIMIT $7 + 1
) m
"""

# console_bulk_cancel: cancel the rows matching the filters with ids up to $6 that can still be
# cancelled (queued, scheduled, held: pgnotify.cancel's rule), each with an event naming who ($7,
# detail $8).
CONSOLE_BULK_CANCEL = """
WITH done AS (
    UPDATE pgnotify.notifications n SET status = 'cancelled', updated_at = now()
    WHERE n.id <= $6 AND n.status IN ('queued', 'scheduled', 'held') AND
      ($1::text IS NULL OR n.status = $1) AND ($2::text IS NULL OR n.channel = $2)
  AND ($3::text IS NULL OR n.category = $3)
  AND ($4::text IS NULL OR n.recipient = $4 OR n.user_id = $4 OR n.id = $5::bigint)
    RETURNING n.id
), logged AS (
    INSERT INTO pgnotify.events (notification_id, event, worker, detail)
    SELECT id, 'cancelled', $7, $8::jsonb FROM done
)
SELECT count(*) FROM done
"""

# console_bulk_retry: requeue the failed and dead rows matching the filters with ids up to $6
# (pgnotify.retry's rule: a fresh attempt budget), each with an event naming who ($7, detail
# $8), and wake the workers of their channels.
CONSOLE_BULK_RETRY = """
WITH done AS (
    UPDATE pgnotify.notifications n
    SET status = 'queued', attempts = 0, run_at = now(), updated_at = now()
    WHERE n.id <= $6 AND n.status IN ('failed', 'dead') AND
      ($1::text IS NULL OR n.status = $1) AND ($2::text IS NULL OR n.channel = $2)
  AND ($3::text IS NULL OR n.category = $3)
  AND ($4::text IS NULL OR n.recipient = $4 OR n.user_id = $4 OR n.id = $5::bigint)
    RETURNING n.id, n.channel
), logged AS (
    INSERT INTO pgnotify.events (notification_id, event, worker, detail)
    SELECT id, 'replayed', $7, $8::jsonb FROM done
)
SELECT (SELECT count(*) FROM done) AS rows,
       (SELECT count(pg_notify('pgnotify', c)) FROM (SELECT DISTINCT channel AS c FROM done) w)
           AS woken
"""

# console_retry: requeue notification $1 if failed or dead (pgnotify.retry's rule), with an event
# naming who ($2, detail $3), and wake its channel's workers; returns its id when done.
CONSOLE_RETRY = """
WITH done AS (
    UPDATE pgnotify.notifications n
    SET status = 'queued', attempts = 0, run_at = now(), updated_at = now()
    WHERE n.id = $1 AND n.status IN ('failed', 'dead')
    RETURNING n.id, n.channel
), logged AS (
    INSERT INTO pgnotify.events (notification_id, event, worker, detail)
    SELECT id, 'replayed', $2, $3::jsonb FROM done
)
SELECT id, pg_notify('pgnotify', channel) AS woken FROM done
"""

# console_cancel: cancel notification $1 if queued, scheduled or held (pgnotify.cancel's rule),
# with an event naming who ($2, detail $3); returns its id when done.
CONSOLE_CANCEL = """
WITH done AS (
    UPDATE pgnotify.notifications n SET status = 'cancelled', updated_at = now()
    WHERE n.id = $1 AND n.status IN ('queued', 'scheduled', 'held')
    RETURNING n.id
), logged AS (
    INSERT INTO pgnotify.events (notification_id, event, worker, detail)
    SELECT id, 'cancelled', $2, $3::jsonb FROM done
)
SELECT id FROM done
"""

# console_audit: an admin action not about one notification (notification_id 0): event $1,
# who $2, detail $3.
CONSOLE_AUDIT = """
INSERT INTO pgnotify.events (notification_id, event, worker, detail) VALUES (0, $1, $2, $3::jsonb)
"""

# console_notification: every column of notification $1, timestamps as they are.
CONSOLE_NOTIFICATION = """
SELECT n.*, n.payload::text AS payload_text FROM pgnotify.notifications n WHERE n.id = $1
"""

# console_events: notification $1's events in order, with their detail (provider answers).
CONSOLE_EVENTS = """
SELECT id, event, attempt, worker, provider, duration_ms, error_code, error, detail::text AS detail,
       created_at
FROM pgnotify.events WHERE notification_id = $1 ORDER BY id
"""

# console_throughput: sent and failed (failed or dead) rows per minute over the last hour, by
# minutes ago (0 = this minute).
CONSOLE_THROUGHPUT = """
SELECT (extract(epoch FROM date_trunc('minute', now()) - date_trunc('minute', updated_at))
        / 60)::int AS minutes_ago,
       count(*) FILTER (WHERE status = 'sent') AS sent,
       count(*) FILTER (WHERE status IN ('failed', 'dead')) AS failed
FROM pgnotify.notifications
WHERE status IN ('sent', 'failed', 'dead')
  AND updated_at >= date_trunc('minute', now()) - interval '59 minutes'
GROUP BY 1
"""

# console_workers: workers that reported within the last hour, with version and last heartbeat.
CONSOLE_WORKERS = """
SELECT worker, max(version) AS version, max(seen_at) AS last_seen,
       bool_or(valid_until > now()) AS alive,
       array_agg(channel ORDER BY channel) FILTER (WHERE sendable) AS sending,
       extract(epoch FROM now() - max(seen_at))::float8 AS seconds_ago
FROM pgnotify.channel_health
WHERE seen_at > now() - interval '1 hour'
GROUP BY worker ORDER BY max(seen_at) DESC LIMIT 100
"""

# console_paused: the paused channels.
CONSOLE_PAUSED = """
SELECT channel, reason, paused_by, paused_at FROM pgnotify.paused_channels ORDER BY channel
"""

# console_pause: pause channel $1 (reason $2, by $3) with pgnotify.pause_channel.
CONSOLE_PAUSE = "SELECT pgnotify.pause_channel($1, $2, $3)"

# console_resume: resume channel $1 (by $2) with pgnotify.resume_channel.
CONSOLE_RESUME = "SELECT pgnotify.resume_channel($1, $2)"

# console_destinations: destinations failing or disabled, newest failure first.
CONSOLE_DESTINATIONS = """
SELECT origin, failing_since, last_failure_at, last_error, pauses, disabled_at, disabled_reason
FROM pgnotify.destinations ORDER BY last_failure_at DESC LIMIT 100
"""

# console_jobs: every periodic job with its last run's outcome.
CONSOLE_JOBS = """
SELECT j.name, j.schedule, j.timezone, j.enabled, j.next_run_at, j.last_started_at,
       j.last_finished_at, j.last_status, j.consecutive_failures, r.rows_affected, r.error
FROM pgnotify.jobs j
LEFT JOIN LATERAL (
    SELECT rows_affected, error FROM pgnotify.job_runs WHERE job_name = j.name
    ORDER BY id DESC LIMIT 1
) r ON true
ORDER BY j.name
"""

# console_run_job: make enabled job $1 due now (one replica runs it at its next look).
CONSOLE_RUN_JOB = """
UPDATE pgnotify.jobs SET next_run_at = now() WHERE name = $1 AND enabled RETURNING name
"""

# console_dead_letters: failed and dead rows grouped by channel and last error, biggest first.
CONSOLE_DEAD_LETTERS = """
SELECT channel, coalesce(last_error, '') AS error, count(*) AS rows, max(id) AS max_id,
       max(updated_at) AS last_at
FROM pgnotify.notifications WHERE status IN ('failed', 'dead')
GROUP BY 1, 2 ORDER BY count(*) DESC, max(updated_at) DESC LIMIT 100
"""

# console_retry_error: requeue the failed and dead rows of channel $1 with last error $2 ('' =
# none) and ids up to $3, each with an event naming who ($4, detail $5); wakes the channel.
CONSOLE_RETRY_ERROR = """
WITH done AS (
    UPDATE pgnotify.notifications n
    SET status = 'queued', attempts = 0, run_at = now(), updated_at = now()
    WHERE n.status IN ('failed', 'dead') AND n.channel = $1
      AND coalesce(n.last_error, '') = $2 AND n.id <= $3
    RETURNING n.id
), logged AS (
    INSERT INTO pgnotify.events (notification_id, event, worker, detail)
    SELECT id, 'replayed', $4, $5::jsonb FROM done
)
SELECT (SELECT count(*) FROM done) AS rows, pg_notify('pgnotify', $1) AS woken
"""

# console_templates: each template (key, channel, locale) with its newest version.
CONSOLE_TEMPLATES = """
SELECT key, channel, locale, max(version) AS version, count(*) AS versions,
       max(created_at) AS updated_at
FROM pgnotify.templates GROUP BY key, channel, locale ORDER BY key, channel, locale LIMIT 500
"""

# console_template_versions: every version of template $1, newest first.
CONSOLE_TEMPLATE_VERSIONS = """
SELECT key, channel, locale, version, subject, body, html_body, created_at
FROM pgnotify.templates WHERE key = $1 ORDER BY channel, locale, version DESC
"""

# console_contact: user $1's contact row.
CONSOLE_CONTACT = """
SELECT user_id, email, phone, locale, timezone, webhook_url, quiet_start, quiet_end,
       unsubscribed_at, updated_at
FROM pgnotify.contacts WHERE user_id = $1
"""

# console_devices: user $1's push devices, active first.
CONSOLE_DEVICES = """
SELECT id, platform, token, active, last_seen_at, deactivated_at, deactivation_reason
FROM pgnotify.devices WHERE user_id = $1 ORDER BY active DESC, id DESC LIMIT 100
"""

# console_preferences: user $1's preferences.
CONSOLE_PREFERENCES = """
SELECT channel, category, setting, source, updated_at FROM pgnotify.preferences
WHERE user_id = $1 ORDER BY channel, category
"""

# console_consents: user $1's consents.
CONSOLE_CONSENTS = """
SELECT category, granted, source, recorded_at FROM pgnotify.consents
WHERE user_id = $1 ORDER BY category
"""

# console_suppressions: suppressions of addresses $1 (the user's contact addresses).
CONSOLE_SUPPRESSIONS = """
SELECT channel, address, reason, source, created_at FROM pgnotify.suppressions
WHERE address = ANY($1::text[]) ORDER BY created_at DESC
"""

# --- inbox feed (adapters/inbox_http.py): every statement names the token's user in $1 ---------
# One statement per filter (not `$x IS NULL OR ...`): a generic plan must still pick the index
# that keeps a million-row user's page O(page).

# inbox_page: user $1's messages not archived, newest first, below id $2, $3 of them.
INBOX_PAGE = """
SELECT id, seq, notification_id, category, title, body, data, created_at,
       read_at, seen_at, archived_at
FROM pgnotify.inbox
WHERE user_id = $1 AND id < $2 AND archived_at IS NULL
ORDER BY id DESC
LIMIT $3
"""

# inbox_page_category: as inbox_page, in category $4 only.
INBOX_PAGE_CATEGORY = """
SELECT id, seq, notification_id, category, title, body, data, created_at,
       read_at, seen_at, archived_at
FROM pgnotify.inbox
WHERE user_id = $1 AND id < $2 AND archived_at IS NULL AND category = $4
ORDER BY id DESC
LIMIT $3
"""

# inbox_page_archived: user $1's archived messages, newest first, below id $2, $3 of them.
INBOX_PAGE_ARCHIVED = """
SELECT id, seq, notification_id, category, title, body, data, created_at,
       read_at, seen_at, archived_at
FROM pgnotify.inbox
WHERE user_id = $1 AND id < $2 AND archived_at IS NOT NULL
ORDER BY id DESC
LIMIT $3
"""

# inbox_page_archived_category: as inbox_page_archived, in category $4 only.
INBOX_PAGE_ARCHIVED_CATEGORY = """
SELECT id, seq, notification_id, category, title, body, data, created_at,
       read_at, seen_at, archived_at
FROM pgnotify.inbox
WHERE user_id = $1 AND id < $2 AND archived_at IS NOT NULL AND category = $4
ORDER BY id DESC
LIMIT $3
"""

# inbox_page_any: user $1's messages archived or not, newest first, below id $2, $3 of them.
INBOX_PAGE_ANY = """
SELECT id, seq, notification_id, category, title, body, data, created_at,
       read_at, seen_at, archived_at
FROM pgnotify.inbox
WHERE user_id = $1 AND id < $2
ORDER BY id DESC
LIMIT $3
"""

# inbox_page_any_category: as inbox_page_any, in category $4 only.
INBOX_PAGE_ANY_CATEGORY = """
SELECT id, seq, notification_id, category, title, body, data, created_at,
       read_at, seen_at, archived_at
FROM pgnotify.inbox
WHERE user_id = $1 AND id < $2 AND category = $4
ORDER BY id DESC
LIMIT $3
"""

# inbox_counts: user $1's total, unread and unseen counts (kept by triggers, schema 0016).
INBOX_COUNTS = """
SELECT coalesce(max(total), 0) AS total, coalesce(max(unread), 0) AS unread,
       coalesce(max(unseen), 0) AS unseen
FROM pgnotify.inbox_counts WHERE user_id = $1
"""

# inbox_counts_many: the counts of users $1 (for the live feed's fan-out).
INBOX_COUNTS_MANY = """
SELECT user_id, total, unread, unseen FROM pgnotify.inbox_counts WHERE user_id = ANY ($1::text[])
"""

# inbox_rows: the inbox rows $1 (the live feed fetches new rows it was told of by NOTIFY).
INBOX_ROWS = """
SELECT user_id, id, seq, notification_id, category, title, body, data, created_at,
       read_at, seen_at, archived_at
FROM pgnotify.inbox
WHERE id = ANY ($1::bigint[])
ORDER BY seq
"""

# inbox_since: user $1's rows changed or added after seq $2 (Last-Event-ID), oldest first, $3.
INBOX_SINCE = """
SELECT id, seq, notification_id, category, title, body, data, created_at,
       read_at, seen_at, archived_at
FROM pgnotify.inbox
WHERE user_id = $1 AND seq > $2
ORDER BY seq
LIMIT $3
"""

# inbox_feed_batch: for each user $1[i], their rows added or changed after seq $2[i], oldest
# first, at most $3 per user (one statement for a whole batch of NOTIFYs).
INBOX_FEED_BATCH = """
SELECT u.user_id, r.id, r.seq, r.notification_id, r.category, r.title, r.body, r.data,
       r.created_at, r.read_at, r.seen_at, r.archived_at
FROM unnest($1::text[], $2::bigint[]) AS u(user_id, after)
CROSS JOIN LATERAL (
    SELECT i.id, i.seq, i.notification_id, i.category, i.title, i.body, i.data, i.created_at,
           i.read_at, i.seen_at, i.archived_at
    FROM pgnotify.inbox i
    WHERE i.user_id = u.user_id AND i.seq > u.after
    ORDER BY i.seq
    LIMIT $3
) AS r
ORDER BY r.seq
"""

# inbox_latest_seq: the highest seq of user $1's rows (where a fresh stream starts).
INBOX_LATEST_SEQ = """
SELECT coalesce(max(seq), 0) FROM pgnotify.inbox WHERE user_id = $1
"""


def _inbox_change(assign: str, where: str) -> str:
    """Change some of user $1's inbox rows and count them. The rows are locked in id order first,
    so that two such statements for one user (two tabs: "mark all read" and "archive all") wait
    for each other instead of deadlocking, whatever index each statement reads them through.
    `assign` and `where` are this module's constants, never input."""
    return f"""
WITH target AS (
    SELECT id FROM pgnotify.inbox WHERE user_id = $1 AND {where} ORDER BY id FOR UPDATE
), m AS (
    UPDATE pgnotify.inbox i SET {assign} FROM target WHERE i.id = target.id RETURNING 1
)
SELECT count(*) FROM m
"""  # noqa: S608


# inbox_read: mark user $1's messages $2 read; returns how many changed.
INBOX_READ = _inbox_change("read_at = now()", "id = ANY ($2::bigint[]) AND read_at IS NULL")

# inbox_read_all: mark every unread, unarchived message of user $1 read.
INBOX_READ_ALL = _inbox_change("read_at = now()", "read_at IS NULL AND archived_at IS NULL")

# inbox_unread: mark user $1's messages $2 unread again.
INBOX_UNREAD = _inbox_change("read_at = NULL", "id = ANY ($2::bigint[]) AND read_at IS NOT NULL")

# inbox_seen: mark user $1's messages $2 seen.
INBOX_SEEN = _inbox_change("seen_at = now()", "id = ANY ($2::bigint[]) AND seen_at IS NULL")

# inbox_seen_all: mark every unseen, unarchived message of user $1 seen.
INBOX_SEEN_ALL = _inbox_change("seen_at = now()", "seen_at IS NULL AND archived_at IS NULL")

# inbox_archive: archive user $1's messages $2.
INBOX_ARCHIVE = _inbox_change(
    "archived_at = now()", "id = ANY ($2::bigint[]) AND archived_at IS NULL"
)

# inbox_archive_all: archive every message of user $1 not archived yet.
INBOX_ARCHIVE_ALL = _inbox_change("archived_at = now()", "archived_at IS NULL")

# inbox_unarchive: bring user $1's messages $2 back from the archive.
INBOX_UNARCHIVE = _inbox_change(
    "archived_at = NULL", "id = ANY ($2::bigint[]) AND archived_at IS NOT NULL"
)

# wf_claim: lock up to $2 of the most overdue running workflow runs (due at the database's now,
# or $1 when a test stands in for the clock), with their definitions, the recipient's time zone
# and that now; runs other workers hold are skipped.
WF_CLAIM = """
SELECT r.id, r.workflow, r.version, r.user_id, r.payload, r.current_step, w.category,
       r.evaluations, coalesce(c.timezone, 'UTC') AS timezone,
       coalesce($1::timestamptz, now()) AS db_now,
       (SELECT jsonb_agg(jsonb_strip_nulls(jsonb_build_object('name', s.name, 'kind', s.kind,
               'channel', s.channel, 'template', s.template)) || s.settings ORDER BY s.position)
        FROM pgnotify.workflow_steps s
        WHERE s.workflow = r.workflow AND s.version = r.version) AS steps
FROM pgnotify.workflow_runs r
JOIN pgnotify.workflows w ON w.name = r.workflow AND w.version = r.version
LEFT JOIN pgnotify.contacts c ON c.user_id = r.user_id
WHERE r.status = 'running' AND r.next_at <= coalesce($1::timestamptz, now())
ORDER BY r.next_at, r.id
LIMIT $2
FOR UPDATE OF r SKIP LOCKED
"""

# wf_facts: what run $1's steps did so far, with their notifications' status, read state and
# provider events (delivered, clicked, bounced ...); a send folded into a batching window
# (hold batch, now digested) answers with the notification that carried it.
WF_FACTS = """
SELECT s.step, s.outcome, n.status, n.channel, i.read_at IS NOT NULL AS read,
       coalesce((SELECT array_agg(DISTINCT e.event) FROM pgnotify.events e
                 WHERE e.notification_id = n.id), '{}') AS events
FROM pgnotify.workflow_run_steps s
LEFT JOIN pgnotify.notifications made ON made.id = s.notification_id
LEFT JOIN pgnotify.notifications n
       ON n.id = CASE WHEN made.hold = 'batch' AND made.status = 'digested'
                      THEN made.digest_id ELSE made.id END
LEFT JOIN pgnotify.inbox i ON i.notification_id = n.id
WHERE s.run_id = $1 AND s.kind = 'send'
"""

# wf_preference: user $1's setting for channel $2 and category $3 (immediate/daily/weekly/off).
WF_PREFERENCE = "SELECT pgnotify.preference_of($1, $2, $3)"

# wf_send: a run step's notification to user $2 on channel $3, at the address they have there,
# under the deterministic key $1 (a repeat makes nothing); no row when they have no address.
WF_SEND = """
INSERT INTO pgnotify.notifications AS n (channel, recipient, user_id, category, template,
    subject, body, html_body, locale, payload, priority, idempotency_key)
SELECT $3, t.recipient, $2, $4, $5, $6, $7, $8,
       (SELECT c.locale FROM pgnotify.contacts c WHERE c.user_id = $2), $9::jsonb, $10, $1
FROM (SELECT pgnotify.address_of($2, $3) AS recipient) t
WHERE t.recipient IS NOT NULL
ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
RETURNING n.id, n.status
"""

# wf_fold: notification $1 of a batched send step joins its window (scope $2, key $3, window $4
# seconds, $5 items); when the window closes.
WF_FOLD = "SELECT pgnotify.workflow_fold($1, $2, $3, $4, $5)"

# wf_sent_before: the notification already made under key $1 (a step repeated after a crash).
WF_SENT_BEFORE = "SELECT id, status FROM pgnotify.notifications WHERE idempotency_key = $1"

# wf_record: what step $2 (kind $3) of run $1 did ($4, $5, notification $6), by worker $7; once.
WF_RECORD = """
INSERT INTO pgnotify.workflow_run_steps (run_id, step, kind, outcome, detail, notification_id,
                                         worker)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (run_id, step) DO NOTHING
"""

# wf_move: run $1 goes on at step $2 at $3 (waiting on $6: delay, send or NULL), or ends ($4 not
# running) with reason $5.
WF_MOVE = """
UPDATE pgnotify.workflow_runs
SET current_step = $2, next_at = $3, status = $4, reason = $5, updated_at = now(),
    evaluations = evaluations + 1, waiting_on = $6::text,
    finished_at = CASE WHEN $4 = 'running' THEN NULL ELSE now() END
WHERE id = $1
"""

# wf_cancel: cancel run $1 with reason $2 (and its notifications not sent yet).
WF_CANCEL = "SELECT pgnotify.cancel_run($1::bigint, $2::text)"

# status_notify: the pgnotify.status_notify setting this session sees (schema 0027; null when
# unset) and whether its status changes and provider reports are announced by NOTIFY
# pgnotify_status.
STATUS_NOTIFY = """
SELECT nullif(current_setting('pgnotify.status_notify', true), '') AS setting,
       pgnotify.status_notify_enabled() AS enabled
"""

# workflow_status: running workflow runs by what they wait for (due now, a delay, a send to
# settle), how long the most overdue one has been due, and the open batching windows. The
# running runs are read through workflow_runs_due_idx (partial: finished runs cost nothing).
WORKFLOW_STATUS = """
SELECT count(*) FILTER (WHERE r.next_at <= now()) AS due,
       count(*) FILTER (WHERE r.next_at > now() AND r.waiting_on IS DISTINCT FROM 'send')
           AS delayed,
       count(*) FILTER (WHERE r.next_at > now() AND r.waiting_on = 'send') AS waiting_send,
       coalesce(extract(epoch FROM now() - min(r.next_at) FILTER (WHERE r.next_at <= now())),
                0)::float8 AS oldest_overdue_seconds,
       (SELECT count(*) FROM pgnotify.batches b WHERE b.closed_at IS NULL) AS batch_windows_open
FROM pgnotify.workflow_runs r
WHERE r.status = 'running'
"""

# wf_next_due: seconds until the earliest running workflow run is due (NULL: none).
WF_NEXT_DUE = """
SELECT extract(epoch FROM min(next_at) - now())::float8 FROM pgnotify.workflow_runs
WHERE status = 'running'
"""
# preference_categories: what user $1 may choose per category (pgnotify's own categories left
# out): flags, the category's channels and the effective setting on each, and the consent.
PREFERENCE_CATEGORIES = """
SELECT c.name, c.description, c.critical, c.requires_consent, c.channels,
       ARRAY(SELECT pgnotify.preference_of($1, ch, c.name) FROM unnest(c.channels) ch) AS settings,
       (SELECT s.granted FROM pgnotify.consents s WHERE s.user_id = $1 AND s.category = c.name)
           AS consent
FROM pgnotify.categories c
WHERE c.name NOT IN ('pgnotify_status', 'system_alert')
ORDER BY c.critical DESC, c.name
"""

# preference_contact: user $1's time zone, quiet hours and global unsubscribe (no addresses).
PREFERENCE_CONTACT = """
SELECT timezone, to_char(quiet_start, 'HH24:MI') AS quiet_start,
       to_char(quiet_end, 'HH24:MI') AS quiet_end, unsubscribed_at IS NOT NULL AS unsubscribed
FROM pgnotify.contacts WHERE user_id = $1
"""

# save_preferences: apply changes $2 (jsonb) to user $1's preferences from source $3, recorded in
# preference_history; critical categories refused. Returns the number of changes.
SAVE_PREFERENCES = """
SELECT pgnotify.save_preferences($1, $2::jsonb, $3)
"""


ALL = {
    name: value
    for name, value in dict(globals()).items()
    if name.isupper() and isinstance(value, str) and not name.startswith("_")
}


def digest_job(period: str, hour: int, weekday: int) -> str:
    """The stored command of a built-in digest job (text kept in pgnotify.jobs.command, so it
    is data, not a statement we run with parameters); only known words and integers go in."""
    if period not in ("daily", "weekly"):
        raise ValueError(f"unknown digest period {period!r}")
    return f"SELECT pgnotify.build_digests('{period}', now(), {int(hour)}, {int(weekday)})"
