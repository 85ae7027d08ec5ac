-- pgnotify-worker migration 0006: hardening for production (issue 9).
--   1. Timestamps a producer sets must be finite and decodable: from 2000-01-01 UTC to 10 years
--      from now (run_at, expires_at; and the time columns of contacts, devices, consents,
--      chat_messages, jobs).
--   2. What can never be sent is refused at INSERT: oversized fields, an email without a subject
--      or template, an E.164 number without an assigned country code, a webhook URL whose host
--      is a loopback, private, link-local or reserved address in any numeric spelling.
--   3. Least privilege: group roles pgnotify_producer, pgnotify_worker and pgnotify_admin;
--      nothing is executable by PUBLIC; producer functions are SECURITY DEFINER.
-- Idempotent: does nothing when pgnotify.schema_migrations records version 6. The roles are
-- cluster-wide and created only when missing (and only when the migrating user may create
-- roles); pgnotify.apply_grants() can be run again by an admin at any time.
BEGIN;
SELECT pg_advisory_xact_lock(7245390117010512);

DO $migration$
DECLARE
    codes text[] := ARRAY[
        '1', '7', '20', '27', '30', '31', '32', '33', '34', '36', '39', '40', '41', '43', '44', '45',
        '46', '47', '48', '49', '51', '52', '53', '54', '55', '56', '57', '58', '60', '61', '62', '63',
        '64', '65', '66', '81', '82', '84', '86', '90', '91', '92', '93', '94', '95', '98', '211',
        '212', '213', '216', '218', '220', '221', '222', '223', '224', '225', '226', '227', '228',
        '229', '230', '231', '232', '233', '234', '235', '236', '237', '238', '239', '240', '241',
        '242', '243', '244', '245', '246', '247', '248', '249', '250', '251', '252', '253', '254',
        '255', '256', '257', '258', '260', '261', '262', '263', '264', '265', '266', '267', '268',
        '269', '290', '291', '297', '298', '299', '350', '351', '352', '353', '354', '355', '356',
        '357', '358', '359', '370', '371', '372', '373', '374', '375', '376', '377', '378', '380',
        '381', '382', '383', '385', '386', '387', '389', '420', '421', '423', '500', '501', '502',
        '503', '504', '505', '506', '507', '508', '509', '590', '591', '592', '593', '594', '595',
        '596', '597', '598', '599', '670', '672', '673', '674', '675', '676', '677', '678', '679',
        '680', '681', '682', '683', '685', '686', '687', '688', '689', '690', '691', '692', '800',
        '808', '850', '852', '853', '855', '856', '870', '878', '880', '881', '882', '883', '886',
        '888', '960', '961', '962', '963', '964', '965', '966', '967', '968', '970', '971', '972',
        '973', '974', '975', '976', '977', '979', '992', '993', '994', '995', '996', '998'
    ];
    code_map text := '';
    prefix text;
    wanted text;
BEGIN
IF EXISTS (SELECT 1 FROM pgnotify.schema_migrations WHERE version = 6) THEN
    RAISE NOTICE 'pgnotify migration 6 (hardening) is already applied';
    RETURN;
END IF;

-------------------------------------------------------------------------------------------------
-- reject_in(): reject() for any pgnotify table (reject() always names notifications).
-------------------------------------------------------------------------------------------------
CREATE FUNCTION pgnotify.reject_in(tbl text, col text, msg text, hint text DEFAULT NULL)
RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = format('pgnotify: %s', msg),
        HINT = coalesce(hint, ''), SCHEMA = 'pgnotify', TABLE = tbl, COLUMN = col;
END
$fn$;

-------------------------------------------------------------------------------------------------
-- 1. Timestamps. The range is [2000-01-01 00:00 UTC, now() + 10 years]: a Python datetime can
-- hold every value in it (years 1..9999), 'infinity' and '-infinity' are outside it, and nothing
-- real is scheduled or kept further ahead. The check is a trigger WHEN clause (no function call
-- for a row in range); the function below only runs to name the offending column.
-------------------------------------------------------------------------------------------------
CREATE FUNCTION pgnotify.reject_timestamps() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    col text;
    value timestamptz;
