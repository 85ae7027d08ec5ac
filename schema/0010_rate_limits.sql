-- pgnotify-worker migration 0010: provider rate limits shared by every replica. A provider's
-- limit is its account's, not a pod's: one row per limited provider holds a token bucket
-- (refilled by elapsed database time) and a pause (a 429's Retry-After) that every replica's
-- claim loop obeys. The worker upserts the configured rates at start. The table is UNLOGGED:
-- taking tokens commits without waiting for a WAL flush (half the cost of the extra statement
-- per claim batch with fsync on), and what a crash loses is only a bucket's balance and a pause:
-- take_tokens recreates a missing row from the rate the worker passes (a standby starts empty).
-- Idempotent: does nothing when version 10 is recorded.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 10) THEN
    RAISE NOTICE 'pgnotify migration 10 (rate_limits) is already applied';
    RETURN;
END IF;

CREATE UNLOGGED TABLE pgnotify.provider_limits (
    provider     text PRIMARY KEY,
    rate         float8 NOT NULL CONSTRAINT provider_limits_rate_positive CHECK (rate > 0),
    burst        float8 NOT NULL CONSTRAINT provider_limits_burst_at_least_1 CHECK (burst >= 1),
    tokens       float8 NOT NULL,  -- the balance at refilled_at (negative: reserved ahead)
    refilled_at  timestamptz NOT NULL DEFAULT now(),  -- may lie ahead: nothing refills before
    paused_until timestamptz,  -- a 429's Retry-After: no replica sends before this
    pause_reason text,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgnotify.provider_limits IS
    'Token bucket and pause per rate-limited provider, shared by all replicas (rows are upserted '
    'by each worker at start from PGNOTIFY_RATE_LIMITS and the providers'' defaults).';

-- Take up to `wanted` tokens of a provider at once (the claim loop asks before it claims), or,
-- with `reserve`, take `wanted` tokens even ahead of time (the balance goes negative) and say
-- when the last one is due. Time is the database's: clock_timestamp() after the row lock, so a
-- caller that waited for the lock is not credited twice for the same time.
--   granted    tokens taken (a provider without a row and without p_rate: all of them)
--   ready_in   seconds until the granted tokens may be used (0 unless reserved ahead)
--   next_in    seconds until one more token is free (when to ask again)
--   paused_for seconds the provider is still paused (then nothing is granted)
-- p_rate and p_burst recreate the row when it is missing (after a crash or on a new standby).
CREATE FUNCTION pgnotify.take_tokens(
    p_provider text, wanted integer, reserve boolean DEFAULT false,
    p_rate float8 DEFAULT NULL, p_burst float8 DEFAULT NULL
)
RETURNS TABLE (granted integer, ready_in float8, next_in float8, paused_for float8)
LANGUAGE plpgsql AS $fn$
DECLARE
    lim pgnotify.provider_limits%ROWTYPE;
    t_now timestamptz;
    have float8;
    n_take integer;
    start_in float8;
BEGIN
    SELECT * INTO lim FROM pgnotify.provider_limits l WHERE l.provider = p_provider FOR UPDATE;
    IF NOT FOUND AND p_rate IS NOT NULL THEN
        INSERT INTO pgnotify.provider_limits (provider, rate, burst, tokens)
        VALUES (p_provider, p_rate, p_burst, p_burst) ON CONFLICT (provider) DO NOTHING;
        SELECT * INTO lim FROM pgnotify.provider_limits l WHERE l.provider = p_provider FOR UPDATE;
    END IF;
    IF NOT FOUND THEN
        RETURN QUERY SELECT wanted, 0::float8, 0::float8, 0::float8;
        RETURN;
    END IF;
    t_now := clock_timestamp();
    IF lim.paused_until > t_now THEN
        RETURN QUERY SELECT 0, 0::float8, 0::float8,
            extract(epoch FROM lim.paused_until - t_now)::float8;
        RETURN;
    END IF;
    -- Up to half a token is kept beyond the burst, so a replica that comes for the next token a
    -- few milliseconds late does not lose that time (at burst 1 the rate would sag by the
    -- lateness); no more than `burst` tokens are ever granted at once.
    have := least(lim.burst + 0.5,
                  lim.tokens + lim.rate * greatest(0, extract(epoch FROM t_now - lim.refilled_at)));
    IF reserve THEN
        n_take := greatest(wanted, 0);
    ELSE
        n_take := least(greatest(wanted, 0), greatest(floor(have), 0), floor(lim.burst))::integer;
    END IF;
    UPDATE pgnotify.provider_limits l
    SET tokens = have - n_take, refilled_at = greatest(l.refilled_at, t_now), updated_at = t_now
    WHERE l.provider = p_provider;
    start_in := greatest(0, extract(epoch FROM lim.refilled_at - t_now));  -- refill starts later
    RETURN QUERY SELECT n_take,
        start_in + greatest(0, -(have - n_take)) / lim.rate,
        start_in + greatest(0, 1 - (have - n_take)) / lim.rate,
        0::float8;
END
$fn$;
COMMENT ON FUNCTION pgnotify.take_tokens IS
    'Take tokens of a provider''s shared rate limit: (granted, ready_in, next_in, paused_for).';

-- Pause a provider for every replica (a 429 with Retry-After): no token before `seconds` from
-- now, then one at once (a probe) and the rate after it, not a burst.
CREATE FUNCTION pgnotify.pause_provider(p_provider text, seconds float8, reason text DEFAULT NULL)
RETURNS timestamptz
LANGUAGE sql AS $fn$
    UPDATE pgnotify.provider_limits l
    SET paused_until = greatest(l.paused_until, clock_timestamp() + make_interval(secs => seconds)),
        refilled_at = greatest(l.refilled_at, l.paused_until,
                               clock_timestamp() + make_interval(secs => seconds)),
        tokens = CASE WHEN l.tokens < 0 THEN l.tokens ELSE 1 END,
        pause_reason = coalesce(reason, l.pause_reason),
        updated_at = clock_timestamp()
    WHERE l.provider = p_provider
    RETURNING l.paused_until;
$fn$;
COMMENT ON FUNCTION pgnotify.pause_provider IS
    'Pause a rate-limited provider for all replicas for `seconds` (never shortens a pause).';

-- least privilege (schema 0006): the worker keeps the limits, admins may read and reset them
PERFORM pgnotify.apply_grants();
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_worker') THEN
    GRANT SELECT, INSERT, UPDATE ON pgnotify.provider_limits TO pgnotify_worker;
    GRANT EXECUTE ON FUNCTION pgnotify.take_tokens, pgnotify.pause_provider TO pgnotify_worker;
END IF;
IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'pgnotify_admin') THEN
    GRANT SELECT, INSERT, UPDATE, DELETE ON pgnotify.provider_limits TO pgnotify_admin;
END IF;

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (10, 'rate_limits');
END
$migration$;
COMMIT;
