"""Every SQL statement the worker runs, each with a one-line comment. Parameters only, never
string formatting. Tests prepare each of them against a freshly migrated database."""

from __future__ import annotations

# claim: lease up to $2 ready rows of channel $1 to worker $3 for $4 seconds, in claim order,
# skipping rows other workers hold, and log a claimed event per row; with $5, only rows created
# after it (a dev sink never takes what was enqueued while a real provider served the channel).
# Producer-set timestamps come back as epoch seconds and the payload as text, so one row the
# driver could not decode (a date out of Python's range, JSON nested too deep) fails alone
# instead of failing the whole batch.
CLAIM = """
WITH ready AS (
    SELECT id FROM pgnotify.notifications
    WHERE status = 'queued' AND channel = $1 AND run_at <= now()
      AND ($5::timestamptz IS NULL OR created_at > $5)
    ORDER BY priority DESC, run_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE pgnotify.notifications n
    SET status = 'processing', attempts = n.attempts + 1, locked_by = $3,
        locked_until = now() + make_interval(secs => $4), updated_at = now()
    FROM ready WHERE n.id = ready.id
    RETURNING n.id, n.uid::text AS uid, n.channel, n.recipient, n.user_id, n.category,
           n.template, n.subject, n.body, n.html_body, n.locale, n.payload::text AS payload,
           n.priority, n.attempts, n.max_attempts,
           extract(epoch FROM n.created_at)::float8 AS created_at, n.run_at,
           extract(epoch FROM n.expires_at)::float8 AS expires_at, n.digest_of, n.traceparent
), logged AS (
    INSERT INTO pgnotify.events (notification_id, event, attempt, worker)
    SELECT id, 'claimed', attempts, $3 FROM claimed
)
SELECT id, uid, channel, recipient, user_id, category, template, subject, body, html_body,
       locale, payload, priority, attempts, max_attempts, created_at, expires_at, digest_of,
       traceparent, now() AS claimed_at
FROM claimed
ORDER BY priority DESC, run_at, id
"""

# complete: write many outcomes in one statement, each only while worker $1 still holds that
# row's lease for that attempt (fenced), with one event per written outcome.
COMPLETE = """
WITH r AS (
    SELECT * FROM unnest($2::bigint[], $3::int[], $4::text[], $5::text[], $6::float8[],
                         $7::text[], $8::text[], $9::text[], $10::text[], $11::real[], $12::int[],
                         $13::int[], $14::text[])
        AS r(id, attempt, status, event, delay, error_code, error, provider,
             provider_message_id, duration_ms, template_version, refund, hold)
), done AS (
    UPDATE pgnotify.notifications n
    SET status = r.status,
        attempts = n.attempts - r.refund,
        hold = CASE WHEN r.status = 'held' THEN r.hold ELSE n.hold END,
        held_at = CASE WHEN r.status = 'held' THEN now() ELSE n.held_at END,
        run_at = CASE WHEN r.status = 'scheduled'
                      THEN now() + make_interval(secs => r.delay) ELSE n.run_at END,
        locked_by = NULL,
        locked_until = NULL,
        last_error = CASE WHEN r.status = 'sent' THEN NULL ELSE coalesce(r.error, n.last_error) END,
        provider = coalesce(r.provider, n.provider),
        provider_message_id = coalesce(r.provider_message_id, n.provider_message_id),
        template_version = coalesce(r.template_version, n.template_version),
        sent_at = CASE WHEN r.status = 'sent' THEN now() ELSE n.sent_at END,
        updated_at = now()
    FROM r
    WHERE n.id = r.id AND n.attempts = r.attempt AND n.locked_by = $1 AND n.status = 'processing'
    RETURNING n.id, n.run_at, n.status
), logged AS (
    INSERT INTO pgnotify.events (notification_id, event, attempt, worker, provider, duration_ms,
                                 error_code, error, detail)
    SELECT r.id, r.event, r.attempt, $1, r.provider, r.duration_ms, r.error_code, r.error,
           CASE WHEN done.status = 'scheduled' THEN jsonb_build_object('retry_at', done.run_at)
                WHEN done.status = 'held' THEN jsonb_build_object('digest', r.hold) END
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
      AND locked_by = $1 AND status = 'processing'
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
      AND n.locked_by = $1 AND n.status = 'processing'
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
       (now() AT TIME ZONE coalesce(c.timezone, 'UTC'))::time AS local_time
FROM unnest($1::bigint[], $2::text[]) AS x(id, address)
JOIN pgnotify.notifications n ON n.id = x.id
LEFT JOIN pgnotify.contacts c ON c.user_id = n.user_id
LEFT JOIN pgnotify.categories cat ON cat.name = n.category
LEFT JOIN pgnotify.consents co ON co.user_id = n.user_id AND co.category = n.category
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

# events_after: up to $2 events with an id above $1, oldest first, with their channel (`tail`).
EVENTS_AFTER = """
SELECT e.id, e.notification_id, n.channel, e.event, e.attempt, e.provider, e.duration_ms,
       e.error_code, e.error, e.created_at
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

# channel_health: worker $1 can (or cannot) send channels $2 (sendable $3) for $4 seconds.
CHANNEL_HEALTH = """
WITH stale AS (
    DELETE FROM pgnotify.channel_health WHERE ctid IN (
        SELECT ctid FROM pgnotify.channel_health
        WHERE valid_until < now() - interval '1 hour' AND worker <> $1
        FOR UPDATE SKIP LOCKED)
)
INSERT INTO pgnotify.channel_health AS h (channel, worker, sendable, seen_at, valid_until)
SELECT c.channel, $1, c.sendable, now(), now() + make_interval(secs => $4)
FROM unnest($2::text[], $3::boolean[]) AS c(channel, sendable)
ON CONFLICT (channel, worker) DO UPDATE
SET sendable = excluded.sendable, seen_at = excluded.seen_at, valid_until = excluded.valid_until
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