BEGIN
    FOREACH col IN ARRAY TG_ARGV LOOP
        EXECUTE format('SELECT ($1).%I::timestamptz', col) USING NEW INTO value;
        IF value < '2000-01-01 00:00:00+00' OR value > now() + interval '10 years' THEN
            PERFORM pgnotify.reject_in(TG_TABLE_NAME, col, format(
                '%s must be a finite time from 2000-01-01 to 10 years from now, not %s', col,
                CASE WHEN isfinite(value) THEN to_char(value AT TIME ZONE 'UTC',
                    'FMYYYY-MM-DD HH24:MI:SS" UTC"') || CASE WHEN value < '0001-01-01 00:00:00+00'
                    THEN ' BC' ELSE '' END ELSE value::text END),
                CASE col WHEN 'run_at' THEN
                    'leave run_at out to send now; to hold a notification back, insert it later or cancel it'
                    WHEN 'expires_at' THEN 'leave expires_at out for no expiry' END);
        END IF;
    END LOOP;
    RETURN NEW;
END
$fn$;
COMMENT ON FUNCTION pgnotify.reject_timestamps IS
    'Raises 23514 naming the first column of TG_ARGV outside [2000-01-01 UTC, now() + 10 years].';

-- Before notifications_validate (triggers fire in name order), after notifications_expiry (which
-- fills expires_at from the category's ttl, so a ttl over 10 years is caught too).
CREATE TRIGGER notifications_times
    BEFORE INSERT ON pgnotify.notifications
    FOR EACH ROW
    WHEN (NEW.run_at NOT BETWEEN '2000-01-01 00:00:00+00' AND now() + interval '10 years'
          OR NEW.expires_at NOT BETWEEN '2000-01-01 00:00:00+00' AND now() + interval '10 years')
    EXECUTE FUNCTION pgnotify.reject_timestamps('run_at', 'expires_at');
-- On UPDATE only a time that changes is judged: the worker's write-back sets run_at on every
-- row, and one bad row that got in (triggers off, an old version) must not fail its batch.
CREATE TRIGGER notifications_times_changed
    BEFORE UPDATE OF run_at, expires_at ON pgnotify.notifications
    FOR EACH ROW
    WHEN ((NEW.run_at IS DISTINCT FROM OLD.run_at
           AND NEW.run_at NOT BETWEEN '2000-01-01 00:00:00+00' AND now() + interval '10 years')
          OR (NEW.expires_at IS DISTINCT FROM OLD.expires_at
           AND NEW.expires_at NOT BETWEEN '2000-01-01 00:00:00+00' AND now() + interval '10 years'))
    EXECUTE FUNCTION pgnotify.reject_timestamps('run_at', 'expires_at');

-- Rows stored before this migration with such a time were never sendable: a claim of one could
-- not be decoded (and stalled the worker), or it waited for ever. They fail now, with the reason;
-- their times are brought into range so every reader can decode them. One pass over the table.
WITH bad AS (
    UPDATE pgnotify.notifications n
    SET status = 'failed', locked_by = NULL, locked_until = NULL, updated_at = now(),
        last_error = format('pgnotify migration 6: %s was out of range (before 2000-01-01, more '
            'than 10 years ahead, or infinite), so the row could never be sent',
            concat_ws(' and ',
                CASE WHEN n.run_at NOT BETWEEN '2000-01-01 00:00:00+00' AND now() + interval '10 years'
                     THEN 'run_at' END,
                CASE WHEN n.expires_at NOT BETWEEN '2000-01-01 00:00:00+00' AND now() + interval '10 years'
                     THEN 'expires_at' END)),
        run_at = CASE WHEN n.run_at NOT BETWEEN '2000-01-01 00:00:00+00' AND now() + interval '10 years'
                      THEN now() ELSE n.run_at END,
        expires_at = CASE WHEN n.expires_at BETWEEN '2000-01-01 00:00:00+00' AND now() + interval '10 years'
                          THEN n.expires_at END
    WHERE n.status IN ('queued', 'scheduled', 'processing', 'held')
      AND (n.run_at NOT BETWEEN '2000-01-01 00:00:00+00' AND now() + interval '10 years'
           OR n.expires_at NOT BETWEEN '2000-01-01 00:00:00+00' AND now() + interval '10 years')
    RETURNING n.id, n.attempts, n.last_error
)
INSERT INTO pgnotify.events (notification_id, event, attempt, error_code, error)
SELECT id, 'failed', attempts, 'time_out_of_range', last_error FROM bad;

CREATE TRIGGER contacts_times
    BEFORE INSERT OR UPDATE OF unsubscribed_at ON pgnotify.contacts
    FOR EACH ROW
    WHEN (NEW.unsubscribed_at NOT BETWEEN '2000-01-01 00:00:00+00' AND now() + interval '10 years')
    EXECUTE FUNCTION pgnotify.reject_timestamps('unsubscribed_at');

CREATE TRIGGER devices_times
    BEFORE INSERT OR UPDATE OF created_at, last_seen_at, deactivated_at ON pgnotify.devices
    FOR EACH ROW
    WHEN (NEW.created_at NOT BETWEEN '2000-01-01 00:00:00+00' AND now() + interval '10 years'
          OR NEW.last_seen_at NOT BETWEEN '2000-01-01 00:00:00+00' AND now() + interval '10 years'
          OR NEW.deactivated_at NOT BETWEEN '2000-01-01 00:00:00+00' AND now() + interval '10 years')
    EXECUTE FUNCTION pgnotify.reject_timestamps('created_at', 'last_seen_at', 'deactivated_at');

CREATE TRIGGER consents_times
    BEFORE INSERT OR UPDATE OF recorded_at ON pgnotify.consents
    FOR EACH ROW
    WHEN (NEW.recorded_at NOT BETWEEN '2000-01-01 00:00:00+00' AND now() + interval '10 years')
    EXECUTE FUNCTION pgnotify.reject_timestamps('recorded_at');

CREATE TRIGGER chat_messages_times
    BEFORE INSERT OR UPDATE OF created_at ON pgnotify.chat_messages
    FOR EACH ROW
    WHEN (NEW.created_at NOT BETWEEN '2000-01-01 00:00:00+00' AND now() + interval '10 years')
    EXECUTE FUNCTION pgnotify.reject_timestamps('created_at');

CREATE TRIGGER jobs_times
    BEFORE INSERT OR UPDATE OF next_run_at ON pgnotify.jobs
    FOR EACH ROW
    WHEN (NEW.next_run_at NOT BETWEEN '2000-01-01 00:00:00+00' AND now() + interval '10 years')
    EXECUTE FUNCTION pgnotify.reject_timestamps('next_run_at');

-------------------------------------------------------------------------------------------------
-- 2a. E.164 country calling codes: the codes the worker's phonenumbers library knows (ITU
-- assigned, geographic and global services), as a 1000-character map indexed by the first three
-- digits: the length of the country code those digits start with, or 0 when none is assigned
-- (country codes are prefix-free). One substr() per row, no table.
-------------------------------------------------------------------------------------------------
FOR i IN 0..999 LOOP
    prefix := lpad(i::text, 3, '0');
    code_map := code_map || CASE
        WHEN left(prefix, 1) = ANY (codes) THEN '1'
        WHEN left(prefix, 2) = ANY (codes) THEN '2'
        WHEN prefix = ANY (codes) THEN '3'
        ELSE '0' END;
END LOOP;
EXECUTE format($sql$
CREATE FUNCTION pgnotify.e164_country_code_length(digits text) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS %L
$sql$, format('SELECT substr(%L, left(rpad(digits, 3, ''0''), 3)::integer + 1, 1)::integer',
              code_map));
COMMENT ON FUNCTION pgnotify.e164_country_code_length IS
    'Length (1-3) of the ITU country calling code the digits of an E.164 number start with; '
    '0 when they start with no assigned code. Digits only, without the +.';
EXECUTE format($sql$
CREATE FUNCTION pgnotify.e164_country_codes() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS %L
$sql$, format('SELECT %L::text[]', codes));
COMMENT ON FUNCTION pgnotify.e164_country_codes IS
    'The country calling codes an E.164 recipient may start with (the worker''s phonenumbers set).';

-------------------------------------------------------------------------------------------------
-- 2b. Webhook hosts written as numbers. webhook_address() reads a URL host the way inet_aton()
-- and getaddrinfo() do (decimal, octal 0177, hex 0x7f, 1 to 4 parts: 127.1, 2130706433,
-- 0x7f000001; [IPv6], IPv4-mapped, a zone id; full-width digits as IDNA maps them) and returns
-- the address, or NULL for a name (which only the send-time guard can judge).
-------------------------------------------------------------------------------------------------
CREATE FUNCTION pgnotify.webhook_address(host text) RETURNS inet
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $fn$
DECLARE
    h text := lower(host);
    parts text[];
    part text;
    digits text;
    v bigint;
    vals bigint[] := '{}';
    n integer;
    total bigint;
    addr inet;
BEGIN
    IF octet_length(h) <> length(h) THEN
        -- IDNA (UTS 46) maps full-width digits and dots to ASCII before resolving
        h := translate(normalize(h, NFKC), U&'\3002\FF61\FF0E', '...');
    END IF;
    IF left(h, 1) = '[' THEN
        h := split_part(btrim(h, '[]'), '%', 1);
        IF h !~ '^[0-9a-f:.]+$' THEN
            RETURN NULL;
        END IF;
        BEGIN
            addr := h::inet;
        EXCEPTION WHEN invalid_text_representation THEN
            RETURN NULL;
        END;
        IF family(addr) = 6 AND (addr <<= '::ffff:0:0/96' OR addr <<= '::/96' AND addr > '::1') THEN
            -- IPv4-mapped and IPv4-compatible addresses reach the IPv4 address they carry
            RETURN '0.0.0.0'::inet + (addr - CASE WHEN addr <<= '::ffff:0:0/96'
                THEN '::ffff:0:0'::inet ELSE '::'::inet END);
        END IF;
        RETURN addr;
    END IF;
    IF right(h, 1) = '.' THEN
        h := left(h, -1);  -- an absolute name: 127.0.0.1. is 127.0.0.1
    END IF;
    IF h = '' OR h !~ '^[0-9a-fx.]+$' THEN
        RETURN NULL;
    END IF;
    parts := string_to_array(h, '.');
    n := cardinality(parts);
    IF n > 4 THEN
        RETURN NULL;
    END IF;
    FOREACH part IN ARRAY parts LOOP
        IF part ~ '^0x[0-9a-f]*$' THEN
            digits := ltrim(substr(part, 3), '0');
            IF length(digits) > 8 THEN RETURN NULL; END IF;
            v := ('x' || lpad(digits, 16, '0'))::bit(64)::bigint;
        ELSIF part ~ '^0[0-7]*$' THEN
            digits := ltrim(part, '0');
            IF length(digits) > 11 THEN RETURN NULL; END IF;
            v := 0;
            FOR i IN 1..length(digits) LOOP
                v := v * 8 + substr(digits, i, 1)::integer;
            END LOOP;
        ELSIF part ~ '^[1-9][0-9]*$' THEN
            IF length(part) > 10 THEN RETURN NULL; END IF;
            v := part::bigint;
        ELSE
            RETURN NULL;  -- a name such as dead.beef.example or 1e100.net
        END IF;
        vals := vals || v;
    END LOOP;
    -- the last part fills every byte the earlier ones leave, as in inet_aton()
    FOR i IN 1..n - 1 LOOP
        IF vals[i] > 255 THEN RETURN NULL; END IF;
    END LOOP;
    IF vals[n] >= (2::bigint ^ (8 * (5 - n)))::bigint THEN
        RETURN NULL;
    END IF;
    total := vals[n];
    FOR i IN 1..n - 1 LOOP
        total := total + vals[i] * (2::bigint ^ (8 * (4 - i)))::bigint;
    END LOOP;
    RETURN '0.0.0.0'::inet + total;
END
$fn$;
COMMENT ON FUNCTION pgnotify.webhook_address IS
    'The IP address a URL host written as a number stands for (any inet_aton spelling, [IPv6], '
    'IPv4-mapped IPv6 as IPv4), or NULL when the host is a name.';

-- Why an address must not be a webhook target (NULL: it may be). The same ranges as the
-- worker's send-time guard (core/netguard.py).
CREATE FUNCTION pgnotify.blocked_address_reason(addr inet) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $fn$
    SELECT CASE
        WHEN addr <<= '169.254.0.0/16' OR addr = 'fd00:ec2::254' THEN 'cloud metadata'
        WHEN addr <<= '127.0.0.0/8' OR addr = '::1' THEN 'loopback'
        WHEN addr <<= '0.0.0.0/8' OR addr = '::' THEN 'unspecified'
        WHEN addr <<= '10.0.0.0/8' OR addr <<= '172.16.0.0/12' OR addr <<= '192.168.0.0/16'
             OR addr <<= 'fc00::/7' THEN 'private'
        WHEN addr <<= 'fe80::/10' OR addr <<= 'fec0::/10' THEN 'link-local'
        WHEN addr <<= '100.64.0.0/10' THEN 'carrier-grade NAT'
        WHEN addr <<= '224.0.0.0/4' OR addr <<= 'ff00::/8' THEN 'multicast'
        WHEN addr <<= '240.0.0.0/4' OR addr <<= '192.0.0.0/24' OR addr <<= '192.0.2.0/24'
             OR addr <<= '198.18.0.0/15' OR addr <<= '198.51.100.0/24'
             OR addr <<= '203.0.113.0/24' OR addr <<= '2001:db8::/32' OR addr <<= '100::/64'
             OR addr <<= '64:ff9b::/96' OR addr <<= '::/96' THEN 'reserved'
    END;
$fn$;
COMMENT ON FUNCTION pgnotify.blocked_address_reason IS
    'Why a webhook may not target this address (loopback, private, cloud metadata, ...), or NULL.';

-- Why a webhook URL may not be a target when its host is written as a number (NULL: it may, or
-- the host is a name). pgnotify.webhook_allowed_networks (CIDRs, comma-separated; the worker's
-- PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS) lets a network in; cloud metadata never.
CREATE FUNCTION pgnotify.webhook_host_refusal(url text) RETURNS text
LANGUAGE plpgsql STABLE STRICT AS $fn$
DECLARE
    host text := substring(url from '^[^:]+://([^/?#]*)');
    addr inet;
    reason text;
BEGIN
    host := CASE WHEN left(host, 1) = '[' THEN substring(host from '^(\[[^]]*\])')
                 ELSE split_part(host, ':', 1) END;  -- without the port
    addr := pgnotify.webhook_address(host);
    reason := pgnotify.blocked_address_reason(addr);
    IF reason = 'cloud metadata' THEN
        RETURN format('webhook URL points at a cloud metadata address (%s), which is never allowed',
            host(addr));
    ELSIF reason IS NULL OR coalesce(addr <<= ANY (string_to_array(replace(nullif(current_setting(
            'pgnotify.webhook_allowed_networks', true), ''), ' ', ''), ',')::cidr[]), false) THEN
        RETURN NULL;
    END IF;
    RETURN format('webhook URL points at a %s address (%s)', reason, host(addr));
END
$fn$;
COMMENT ON FUNCTION pgnotify.webhook_host_refusal IS
    'Why a webhook URL whose host is an IP address may not be a target, or NULL.';

-------------------------------------------------------------------------------------------------
-- 2c. validate_notification(), as in 0001 plus the limits below. Every limit is what a provider
-- accepts, or a generous bound where none does; byte limits use octet_length() (constant time,
-- even on a toasted value), and a regex only runs on a value already known to be short.
--   user_id        256 characters        (the in-app recipient limit of 0001)
--   recipient      16 KiB before anything else; then per channel as in 0001
--   template       255 characters
--   subject        998 characters        (RFC 5322 line length)
--   body           256 KiB; sms 1600 characters (Twilio); push 4096 bytes (FCM)
--   html_body      1 MiB
--   locale         35 characters         (BCP 47 language tags)
--   category 100, idempotency_key 255, payload 256 KiB (pgnotify.max_payload_bytes): as before
-- An email needs a subject or a template (every email provider refuses a message without one).
-- An sms recipient written with + is E.164: an assigned country code, 7 to 15 digits.
-- A webhook host written as a number must not be a blocked address unless
-- pgnotify.webhook_allowed_networks (CIDRs, comma-separated) allows it; cloud metadata never.
-------------------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION pgnotify.validate_notification() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
    max_payload integer := coalesce(
        nullif(current_setting('pgnotify.max_payload_bytes', true), '')::integer, 262144);
    payload_size integer;
    digits text;
    host text;
    reason text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.status IS NOT NULL AND NEW.status NOT IN ('queued', 'scheduled') THEN
            PERFORM pgnotify.reject('status', format(
                'status must be queued (or left out) on insert, not %L', left(NEW.status, 40)));
        END IF;
        NEW.attempts := 0;
        NEW.locked_by := NULL;
        NEW.locked_until := NULL;
        NEW.sent_at := NULL;
        NEW.held_at := NULL;
        NEW.created_at := now();
    END IF;
    NEW.updated_at := now();

    IF NEW.channel IS NULL THEN
        PERFORM pgnotify.reject('channel', 'channel is required',
            'one of email, sms, push, webhook, inapp');
    ELSIF NEW.channel NOT IN ('email', 'sms', 'push', 'webhook', 'inapp') THEN
        PERFORM pgnotify.reject('channel', format('unknown channel %L', left(NEW.channel, 40)),
            'one of email, sms, push, webhook, inapp');
    END IF;

    -- Sizes first (one expression on the path of a row that fits), so no regex below ever runs
    -- on an oversized value.
    IF length(NEW.user_id) > 256 OR octet_length(NEW.recipient) > 16384
            OR length(NEW.template) > 255 OR length(NEW.subject) > 998
            OR octet_length(NEW.body) > 262144 OR octet_length(NEW.html_body) > 1048576
            OR length(NEW.locale) > 35 THEN
        IF length(NEW.user_id) > 256 THEN
            PERFORM pgnotify.reject('user_id', format('user_id is %s characters, over the 256 limit',
                length(NEW.user_id)));
        ELSIF octet_length(NEW.recipient) > 16384 THEN
            PERFORM pgnotify.reject('recipient', format('recipient is %s bytes, over the 16384 limit',
                octet_length(NEW.recipient)));
        ELSIF length(NEW.template) > 255 THEN
            PERFORM pgnotify.reject('template', 'template is longer than 255 characters');
        ELSIF length(NEW.subject) > 998 THEN
            PERFORM pgnotify.reject('subject', format('subject is %s characters, over the 998 limit',
                length(NEW.subject)), 'RFC 5322 limits a header line to 998 characters');
        ELSIF octet_length(NEW.body) > 262144 THEN
            PERFORM pgnotify.reject('body', format('body is %s bytes, over the 262144 byte limit',
                octet_length(NEW.body)), 'send ids in the payload and link to the rest');
        ELSIF octet_length(NEW.html_body) > 1048576 THEN
            PERFORM pgnotify.reject('html_body', format(
                'html_body is %s bytes, over the 1048576 byte limit', octet_length(NEW.html_body)),
                'link to large content instead of inlining it');
        ELSE
            PERFORM pgnotify.reject('locale', 'locale is longer than 35 characters',
                'like en, fr, fr-CA, pt_BR');
        END IF;
    END IF;

    IF NEW.recipient IS NULL AND NEW.channel = 'inapp' THEN
        NEW.recipient := NEW.user_id;  -- an in-app message goes to its user
    END IF;
    IF NEW.recipient IS NULL OR btrim(NEW.recipient) = '' THEN
        PERFORM pgnotify.reject('recipient', format('recipient is required for channel %s',
            NEW.channel), CASE NEW.channel
                WHEN 'email' THEN 'an email address'
                WHEN 'sms' THEN 'a phone number, best in E.164 form (+14155550123)'
                WHEN 'push' THEN 'a device token'
                WHEN 'webhook' THEN 'an http(s) URL'
                ELSE 'a user id (or set user_id)' END);
    END IF;
    IF NEW.recipient ~ '[[:cntrl:]]' THEN
        PERFORM pgnotify.reject('recipient', 'recipient must not contain control characters');
    END IF;
    IF NEW.channel = 'email' AND (length(NEW.recipient) > 254 OR NEW.recipient !~
            '^[^[:space:]@"(),:;<>\[\\\]]+@[^[:space:]@"(),:;<>\[\\\].]+(\.[^[:space:]@"(),:;<>\[\\\].]+)+$') THEN
        PERFORM pgnotify.reject('recipient', 'recipient is not a valid email address',
            'expected local@domain.tld, without a display name');
    ELSIF NEW.channel = 'sms' THEN
        digits := translate(NEW.recipient, '+() .-', '');
        IF NEW.recipient !~ '^\+?[0-9() .-]{4,32}$' OR length(digits) NOT BETWEEN 4 AND 15 THEN
            PERFORM pgnotify.reject('recipient', 'recipient is not a valid phone number',
                'expected E.164 like +14155550123 (a national number uses the worker''s default region)');
        ELSIF left(NEW.recipient, 1) = '+' AND (length(digits) < 7
                OR pgnotify.e164_country_code_length(digits) = 0) THEN
            PERFORM pgnotify.reject('recipient', format(
                'recipient is not a valid E.164 phone number: %s',
                CASE WHEN length(digits) < 7 THEN 'fewer than 7 digits'
                     ELSE 'no country calling code ' || left(digits, 3) || ' is assigned' END),
                'expected + then country code and number, 7 to 15 digits, like +14155550123');
        ELSIF octet_length(NEW.body) > 1600 AND length(NEW.body) > 1600 THEN
            PERFORM pgnotify.reject('body', format(
                'body is %s characters, over the 1600 an SMS can carry', length(NEW.body)),
                'Twilio refuses longer messages');
        END IF;
    ELSIF NEW.channel = 'push' AND (length(NEW.recipient) > 4096 OR NEW.recipient ~ '[[:space:]]'
            OR octet_length(NEW.body) > 4096) THEN
        IF octet_length(NEW.body) > 4096 THEN
            PERFORM pgnotify.reject('body', format(
                'body is %s bytes, over the 4096 a push message can carry', octet_length(NEW.body)),
                'FCM refuses larger messages');
        END IF;
        PERFORM pgnotify.reject('recipient', 'recipient is not a valid device token or user id');
    ELSIF NEW.channel = 'webhook' THEN
        host := substring(NEW.recipient from '^[^:]+://([^/?#]*)');
        IF length(NEW.recipient) > 2048 OR NEW.recipient !~* '^https?://[^/?#[:space:]]+([/?#][^[:space:]]*)?$' THEN
            PERFORM pgnotify.reject('recipient', 'recipient is not a valid http(s) URL',
                'expected https://host[:port]/path');
        ELSIF host LIKE '%@%' THEN
            PERFORM pgnotify.reject('recipient', 'webhook URL must not carry credentials (user@host)',
                'the worker signs each request; put no secrets in the URL');
        ELSIF NEW.recipient ~* '^https?://(169\.254\.[0-9.]+|\[?fd00:ec2::254\]?|metadata\.google\.internal)([:/?#]|$)' THEN
            PERFORM pgnotify.reject('recipient',
                'webhook URL points at a cloud metadata address, which is never allowed');
        ELSIF left(host, 1) BETWEEN '0' AND '9' OR left(host, 1) = '['
                OR octet_length(host) <> length(host) THEN
            -- a host written as a number (only such hosts pay for the function call)
            reason := pgnotify.webhook_host_refusal(NEW.recipient);
            IF reason IS NOT NULL THEN
                PERFORM pgnotify.reject('recipient', reason, CASE WHEN reason NOT LIKE '%metadata%' THEN
                    'to deliver to an internal receiver, allow its network in the setting '
                    'pgnotify.webhook_allowed_networks (as in the worker''s PGNOTIFY_WEBHOOK_ALLOWED_NETWORKS)'
                    END);
            END IF;
        END IF;
    ELSIF NEW.channel = 'inapp' AND length(NEW.recipient) > 256 THEN
        PERFORM pgnotify.reject('recipient', 'recipient (user id) is longer than 256 characters');
    END IF;

    -- one expression for a row that has what its channel needs
    IF NEW.template IS NULL AND (NEW.channel = 'email' AND NEW.subject IS NULL
            OR NEW.body IS NULL AND NEW.html_body IS NULL AND NEW.channel NOT IN ('webhook', 'inapp')) THEN
        IF NEW.body IS NULL AND NEW.html_body IS NULL AND NEW.channel NOT IN ('webhook', 'inapp') THEN
            PERFORM pgnotify.reject('template', format('%s %s notification needs a template or a body',
                CASE WHEN NEW.channel IN ('email', 'sms', 'inapp') THEN 'an' ELSE 'a' END, NEW.channel),
                'set template => ''key'' (a row in pgnotify.templates) or body => ''...''');
        END IF;
        PERFORM pgnotify.reject('subject', 'an email needs a subject (or a template that has one)',
            'set subject => ''...'' or template => ''key''');
    END IF;
    IF NEW.template IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM pgnotify.templates t WHERE t.key = NEW.template AND t.channel = NEW.channel) THEN
        PERFORM pgnotify.reject('template', format('unknown template %L for channel %s',
            left(NEW.template, 100), NEW.channel), 'insert it into pgnotify.templates first');
    END IF;
    IF NEW.subject ~ '[\r\n]' THEN
        PERFORM pgnotify.reject('subject', 'subject must not contain line breaks');
    END IF;
    IF NEW.locale IS NOT NULL AND NEW.locale !~ '^[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*$' THEN
        PERFORM pgnotify.reject('locale', format('locale %L is not a language tag', left(NEW.locale, 40)),
            'like en, fr, fr-CA, pt_BR');
    END IF;
    IF length(NEW.category) > 100 THEN
        PERFORM pgnotify.reject('category', 'category is longer than 100 characters');
    END IF;
    IF length(NEW.idempotency_key) > 255 OR NEW.idempotency_key = '' THEN
        PERFORM pgnotify.reject('idempotency_key', 'idempotency_key must be 1 to 255 characters');
    END IF;

    NEW.payload := coalesce(NEW.payload, '{}'::jsonb);
    IF jsonb_typeof(NEW.payload) <> 'object' THEN
        PERFORM pgnotify.reject('payload', format('payload must be a JSON object, not %s',
            jsonb_typeof(NEW.payload)), 'for example {"name": "Ada"}');
    END IF;
    payload_size := pg_column_size(NEW.payload);
    IF payload_size > max_payload THEN
        PERFORM pgnotify.reject('payload', format('payload is %s bytes, over the %s byte limit',
            payload_size, max_payload),
            'send ids and let templates stay small, or raise pgnotify.max_payload_bytes');
    END IF;

    NEW.priority := coalesce(NEW.priority, 0);
    NEW.max_attempts := coalesce(NEW.max_attempts, 10);
    IF NEW.max_attempts NOT BETWEEN 1 AND 1000 THEN
        PERFORM pgnotify.reject('max_attempts', format('max_attempts must be between 1 and 1000, not %s',
            NEW.max_attempts));
    END IF;
    -- notifications_times has checked run_at and expires_at (finite, 2000-01-01 to now + 10 years)
    IF NEW.run_at IS NULL THEN
        NEW.run_at := now();
    END IF;
    IF TG_OP = 'INSERT' THEN
        NEW.status := CASE WHEN NEW.run_at > now() THEN 'scheduled' ELSE 'queued' END;
    END IF;
    RETURN NEW;
END
$fn$;

-- The trigger also runs when a producer-controlled text column changes in an UPDATE.
DROP TRIGGER notifications_validate ON pgnotify.notifications;
CREATE TRIGGER notifications_validate
    BEFORE INSERT OR UPDATE OF channel, recipient, template, subject, body, html_body, user_id,
        category, locale, payload, max_attempts, idempotency_key
    ON pgnotify.notifications
    FOR EACH ROW EXECUTE FUNCTION pgnotify.validate_notification();

-- validate_contact() and notify_user() get the matching rules (an email over 254 characters,
-- a + number without an assigned country code, a webhook URL to a blocked numeric address; an
-- email without subject or template left out of notify_user()) in 0008, which restates both.

-------------------------------------------------------------------------------------------------
-- 3. Least privilege.
-------------------------------------------------------------------------------------------------
-- REFRESH MATERIALIZED VIEW needs the view's owner: the dashboard job calls this instead.
CREATE FUNCTION pgnotify.refresh_dashboard() RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp AS $fn$
    REFRESH MATERIALIZED VIEW CONCURRENTLY pgnotify.notifications_dashboard;
$fn$;
COMMENT ON FUNCTION pgnotify.refresh_dashboard IS
    'Refresh pgnotify.notifications_dashboard as its owner (the refresh_dashboard job calls it).';
UPDATE pgnotify.jobs SET command = 'SELECT pgnotify.refresh_dashboard()'
WHERE name = 'refresh_dashboard' AND builtin
  AND command = 'REFRESH MATERIALIZED VIEW CONCURRENTLY pgnotify.notifications_dashboard';

-- What producers call runs as the schema owner: enqueue() works without SELECT on the table,
-- notify_user() and the chat trigger read contacts, devices, preferences and templates that a
-- producer may not read. A fixed search_path, so nothing a caller creates is picked up.
ALTER FUNCTION pgnotify.enqueue(text, text, text, jsonb, text, text, text, text, text, text,
                                integer, timestamptz, integer, text, text)
    SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp;
ALTER FUNCTION pgnotify.notify_user(text, text, text, jsonb, text[], text, text, integer,
                                    timestamptz, timestamptz, text)
    SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp;
ALTER FUNCTION pgnotify.cancel(bigint) SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp;
ALTER FUNCTION pgnotify.register_device(text, text, text)
    SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp;
ALTER FUNCTION pgnotify.set_preference(text, text, text, text, text)
    SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp;
ALTER FUNCTION pgnotify.record_consent(text, text, boolean, text)
    SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp;
ALTER FUNCTION pgnotify.inbox_mark_read(text, bigint[])
    SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp;
ALTER FUNCTION pgnotify.chat_message_notify()
    SECURITY DEFINER SET search_path = pg_catalog, pgnotify, pg_temp;

-- apply_grants(): every grant of the three roles, from scratch. The migration runs it; run it
-- again (as the schema owner) after creating a missing role, or after a later migration.
CREATE FUNCTION pgnotify.apply_grants() RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    missing text[] := ARRAY(SELECT r FROM unnest(ARRAY['pgnotify_producer', 'pgnotify_worker',
        'pgnotify_admin']) r WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r));
    helpers text := 'pgnotify.reject(text, text, text), pgnotify.reject_in(text, text, text, text), '
        'pgnotify.e164_country_code_length(text), pgnotify.webhook_address(text), '
        'pgnotify.blocked_address_reason(inet), pgnotify.webhook_host_refusal(text)';
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
END
$fn$;
COMMENT ON FUNCTION pgnotify.apply_grants IS
    'Grant pgnotify_producer, pgnotify_worker and pgnotify_admin what they need (and PUBLIC '
    'nothing). Run as the schema owner; idempotent.';

-- The group roles (cluster-wide, NOLOGIN): created when missing and when this user may.
FOREACH wanted IN ARRAY ARRAY['pgnotify_producer', 'pgnotify_worker', 'pgnotify_admin'] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = wanted) THEN
        BEGIN
            EXECUTE format('CREATE ROLE %I NOLOGIN', wanted);
        EXCEPTION
            WHEN insufficient_privilege THEN
                RAISE NOTICE 'pgnotify: cannot create role % (this user lacks CREATEROLE); '
                    'create it and run SELECT pgnotify.apply_grants()', wanted;
            WHEN duplicate_object OR unique_violation THEN
                NULL;  -- another database's migration created it at the same moment
        END;
    END IF;
END LOOP;
PERFORM pgnotify.apply_grants();

INSERT INTO pgnotify.schema_migrations (version, name) VALUES (6, 'hardening');
END
$migration$;
COMMIT;
