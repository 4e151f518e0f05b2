-- The email schema as the migrations in sql/migrations/ leave it: tables, types, functions,
-- triggers, indexes, row-level security policies and grants, in one file to read.
--
-- Written by `.venv/bin/python -m tests.harness.schema` from `pg_dump --schema-only` of a
-- freshly migrated database; tests/test_schema.py fails when it and the migrations disagree.
-- Do not edit it by hand: add a migration, then rewrite this file.
--
-- It also loads: `psql -v ON_ERROR_STOP=1 -f sql/schema.sql` into an empty database gives the
-- catalog the migrations give, with the migrations recorded as applied.

-- The roles the grants name (cluster-wide, so created only when missing, as migration 001 does).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'email_worker') THEN
        CREATE ROLE email_worker NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'email_reader') THEN
        CREATE ROLE email_reader NOLOGIN;
    END IF;
END
$$;

--
--

--
-- Name: email; Type: SCHEMA; Schema: -; Owner: -
--

CREATE SCHEMA email;

--
-- Name: delivery_status; Type: TYPE; Schema: email; Owner: -
--

CREATE TYPE email.delivery_status AS ENUM (
    'queued',
    'in_progress',
    'sent',
    'retrying',
    'failed',
    'dead_letter',
    'skipped'
);

--
-- Name: provider_status; Type: TYPE; Schema: email; Owner: -
--

CREATE TYPE email.provider_status AS ENUM (
    'delivered',
    'opened',
    'clicked',
    'bounced',
    'complained'
);

--
-- Name: apply_provider_event(text, text, text, timestamp with time zone, text, text, text, text, text, jsonb); Type: FUNCTION; Schema: email; Owner: -
--

CREATE FUNCTION email.apply_provider_event(provider text, provider_event_id text, event_type text, occurred_at timestamp with time zone, recipient text DEFAULT NULL::text, delivery_id text DEFAULT NULL::text, message_id text DEFAULT NULL::text, relay_message_id text DEFAULT NULL::text, bounce_type text DEFAULT NULL::text, detail jsonb DEFAULT '{}'::jsonb) RETURNS text
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog'
    AS $_$
DECLARE
    event_id bigint;
    matched text;
    matched_status email.delivery_status;
    matched_since timestamptz;  -- its send time, or its row's creation before one
    -- The address the event names, as the ledger's is compared: NULL when it names none.
    named text := nullif(lower(btrim(coalesce(
        substring(apply_provider_event.recipient FROM '<([^<>]*)>\s*$'),
        apply_provider_event.recipient))), '');
    happened timestamptz := apply_provider_event.occurred_at;
    kept jsonb := coalesce(apply_provider_event.detail, '{}');
    target email.provider_status;
    rcpt text;
BEGIN
    -- Matching keys, tried in order: the delivery id the worker tagged the email with, its
    -- Message-ID, the relay's id. A Message-ID may come with or without its angle brackets;
    -- the worker stores it with them. Each key finds only a delivery to the recipient the
    -- event names, if it names one.
    IF apply_provider_event.delivery_id IS NOT NULL THEN
        SELECT d.delivery_id, d.status, coalesce(d.sent_at, d.created_at)
        INTO matched, matched_status, matched_since
        FROM email.deliveries d
        WHERE d.delivery_id = apply_provider_event.delivery_id
          AND (named IS NULL OR lower(btrim(d.recipient)) = named);
    END IF;
    IF matched IS NULL AND nullif(btrim(message_id, '<> '), '') IS NOT NULL THEN
        SELECT d.delivery_id, d.status, coalesce(d.sent_at, d.created_at)
        INTO matched, matched_status, matched_since
        FROM email.deliveries d
        WHERE d.provider_message_id IN (btrim(message_id, '<> '),
                                        '<' || btrim(message_id, '<> ') || '>')
          AND (named IS NULL OR lower(btrim(d.recipient)) = named)
        ORDER BY d.queued_at DESC LIMIT 1;
    END IF;
    IF matched IS NULL AND nullif(btrim(relay_message_id, '<> '), '') IS NOT NULL THEN
        SELECT d.delivery_id, d.status, coalesce(d.sent_at, d.created_at)
        INTO matched, matched_status, matched_since
        FROM email.deliveries d
        WHERE d.relay_message_id IN (btrim(apply_provider_event.relay_message_id, '<> '),
                                     '<' || btrim(apply_provider_event.relay_message_id, '<> ')
                                         || '>')
          AND (named IS NULL OR lower(btrim(d.recipient)) = named)
        ORDER BY d.queued_at DESC LIMIT 1;
    END IF;

    -- A time this email cannot have had (a provider's bug, a forged or misread timestamp)
    -- would become its delivered_at or bounced_at and win every "earliest" comparison.
    IF happened > now() + interval '1 hour'
       OR happened < matched_since - interval '5 minutes' THEN
        kept := kept || jsonb_build_object('occurred_at_clamped',
            to_char(happened AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'));
        happened := now();
    END IF;

    INSERT INTO email.provider_events AS e (
        provider, provider_event_id, delivery_id, event_type, occurred_at, bounce_type,
        recipient, tagged_delivery_id, message_id, relay_message_id, detail
    ) VALUES (
        apply_provider_event.provider, apply_provider_event.provider_event_id, matched,
        apply_provider_event.event_type, happened,
        apply_provider_event.bounce_type, apply_provider_event.recipient,
        apply_provider_event.delivery_id, apply_provider_event.message_id,
        apply_provider_event.relay_message_id, kept
    )
    ON CONFLICT ON CONSTRAINT provider_events_once DO NOTHING
    RETURNING e.id INTO event_id;
    IF event_id IS NULL THEN
        RETURN 'duplicate';
    END IF;
    IF matched IS NULL THEN
        RETURN 'unmatched';
    END IF;
    -- Recorded, no status change: a soft bounce, or an email that was never sent (skipped,
    -- failed, still queued...), which nothing a provider says can have happened to.
    IF apply_provider_event.event_type = 'deferred' OR matched_status <> 'sent' THEN
        RETURN 'applied';
    END IF;

    target := apply_provider_event.event_type::email.provider_status;
    -- For the audit row written by the provider-status trigger.
    PERFORM set_config('email.provider', apply_provider_event.provider, true);
    -- One UPDATE that reads the row it changes: concurrent events for one delivery serialise
    -- on the row lock and each re-reads the other's result (READ COMMITTED re-evaluates the
    -- SET expressions against the newest version). least() ignores NULL: the earliest wins.
    UPDATE email.deliveries d SET
        provider_status = CASE WHEN email.provider_status_allowed(d.provider_status, target)
                               THEN target ELSE d.provider_status END,
        delivered_at = CASE WHEN target = 'delivered'
                            THEN least(d.delivered_at, happened) ELSE d.delivered_at END,
        opened_at = CASE WHEN target = 'opened'
                         THEN least(d.opened_at, happened) ELSE d.opened_at END,
        clicked_at = CASE WHEN target = 'clicked'
                          THEN least(d.clicked_at, happened) ELSE d.clicked_at END,
        bounced_at = CASE WHEN target = 'bounced'
                          THEN least(d.bounced_at, happened) ELSE d.bounced_at END,
        complained_at = CASE WHEN target = 'complained'
                             THEN least(d.complained_at, happened) ELSE d.complained_at END,
        -- The bounce type of the earliest bounce.
        bounce_type = CASE WHEN target = 'bounced' AND apply_provider_event.bounce_type IS NOT NULL
                            AND (d.bounced_at IS NULL OR happened < d.bounced_at)
                           THEN apply_provider_event.bounce_type ELSE d.bounce_type END
    WHERE d.delivery_id = matched AND d.status = 'sent'
    RETURNING d.recipient INTO rcpt;

    IF target IN ('bounced', 'complained') AND rcpt IS NOT NULL THEN
        -- Once: a live entry is kept (its reason and origin stay); an expired one is renewed.
        INSERT INTO email.suppressions AS s (address, reason, delivery_id)
        VALUES (lower(rcpt), CASE WHEN target = 'bounced' THEN 'hard_bounce' ELSE 'complaint' END,
                matched)
        ON CONFLICT (address) DO UPDATE SET
            reason = excluded.reason,
            delivery_id = excluded.delivery_id,
            created_at = now(),
            expires_at = NULL
        WHERE s.expires_at IS NOT NULL AND s.expires_at <= now();
    END IF;
    RETURN 'applied';
END
$_$;

--
-- Name: audit_delivery_transition(); Type: FUNCTION; Schema: email; Owner: -
--

CREATE FUNCTION email.audit_delivery_transition() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog'
    AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.status = NEW.status
       AND NEW.claim_token IS NOT DISTINCT FROM OLD.claim_token THEN
        RETURN NULL;
    END IF;
    INSERT INTO email.delivery_events
        (delivery_id, status, attempt, error_code, error_message, payload)
    VALUES (
        NEW.delivery_id, NEW.status, NEW.attempts, NEW.last_error_code, NEW.last_error_message,
        jsonb_strip_nulls(jsonb_build_object(
            'from', CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END,
            'reason', NEW.status_reason,
            'provider_message_id', NEW.provider_message_id,
            'source_message_id', NEW.source_message_id,
            'lease_expires_at', NEW.lease_expires_at,
            'replays', NULLIF(NEW.replays, 0),
            'relay', CASE WHEN NEW.status = 'sent' THEN NEW.relay END,
            'smtp_ms', CASE WHEN NEW.status = 'sent' THEN NEW.smtp_ms END
        ))
    );
    RETURN NULL;
END
$$;

--
-- Name: audit_provider_status(); Type: FUNCTION; Schema: email; Owner: -
--

CREATE FUNCTION email.audit_provider_status() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog'
    AS $$
BEGIN
    INSERT INTO email.delivery_events (delivery_id, status, attempt, payload)
    VALUES (
        NEW.delivery_id, NEW.status, NEW.attempts,
        jsonb_strip_nulls(jsonb_build_object(
            'provider_status', NEW.provider_status,
            'from', OLD.provider_status,
            'provider', nullif(current_setting('email.provider', true), '')
        ))
    );
    RETURN NULL;
END
$$;

--
-- Name: claim_delivery(text, text, text, text, jsonb, text, integer, integer, integer, text, timestamp with time zone, timestamp with time zone); Type: FUNCTION; Schema: email; Owner: -
--

CREATE FUNCTION email.claim_delivery(delivery_id text, workflow text, recipient text, locale text, metadata jsonb, source_message_id text, lease_seconds integer, rate_limit integer DEFAULT NULL::integer, rate_window_seconds integer DEFAULT NULL::integer, takeover_reason text DEFAULT 'lease_expired'::text, published_at timestamp with time zone DEFAULT NULL::timestamp with time zone, not_after timestamp with time zone DEFAULT NULL::timestamp with time zone, OUT outcome text, OUT token uuid, OUT attempt integer, OUT lease_until timestamp with time zone, OUT code text, OUT reason text, OUT message text, OUT current_status email.delivery_status) RETURNS record
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog'
    AS $$
DECLARE
    rcpt text := lower(claim_delivery.recipient);
    since timestamptz;
    recent integer;
    new_status email.delivery_status;
    valid_until timestamptz;
BEGIN
    -- 0. The validity end. The row is locked from this read to the upsert below (which
    -- would lock it anyway), so no concurrent copy can change it in between; a row that does
    -- not exist yet has only this copy's.
    SELECT d.not_after INTO valid_until FROM email.deliveries d
     WHERE d.delivery_id = claim_delivery.delivery_id
       FOR UPDATE;
    valid_until := least(valid_until, claim_delivery.not_after);
    IF valid_until <= now() THEN
        code := 'EXPIRED';
        reason := 'expired';
        message := format('expired: valid until %s',
                          to_char(valid_until AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"'));
    ELSE
        -- 1. A live suppression entry (a bounce, a complaint, an operator's `suppressions add`).
        SELECT s.reason, format('recipient suppressed: %s since %s', s.reason,
                                to_char(s.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI "UTC"'))
          INTO reason, message
          FROM email.suppressions s
         WHERE s.address = rcpt AND (s.expires_at IS NULL OR s.expires_at > now());
        IF FOUND THEN
            code := 'SUPPRESSED';
        ELSIF claim_delivery.rate_limit IS NOT NULL THEN
            -- 2. The rate limit. The lock's first key names this use; the second is the
            -- recipient's hash (a collision only serialises two recipients' claims).
            PERFORM pg_advisory_xact_lock(1701669996, hashtext(rcpt));
            since := now() - claim_delivery.rate_window_seconds * interval '1 second';
            SELECT count(*) INTO recent
              FROM email.deliveries d
             WHERE lower(d.recipient) = rcpt
               AND d.workflow = claim_delivery.workflow
               AND d.status IN ('sent', 'in_progress')
               AND coalesce(d.sent_at, d.lease_expires_at) > since
               AND d.delivery_id <> claim_delivery.delivery_id;
            IF recent >= claim_delivery.rate_limit THEN
                code := 'RATE_LIMITED';
                reason := 'rate_limit';
                message := format('rate limit: %s %s emails to this recipient per %s s',
                                       claim_delivery.rate_limit, claim_delivery.workflow,
                                       claim_delivery.rate_window_seconds);
            END IF;
        END IF;
    END IF;

    -- 3. One guarded upsert, the claim's guard of before: a new row, or one that is queued,
    -- retrying, or in progress under an expired lease. Concurrent claims of one id serialise
    -- on the row; the loser re-checks the guard against the winner's row and changes nothing.
    -- published_at and not_after only ever move earlier (least() ignores a NULL).
    new_status := CASE WHEN code IS NULL THEN 'in_progress' ELSE 'skipped' END;
    INSERT INTO email.deliveries AS d (
        delivery_id, workflow, recipient, locale, metadata, source_message_id,
        status, status_reason, attempts, claim_token, lease_expires_at, last_attempted_at,
        last_error_code, last_error_message, published_at, not_after
    ) VALUES (
        claim_delivery.delivery_id, claim_delivery.workflow, claim_delivery.recipient,
        claim_delivery.locale, claim_delivery.metadata, claim_delivery.source_message_id,
        new_status, reason,
        CASE WHEN code IS NULL THEN 1 ELSE 0 END,
        CASE WHEN code IS NULL THEN gen_random_uuid() END,
        CASE WHEN code IS NULL THEN now() + claim_delivery.lease_seconds * interval '1 second' END,
        CASE WHEN code IS NULL THEN now() END,
        code, message, claim_delivery.published_at, claim_delivery.not_after
    )
    ON CONFLICT ON CONSTRAINT deliveries_pkey DO UPDATE SET
        workflow = excluded.workflow,
        recipient = excluded.recipient,
        locale = excluded.locale,
        metadata = excluded.metadata,
        source_message_id = excluded.source_message_id,
        status = excluded.status,
        status_reason = CASE
            WHEN excluded.status = 'skipped' THEN excluded.status_reason
            WHEN d.status = 'in_progress' THEN claim_delivery.takeover_reason
        END,
        attempts = d.attempts + excluded.attempts,
        claim_token = excluded.claim_token,
        lease_expires_at = excluded.lease_expires_at,
        last_attempted_at = coalesce(excluded.last_attempted_at, d.last_attempted_at),
        -- A claim keeps the last error (what the retry is about); a skip says why.
        last_error_code = coalesce(excluded.last_error_code, d.last_error_code),
        last_error_message = CASE WHEN excluded.status = 'skipped'
                                  THEN excluded.last_error_message
                                  ELSE d.last_error_message END,
        published_at = least(d.published_at, excluded.published_at),
        not_after = least(d.not_after, excluded.not_after)
    WHERE d.status IN ('queued', 'retrying')
       OR (d.status = 'in_progress' AND d.lease_expires_at < now())
    RETURNING d.claim_token, d.attempts, d.lease_expires_at INTO token, attempt, lease_until;

    IF FOUND THEN
        outcome := CASE WHEN code IS NULL THEN 'claimed' ELSE 'skipped' END;
        RETURN;
    END IF;
    -- Nothing to do: what stopped us, read after the guard failed (a fresh snapshot), so the
    -- caller needs no second round trip to tell "finished" from "held elsewhere".
    outcome := 'unclaimed';
    code := NULL;
    reason := NULL;
    message := NULL;
    SELECT d.status INTO current_status FROM email.deliveries d
     WHERE d.delivery_id = claim_delivery.delivery_id;
END
$$;

--
-- Name: claim_relay_probe(text, integer); Type: FUNCTION; Schema: email; Owner: -
--

CREATE FUNCTION email.claim_relay_probe(relay text, seconds integer) RETURNS boolean
    LANGUAGE plpgsql
    AS $$
BEGIN
    UPDATE email.relay_circuits AS c
       SET probe_until = now() + claim_relay_probe.seconds * interval '1 second'
     WHERE c.relay = claim_relay_probe.relay
       AND c.reopens_at <= now()
       AND (c.probe_until IS NULL OR c.probe_until <= now());
    RETURN FOUND;
END
$$;

--
-- Name: guard_delivery_transition(); Type: FUNCTION; Schema: email; Owner: -
--

CREATE FUNCTION email.guard_delivery_transition() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog'
    AS $$
DECLARE
    from_status email.delivery_status := CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END;
BEGIN
    -- A same-status update is a transition only when it is a new claim (a lease taken over).
    IF TG_OP = 'UPDATE' AND OLD.status = NEW.status
       AND NEW.claim_token IS NOT DISTINCT FROM OLD.claim_token THEN
        NEW.updated_at := now();
        RETURN NEW;
    END IF;
    IF NOT email.transition_allowed(from_status, NEW.status) THEN
        RAISE EXCEPTION 'illegal delivery transition % -> % for delivery %',
            coalesce(from_status::text, '(new row)'), NEW.status, NEW.delivery_id
            USING ERRCODE = 'check_violation',
                  HINT = 'allowed transitions are listed in email.transition_allowed()';
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

--
-- Name: guard_provider_status(); Type: FUNCTION; Schema: email; Owner: -
--

CREATE FUNCTION email.guard_provider_status() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog'
    AS $$
BEGIN
    IF NOT email.provider_status_allowed(OLD.provider_status, NEW.provider_status) THEN
        RAISE EXCEPTION 'illegal provider status change % -> % for delivery %',
            coalesce(OLD.provider_status::text, '(none)'),
            coalesce(NEW.provider_status::text, '(none)'), NEW.delivery_id
            USING ERRCODE = 'check_violation',
                  HINT = 'allowed changes are listed in email.provider_status_allowed()';
    END IF;
    RETURN NEW;
END
$$;

--
-- Name: provider_status_allowed(email.provider_status, email.provider_status); Type: FUNCTION; Schema: email; Owner: -
--

CREATE FUNCTION email.provider_status_allowed(from_status email.provider_status, to_status email.provider_status) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    SET search_path TO 'pg_catalog'
    AS $$
    SELECT CASE
        WHEN to_status IS NULL THEN from_status IS NULL
        WHEN from_status IS NULL THEN true
        WHEN from_status IN ('bounced', 'complained') THEN false
        WHEN to_status = 'complained' THEN true
        WHEN to_status = 'bounced' THEN from_status = 'delivered'
        -- delivered, opened, clicked: only further along
        ELSE array_position(ARRAY['delivered', 'opened', 'clicked']::email.provider_status[],
                            to_status)
           > array_position(ARRAY['delivered', 'opened', 'clicked']::email.provider_status[],
                            from_status)
    END
$$;

--
-- Name: record_send_failure(text, uuid, text, integer, text, text, boolean, boolean, integer, integer); Type: FUNCTION; Schema: email; Owner: -
--

CREATE FUNCTION email.record_send_failure(delivery_id text, claim_token uuid, relay text, attempt integer, error_code text, error_message text, transient boolean, counts boolean, trip_after integer, cooldown_seconds integer) RETURNS boolean
    LANGUAGE plpgsql
    AS $$
DECLARE
    failures integer;
    open_until timestamptz;
    trips boolean;
BEGIN
    INSERT INTO email.delivery_events
        (delivery_id, status, attempt, error_code, error_message, payload)
    SELECT d.delivery_id, d.status, record_send_failure.attempt,
           record_send_failure.error_code, left(record_send_failure.error_message, 500),
           jsonb_build_object('relay', record_send_failure.relay,
                              'attempt_failed', true,
                              'transient', record_send_failure.transient)
      FROM email.deliveries d
     WHERE d.delivery_id = record_send_failure.delivery_id
       AND d.status = 'in_progress'
       AND d.claim_token = record_send_failure.claim_token;
    IF NOT record_send_failure.counts THEN
        RETURN false;
    END IF;
    -- The row lock serialises instances failing at once: each reads the other's count.
    SELECT c.consecutive_failures + 1, c.reopens_at INTO failures, open_until
      FROM email.relay_circuits c
     WHERE c.relay = record_send_failure.relay
       FOR UPDATE;
    trips := failures >= record_send_failure.trip_after
             AND (open_until IS NULL OR open_until <= now());
    UPDATE email.relay_circuits AS c SET
        consecutive_failures = failures,
        last_error_code = left(record_send_failure.error_code, 100),
        last_error_message = left(record_send_failure.error_message, 500),
        opened_at = CASE WHEN trips THEN now() ELSE c.opened_at END,
        reopens_at = CASE WHEN trips
                          THEN now() + record_send_failure.cooldown_seconds * interval '1 second'
                          ELSE c.reopens_at END,
        probe_until = CASE WHEN trips THEN NULL ELSE c.probe_until END,
        updated_at = now()
     WHERE c.relay = record_send_failure.relay;
    RETURN coalesce(trips, false);
END
$$;

--
-- Name: record_send_success(text); Type: FUNCTION; Schema: email; Owner: -
--

CREATE FUNCTION email.record_send_success(relay text) RETURNS boolean
    LANGUAGE plpgsql
    AS $$
DECLARE
    was_open boolean;
BEGIN
    SELECT c.reopens_at IS NOT NULL INTO was_open
      FROM email.relay_circuits c
     WHERE c.relay = record_send_success.relay
       FOR UPDATE;
    UPDATE email.relay_circuits AS c SET
        consecutive_failures = 0,
        opened_at = NULL,
        reopens_at = NULL,
        probe_until = NULL,
        updated_at = now()
     WHERE c.relay = record_send_success.relay
       AND (c.consecutive_failures > 0 OR c.reopens_at IS NOT NULL);
    RETURN coalesce(was_open, false);
END
$$;

--
-- Name: set_sent_if_claimed(text, uuid, integer, text, text, text, integer); Type: FUNCTION; Schema: email; Owner: -
--

CREATE FUNCTION email.set_sent_if_claimed(delivery_id text, claim_token uuid, attempts integer, provider_message_id text, relay_message_id text DEFAULT NULL::text, relay text DEFAULT NULL::text, smtp_ms integer DEFAULT NULL::integer) RETURNS SETOF text
    LANGUAGE plpgsql
    AS $$
BEGIN
    RETURN QUERY
    UPDATE email.deliveries AS d SET
        status = 'sent',
        status_reason = NULL,
        sent_at = now(),
        attempts = greatest(d.attempts, set_sent_if_claimed.attempts),
        provider_message_id = set_sent_if_claimed.provider_message_id,
        relay_message_id = set_sent_if_claimed.relay_message_id,
        relay = set_sent_if_claimed.relay,
        smtp_ms = set_sent_if_claimed.smtp_ms,
        last_error_code = NULL,
        last_error_message = NULL,
        claim_token = NULL,
        lease_expires_at = NULL
    WHERE d.delivery_id = set_sent_if_claimed.delivery_id
      AND d.status = 'in_progress'
      AND d.claim_token = set_sent_if_claimed.claim_token
    RETURNING d.delivery_id;
END
$$;

--
-- Name: set_unsent_if_claimed(text, uuid, email.delivery_status, text, integer, text, text); Type: FUNCTION; Schema: email; Owner: -
--

CREATE FUNCTION email.set_unsent_if_claimed(delivery_id text, claim_token uuid, status email.delivery_status, reason text, attempts integer, error_code text, error_message text) RETURNS SETOF text
    LANGUAGE plpgsql
    AS $$
BEGIN
    RETURN QUERY
    UPDATE email.deliveries AS d SET
        status = set_unsent_if_claimed.status,
        status_reason = set_unsent_if_claimed.reason,
        attempts = greatest(d.attempts, set_unsent_if_claimed.attempts),
        last_error_code = set_unsent_if_claimed.error_code,
        last_error_message = set_unsent_if_claimed.error_message,
        claim_token = NULL,
        lease_expires_at = NULL
    WHERE d.delivery_id = set_unsent_if_claimed.delivery_id
      AND d.status = 'in_progress'
      AND d.claim_token = set_unsent_if_claimed.claim_token
    RETURNING d.delivery_id;
END
$$;

--
-- Name: transition_allowed(email.delivery_status, email.delivery_status); Type: FUNCTION; Schema: email; Owner: -
--

CREATE FUNCTION email.transition_allowed(from_status email.delivery_status, to_status email.delivery_status) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$
    SELECT CASE
        WHEN from_status IS NULL THEN to_status IN ('queued', 'in_progress', 'failed', 'skipped')
        WHEN from_status = 'queued'
            THEN to_status IN ('in_progress', 'failed', 'dead_letter', 'skipped')
        WHEN from_status = 'in_progress'
            THEN to_status IN ('in_progress', 'sent', 'retrying', 'failed', 'dead_letter', 'skipped')
        WHEN from_status = 'retrying'
            THEN to_status IN ('in_progress', 'failed', 'dead_letter', 'skipped')
        WHEN from_status IN ('failed', 'dead_letter') THEN to_status = 'queued'
        ELSE false  -- sent, skipped: final
    END
$$;

--
-- Name: deliveries; Type: TABLE; Schema: email; Owner: -
--

CREATE TABLE email.deliveries (
    delivery_id text NOT NULL,
    workflow text,
    recipient text,
    locale text DEFAULT 'en'::text NOT NULL,
    status email.delivery_status NOT NULL,
    status_reason text,
    attempts integer DEFAULT 0 NOT NULL,
    last_error_code text,
    last_error_message text,
    last_attempted_at timestamp with time zone,
    queued_at timestamp with time zone DEFAULT now() NOT NULL,
    sent_at timestamp with time zone,
    claim_token uuid,
    lease_expires_at timestamp with time zone,
    provider_message_id text,
    source_message_id text,
    replays integer DEFAULT 0 NOT NULL,
    metadata jsonb,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    provider_status email.provider_status,
    delivered_at timestamp with time zone,
    opened_at timestamp with time zone,
    clicked_at timestamp with time zone,
    bounced_at timestamp with time zone,
    complained_at timestamp with time zone,
    bounce_type text,
    relay_message_id text,
    published_at timestamp with time zone,
    not_after timestamp with time zone,
    relay text,
    smtp_ms integer,
    CONSTRAINT addressable_unless_failed CHECK (((status = ANY (ARRAY['failed'::email.delivery_status, 'dead_letter'::email.delivery_status, 'queued'::email.delivery_status])) OR ((workflow IS NOT NULL) AND (recipient IS NOT NULL)))),
    CONSTRAINT deliveries_attempts_check CHECK ((attempts >= 0)),
    CONSTRAINT deliveries_bounce_type_check CHECK ((length(bounce_type) <= 100)),
    CONSTRAINT deliveries_delivery_id_check CHECK ((delivery_id ~ '^[A-Za-z0-9._:@-]{1,200}$'::text)),
    CONSTRAINT deliveries_last_error_message_check CHECK ((length(last_error_message) <= 500)),
    CONSTRAINT deliveries_recipient_check CHECK ((length(recipient) <= 254)),
    CONSTRAINT deliveries_relay_check CHECK ((relay = ANY (ARRAY['primary'::text, 'fallback'::text]))),
    CONSTRAINT deliveries_relay_message_id_check CHECK ((length(relay_message_id) <= 500)),
    CONSTRAINT deliveries_replays_check CHECK ((replays >= 0)),
    CONSTRAINT deliveries_smtp_ms_check CHECK ((smtp_ms >= 0)),
    CONSTRAINT lease_only_in_progress CHECK ((((status = 'in_progress'::email.delivery_status) = (claim_token IS NOT NULL)) AND ((claim_token IS NULL) = (lease_expires_at IS NULL)))),
    CONSTRAINT sent_exactly_when_sent_at CHECK (((status = 'sent'::email.delivery_status) = (sent_at IS NOT NULL))),
    CONSTRAINT sent_has_no_error CHECK (((status <> 'sent'::email.delivery_status) OR ((last_error_code IS NULL) AND (last_error_message IS NULL))))
);

--
-- Name: delivery_events; Type: TABLE; Schema: email; Owner: -
--

CREATE TABLE email.delivery_events (
    id bigint NOT NULL,
    delivery_id text NOT NULL,
    status email.delivery_status NOT NULL,
    attempt integer NOT NULL,
    error_code text,
    error_message text,
    payload jsonb DEFAULT '{}'::jsonb NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL
);

--
-- Name: delivery_events_id_seq; Type: SEQUENCE; Schema: email; Owner: -
--

CREATE SEQUENCE email.delivery_events_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

--
-- Name: delivery_events_id_seq; Type: SEQUENCE OWNED BY; Schema: email; Owner: -
--

ALTER SEQUENCE email.delivery_events_id_seq OWNED BY email.delivery_events.id;

--
-- Name: provider_events; Type: TABLE; Schema: email; Owner: -
--

CREATE TABLE email.provider_events (
    id bigint NOT NULL,
    provider text NOT NULL,
    provider_event_id text NOT NULL,
    delivery_id text,
    event_type text NOT NULL,
    occurred_at timestamp with time zone NOT NULL,
    received_at timestamp with time zone DEFAULT now() NOT NULL,
    bounce_type text,
    recipient text,
    tagged_delivery_id text,
    message_id text,
    relay_message_id text,
    detail jsonb DEFAULT '{}'::jsonb NOT NULL,
    CONSTRAINT provider_events_bounce_type_check CHECK ((length(bounce_type) <= 100)),
    CONSTRAINT provider_events_event_type_check CHECK ((event_type = ANY (ARRAY['delivered'::text, 'opened'::text, 'clicked'::text, 'bounced'::text, 'deferred'::text, 'complained'::text]))),
    CONSTRAINT provider_events_message_id_check CHECK ((length(message_id) <= 1000)),
    CONSTRAINT provider_events_provider_check CHECK ((provider ~ '^[a-z0-9_-]{1,40}$'::text)),
    CONSTRAINT provider_events_provider_event_id_check CHECK (((length(provider_event_id) >= 1) AND (length(provider_event_id) <= 500))),
    CONSTRAINT provider_events_recipient_check CHECK ((length(recipient) <= 254)),
    CONSTRAINT provider_events_relay_message_id_check CHECK ((length(relay_message_id) <= 500)),
    CONSTRAINT provider_events_tagged_delivery_id_check CHECK ((length(tagged_delivery_id) <= 200))
);

--
-- Name: provider_events_id_seq; Type: SEQUENCE; Schema: email; Owner: -
--

CREATE SEQUENCE email.provider_events_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;

--
-- Name: provider_events_id_seq; Type: SEQUENCE OWNED BY; Schema: email; Owner: -
--

ALTER SEQUENCE email.provider_events_id_seq OWNED BY email.provider_events.id;

--
-- Name: relay_circuits; Type: TABLE; Schema: email; Owner: -
--

CREATE TABLE email.relay_circuits (
    relay text NOT NULL,
    consecutive_failures integer DEFAULT 0 NOT NULL,
    opened_at timestamp with time zone,
    reopens_at timestamp with time zone,
    probe_until timestamp with time zone,
    last_error_code text,
    last_error_message text,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT open_since_when CHECK (((opened_at IS NULL) = (reopens_at IS NULL))),
    CONSTRAINT relay_circuits_consecutive_failures_check CHECK ((consecutive_failures >= 0)),
    CONSTRAINT relay_circuits_last_error_code_check CHECK ((length(last_error_code) <= 100)),
    CONSTRAINT relay_circuits_last_error_message_check CHECK ((length(last_error_message) <= 500)),
    CONSTRAINT relay_circuits_relay_check CHECK ((relay = ANY (ARRAY['primary'::text, 'fallback'::text])))
);

--
-- Name: schema_migrations; Type: TABLE; Schema: email; Owner: -
--

CREATE TABLE email.schema_migrations (
    version integer NOT NULL,
    name text NOT NULL,
    applied_at timestamp with time zone DEFAULT now() NOT NULL
);

--
-- Name: suppressions; Type: TABLE; Schema: email; Owner: -
--

CREATE TABLE email.suppressions (
    address text NOT NULL,
    reason text NOT NULL,
    delivery_id text,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    expires_at timestamp with time zone,
    id bigint NOT NULL,
    CONSTRAINT suppressions_address_check CHECK (((address = lower(address)) AND (length(address) <= 254))),
    CONSTRAINT suppressions_reason_check CHECK ((reason = ANY (ARRAY['hard_bounce'::text, 'complaint'::text, 'manual'::text])))
);

--
-- Name: suppressions_id_seq; Type: SEQUENCE; Schema: email; Owner: -
--

ALTER TABLE email.suppressions ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME email.suppressions_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

--
-- Name: webhook_tokens; Type: TABLE; Schema: email; Owner: -
--

CREATE TABLE email.webhook_tokens (
    provider text NOT NULL,
    token_sha256 bytea NOT NULL,
    expires_at timestamp with time zone NOT NULL,
    CONSTRAINT webhook_tokens_provider_check CHECK ((provider ~ '^[a-z0-9_-]{1,40}$'::text)),
    CONSTRAINT webhook_tokens_token_sha256_check CHECK ((length(token_sha256) = 32))
);

--
-- Name: delivery_events id; Type: DEFAULT; Schema: email; Owner: -
--

ALTER TABLE ONLY email.delivery_events ALTER COLUMN id SET DEFAULT nextval('email.delivery_events_id_seq'::regclass);

--
-- Name: provider_events id; Type: DEFAULT; Schema: email; Owner: -
--

ALTER TABLE ONLY email.provider_events ALTER COLUMN id SET DEFAULT nextval('email.provider_events_id_seq'::regclass);

--
-- Name: deliveries deliveries_pkey; Type: CONSTRAINT; Schema: email; Owner: -
--

ALTER TABLE ONLY email.deliveries
    ADD CONSTRAINT deliveries_pkey PRIMARY KEY (delivery_id);

--
-- Name: delivery_events delivery_events_pkey; Type: CONSTRAINT; Schema: email; Owner: -
--

ALTER TABLE ONLY email.delivery_events
    ADD CONSTRAINT delivery_events_pkey PRIMARY KEY (id);

--
-- Name: provider_events provider_events_once; Type: CONSTRAINT; Schema: email; Owner: -
--

ALTER TABLE ONLY email.provider_events
    ADD CONSTRAINT provider_events_once UNIQUE (provider, provider_event_id);

--
-- Name: provider_events provider_events_pkey; Type: CONSTRAINT; Schema: email; Owner: -
--

ALTER TABLE ONLY email.provider_events
    ADD CONSTRAINT provider_events_pkey PRIMARY KEY (id);

--
-- Name: relay_circuits relay_circuits_pkey; Type: CONSTRAINT; Schema: email; Owner: -
--

ALTER TABLE ONLY email.relay_circuits
    ADD CONSTRAINT relay_circuits_pkey PRIMARY KEY (relay);

--
-- Name: schema_migrations schema_migrations_pkey; Type: CONSTRAINT; Schema: email; Owner: -
--

ALTER TABLE ONLY email.schema_migrations
    ADD CONSTRAINT schema_migrations_pkey PRIMARY KEY (version);

--
-- Name: suppressions suppressions_pkey; Type: CONSTRAINT; Schema: email; Owner: -
--

ALTER TABLE ONLY email.suppressions
    ADD CONSTRAINT suppressions_pkey PRIMARY KEY (address);

--
-- Name: webhook_tokens webhook_tokens_pkey; Type: CONSTRAINT; Schema: email; Owner: -
--

ALTER TABLE ONLY email.webhook_tokens
    ADD CONSTRAINT webhook_tokens_pkey PRIMARY KEY (provider, token_sha256);

--
-- Name: deliveries_created_at_idx; Type: INDEX; Schema: email; Owner: -
--

CREATE INDEX deliveries_created_at_idx ON email.deliveries USING btree (created_at, delivery_id);

--
-- Name: deliveries_in_progress_lease_idx; Type: INDEX; Schema: email; Owner: -
--

CREATE INDEX deliveries_in_progress_lease_idx ON email.deliveries USING btree (lease_expires_at) WHERE (status = 'in_progress'::email.delivery_status);

--
-- Name: deliveries_lower_recipient_created_at_idx; Type: INDEX; Schema: email; Owner: -
--

CREATE INDEX deliveries_lower_recipient_created_at_idx ON email.deliveries USING btree (lower(recipient), created_at, delivery_id);

--
-- Name: deliveries_provider_message_id_idx; Type: INDEX; Schema: email; Owner: -
--

CREATE INDEX deliveries_provider_message_id_idx ON email.deliveries USING btree (provider_message_id) WHERE (provider_message_id IS NOT NULL);

--
-- Name: deliveries_rate_limit_idx; Type: INDEX; Schema: email; Owner: -
--

CREATE INDEX deliveries_rate_limit_idx ON email.deliveries USING btree (lower(recipient), workflow, COALESCE(sent_at, lease_expires_at)) WHERE (status = ANY (ARRAY['sent'::email.delivery_status, 'in_progress'::email.delivery_status]));

--
-- Name: deliveries_recipient_updated_at_idx; Type: INDEX; Schema: email; Owner: -
--

CREATE INDEX deliveries_recipient_updated_at_idx ON email.deliveries USING btree (recipient, updated_at);

--
-- Name: deliveries_relay_message_id_idx; Type: INDEX; Schema: email; Owner: -
--

CREATE INDEX deliveries_relay_message_id_idx ON email.deliveries USING btree (relay_message_id) WHERE (relay_message_id IS NOT NULL);

--
-- Name: deliveries_status_updated_at_idx; Type: INDEX; Schema: email; Owner: -
--

CREATE INDEX deliveries_status_updated_at_idx ON email.deliveries USING btree (status, updated_at);

--
-- Name: delivery_events_delivery_id_idx; Type: INDEX; Schema: email; Owner: -
--

CREATE INDEX delivery_events_delivery_id_idx ON email.delivery_events USING btree (delivery_id, id);

--
-- Name: provider_events_delivery_id_idx; Type: INDEX; Schema: email; Owner: -
--

CREATE INDEX provider_events_delivery_id_idx ON email.provider_events USING btree (delivery_id, occurred_at);

--
-- Name: provider_events_received_at_idx; Type: INDEX; Schema: email; Owner: -
--

CREATE INDEX provider_events_received_at_idx ON email.provider_events USING btree (received_at);

--
-- Name: provider_events_unmatched_idx; Type: INDEX; Schema: email; Owner: -
--

CREATE INDEX provider_events_unmatched_idx ON email.provider_events USING btree (received_at) WHERE (delivery_id IS NULL);

--
-- Name: suppressions_created_at_id_idx; Type: INDEX; Schema: email; Owner: -
--

CREATE UNIQUE INDEX suppressions_created_at_id_idx ON email.suppressions USING btree (created_at, id);

--
-- Name: webhook_tokens_expires_at_idx; Type: INDEX; Schema: email; Owner: -
--

CREATE INDEX webhook_tokens_expires_at_idx ON email.webhook_tokens USING btree (expires_at);

--
-- Name: deliveries deliveries_audit_provider_status; Type: TRIGGER; Schema: email; Owner: -
--

CREATE TRIGGER deliveries_audit_provider_status AFTER UPDATE ON email.deliveries FOR EACH ROW WHEN ((old.provider_status IS DISTINCT FROM new.provider_status)) EXECUTE FUNCTION email.audit_provider_status();

--
-- Name: deliveries deliveries_audit_transition; Type: TRIGGER; Schema: email; Owner: -
--

CREATE TRIGGER deliveries_audit_transition AFTER INSERT OR UPDATE ON email.deliveries FOR EACH ROW EXECUTE FUNCTION email.audit_delivery_transition();

--
-- Name: deliveries deliveries_guard_provider_status; Type: TRIGGER; Schema: email; Owner: -
--

CREATE TRIGGER deliveries_guard_provider_status BEFORE UPDATE ON email.deliveries FOR EACH ROW WHEN ((old.provider_status IS DISTINCT FROM new.provider_status)) EXECUTE FUNCTION email.guard_provider_status();

--
-- Name: deliveries deliveries_guard_transition; Type: TRIGGER; Schema: email; Owner: -
--

CREATE TRIGGER deliveries_guard_transition BEFORE INSERT OR UPDATE ON email.deliveries FOR EACH ROW EXECUTE FUNCTION email.guard_delivery_transition();

--
-- Name: delivery_events delivery_events_delivery_id_fkey; Type: FK CONSTRAINT; Schema: email; Owner: -
--

ALTER TABLE ONLY email.delivery_events
    ADD CONSTRAINT delivery_events_delivery_id_fkey FOREIGN KEY (delivery_id) REFERENCES email.deliveries(delivery_id) ON DELETE CASCADE;

--
-- Name: provider_events provider_events_delivery_id_fkey; Type: FK CONSTRAINT; Schema: email; Owner: -
--

ALTER TABLE ONLY email.provider_events
    ADD CONSTRAINT provider_events_delivery_id_fkey FOREIGN KEY (delivery_id) REFERENCES email.deliveries(delivery_id) ON DELETE CASCADE;

--
-- Name: suppressions suppressions_delivery_id_fkey; Type: FK CONSTRAINT; Schema: email; Owner: -
--

ALTER TABLE ONLY email.suppressions
    ADD CONSTRAINT suppressions_delivery_id_fkey FOREIGN KEY (delivery_id) REFERENCES email.deliveries(delivery_id) ON DELETE SET NULL;

--
-- Name: deliveries; Type: ROW SECURITY; Schema: email; Owner: -
--

ALTER TABLE email.deliveries ENABLE ROW LEVEL SECURITY;

--
-- Name: delivery_events; Type: ROW SECURITY; Schema: email; Owner: -
--

ALTER TABLE email.delivery_events ENABLE ROW LEVEL SECURITY;

--
-- Name: provider_events; Type: ROW SECURITY; Schema: email; Owner: -
--

ALTER TABLE email.provider_events ENABLE ROW LEVEL SECURITY;

--
-- Name: deliveries reader_select; Type: POLICY; Schema: email; Owner: -
--

CREATE POLICY reader_select ON email.deliveries FOR SELECT TO email_reader USING (true);

--
-- Name: delivery_events reader_select; Type: POLICY; Schema: email; Owner: -
--

CREATE POLICY reader_select ON email.delivery_events FOR SELECT TO email_reader USING (true);

--
-- Name: provider_events reader_select; Type: POLICY; Schema: email; Owner: -
--

CREATE POLICY reader_select ON email.provider_events FOR SELECT TO email_reader USING (true);

--
-- Name: relay_circuits reader_select; Type: POLICY; Schema: email; Owner: -
--

CREATE POLICY reader_select ON email.relay_circuits FOR SELECT TO email_reader USING (true);

--
-- Name: suppressions reader_select; Type: POLICY; Schema: email; Owner: -
--

CREATE POLICY reader_select ON email.suppressions FOR SELECT TO email_reader USING (true);

--
-- Name: relay_circuits; Type: ROW SECURITY; Schema: email; Owner: -
--

ALTER TABLE email.relay_circuits ENABLE ROW LEVEL SECURITY;

--
-- Name: suppressions; Type: ROW SECURITY; Schema: email; Owner: -
--

ALTER TABLE email.suppressions ENABLE ROW LEVEL SECURITY;

--
-- Name: webhook_tokens; Type: ROW SECURITY; Schema: email; Owner: -
--

ALTER TABLE email.webhook_tokens ENABLE ROW LEVEL SECURITY;

--
-- Name: webhook_tokens worker_delete_expired; Type: POLICY; Schema: email; Owner: -
--

CREATE POLICY worker_delete_expired ON email.webhook_tokens FOR DELETE TO email_worker USING ((expires_at < now()));

--
-- Name: deliveries worker_insert; Type: POLICY; Schema: email; Owner: -
--

CREATE POLICY worker_insert ON email.deliveries FOR INSERT TO email_worker WITH CHECK (true);

--
-- Name: delivery_events worker_insert; Type: POLICY; Schema: email; Owner: -
--

CREATE POLICY worker_insert ON email.delivery_events FOR INSERT TO email_worker WITH CHECK (true);

--
-- Name: provider_events worker_insert; Type: POLICY; Schema: email; Owner: -
--

CREATE POLICY worker_insert ON email.provider_events FOR INSERT TO email_worker WITH CHECK (true);

--
-- Name: suppressions worker_insert; Type: POLICY; Schema: email; Owner: -
--

CREATE POLICY worker_insert ON email.suppressions FOR INSERT TO email_worker WITH CHECK (true);

--
-- Name: webhook_tokens worker_insert; Type: POLICY; Schema: email; Owner: -
--

CREATE POLICY worker_insert ON email.webhook_tokens FOR INSERT TO email_worker WITH CHECK (true);

--
-- Name: deliveries worker_select; Type: POLICY; Schema: email; Owner: -
--

CREATE POLICY worker_select ON email.deliveries FOR SELECT TO email_worker USING (true);

--
-- Name: provider_events worker_select; Type: POLICY; Schema: email; Owner: -
--

CREATE POLICY worker_select ON email.provider_events FOR SELECT TO email_worker USING (true);

--
-- Name: relay_circuits worker_select; Type: POLICY; Schema: email; Owner: -
--

CREATE POLICY worker_select ON email.relay_circuits FOR SELECT TO email_worker USING (true);

--
-- Name: suppressions worker_select; Type: POLICY; Schema: email; Owner: -
--

CREATE POLICY worker_select ON email.suppressions FOR SELECT TO email_worker USING (true);

--
-- Name: webhook_tokens worker_select; Type: POLICY; Schema: email; Owner: -
--

CREATE POLICY worker_select ON email.webhook_tokens FOR SELECT TO email_worker USING (true);

--
-- Name: deliveries worker_update; Type: POLICY; Schema: email; Owner: -
--

CREATE POLICY worker_update ON email.deliveries FOR UPDATE TO email_worker USING (true) WITH CHECK (true);

--
-- Name: relay_circuits worker_update; Type: POLICY; Schema: email; Owner: -
--

CREATE POLICY worker_update ON email.relay_circuits FOR UPDATE TO email_worker USING (true) WITH CHECK (true);

--
-- Name: suppressions worker_update; Type: POLICY; Schema: email; Owner: -
--

CREATE POLICY worker_update ON email.suppressions FOR UPDATE TO email_worker USING (true) WITH CHECK (true);

--
-- Name: SCHEMA email; Type: ACL; Schema: -; Owner: -
--

GRANT USAGE ON SCHEMA email TO email_worker;
GRANT USAGE ON SCHEMA email TO email_reader;

--
-- Name: FUNCTION apply_provider_event(provider text, provider_event_id text, event_type text, occurred_at timestamp with time zone, recipient text, delivery_id text, message_id text, relay_message_id text, bounce_type text, detail jsonb); Type: ACL; Schema: email; Owner: -
--

REVOKE ALL ON FUNCTION email.apply_provider_event(provider text, provider_event_id text, event_type text, occurred_at timestamp with time zone, recipient text, delivery_id text, message_id text, relay_message_id text, bounce_type text, detail jsonb) FROM PUBLIC;
GRANT ALL ON FUNCTION email.apply_provider_event(provider text, provider_event_id text, event_type text, occurred_at timestamp with time zone, recipient text, delivery_id text, message_id text, relay_message_id text, bounce_type text, detail jsonb) TO email_worker;

--
-- Name: FUNCTION audit_delivery_transition(); Type: ACL; Schema: email; Owner: -
--

REVOKE ALL ON FUNCTION email.audit_delivery_transition() FROM PUBLIC;

--
-- Name: FUNCTION audit_provider_status(); Type: ACL; Schema: email; Owner: -
--

REVOKE ALL ON FUNCTION email.audit_provider_status() FROM PUBLIC;

--
-- Name: FUNCTION claim_delivery(delivery_id text, workflow text, recipient text, locale text, metadata jsonb, source_message_id text, lease_seconds integer, rate_limit integer, rate_window_seconds integer, takeover_reason text, published_at timestamp with time zone, not_after timestamp with time zone, OUT outcome text, OUT token uuid, OUT attempt integer, OUT lease_until timestamp with time zone, OUT code text, OUT reason text, OUT message text, OUT current_status email.delivery_status); Type: ACL; Schema: email; Owner: -
--

REVOKE ALL ON FUNCTION email.claim_delivery(delivery_id text, workflow text, recipient text, locale text, metadata jsonb, source_message_id text, lease_seconds integer, rate_limit integer, rate_window_seconds integer, takeover_reason text, published_at timestamp with time zone, not_after timestamp with time zone, OUT outcome text, OUT token uuid, OUT attempt integer, OUT lease_until timestamp with time zone, OUT code text, OUT reason text, OUT message text, OUT current_status email.delivery_status) FROM PUBLIC;
GRANT ALL ON FUNCTION email.claim_delivery(delivery_id text, workflow text, recipient text, locale text, metadata jsonb, source_message_id text, lease_seconds integer, rate_limit integer, rate_window_seconds integer, takeover_reason text, published_at timestamp with time zone, not_after timestamp with time zone, OUT outcome text, OUT token uuid, OUT attempt integer, OUT lease_until timestamp with time zone, OUT code text, OUT reason text, OUT message text, OUT current_status email.delivery_status) TO email_worker;

--
-- Name: FUNCTION claim_relay_probe(relay text, seconds integer); Type: ACL; Schema: email; Owner: -
--

REVOKE ALL ON FUNCTION email.claim_relay_probe(relay text, seconds integer) FROM PUBLIC;
GRANT ALL ON FUNCTION email.claim_relay_probe(relay text, seconds integer) TO email_worker;

--
-- Name: FUNCTION guard_delivery_transition(); Type: ACL; Schema: email; Owner: -
--

REVOKE ALL ON FUNCTION email.guard_delivery_transition() FROM PUBLIC;

--
-- Name: FUNCTION guard_provider_status(); Type: ACL; Schema: email; Owner: -
--

REVOKE ALL ON FUNCTION email.guard_provider_status() FROM PUBLIC;

--
-- Name: FUNCTION provider_status_allowed(from_status email.provider_status, to_status email.provider_status); Type: ACL; Schema: email; Owner: -
--

REVOKE ALL ON FUNCTION email.provider_status_allowed(from_status email.provider_status, to_status email.provider_status) FROM PUBLIC;
GRANT ALL ON FUNCTION email.provider_status_allowed(from_status email.provider_status, to_status email.provider_status) TO email_worker;
GRANT ALL ON FUNCTION email.provider_status_allowed(from_status email.provider_status, to_status email.provider_status) TO email_reader;

--
-- Name: FUNCTION record_send_failure(delivery_id text, claim_token uuid, relay text, attempt integer, error_code text, error_message text, transient boolean, counts boolean, trip_after integer, cooldown_seconds integer); Type: ACL; Schema: email; Owner: -
--

REVOKE ALL ON FUNCTION email.record_send_failure(delivery_id text, claim_token uuid, relay text, attempt integer, error_code text, error_message text, transient boolean, counts boolean, trip_after integer, cooldown_seconds integer) FROM PUBLIC;
GRANT ALL ON FUNCTION email.record_send_failure(delivery_id text, claim_token uuid, relay text, attempt integer, error_code text, error_message text, transient boolean, counts boolean, trip_after integer, cooldown_seconds integer) TO email_worker;

--
-- Name: FUNCTION record_send_success(relay text); Type: ACL; Schema: email; Owner: -
--

REVOKE ALL ON FUNCTION email.record_send_success(relay text) FROM PUBLIC;
GRANT ALL ON FUNCTION email.record_send_success(relay text) TO email_worker;

--
-- Name: FUNCTION set_sent_if_claimed(delivery_id text, claim_token uuid, attempts integer, provider_message_id text, relay_message_id text, relay text, smtp_ms integer); Type: ACL; Schema: email; Owner: -
--

REVOKE ALL ON FUNCTION email.set_sent_if_claimed(delivery_id text, claim_token uuid, attempts integer, provider_message_id text, relay_message_id text, relay text, smtp_ms integer) FROM PUBLIC;
GRANT ALL ON FUNCTION email.set_sent_if_claimed(delivery_id text, claim_token uuid, attempts integer, provider_message_id text, relay_message_id text, relay text, smtp_ms integer) TO email_worker;

--
-- Name: FUNCTION set_unsent_if_claimed(delivery_id text, claim_token uuid, status email.delivery_status, reason text, attempts integer, error_code text, error_message text); Type: ACL; Schema: email; Owner: -
--

REVOKE ALL ON FUNCTION email.set_unsent_if_claimed(delivery_id text, claim_token uuid, status email.delivery_status, reason text, attempts integer, error_code text, error_message text) FROM PUBLIC;
GRANT ALL ON FUNCTION email.set_unsent_if_claimed(delivery_id text, claim_token uuid, status email.delivery_status, reason text, attempts integer, error_code text, error_message text) TO email_worker;

--
-- Name: FUNCTION transition_allowed(from_status email.delivery_status, to_status email.delivery_status); Type: ACL; Schema: email; Owner: -
--

REVOKE ALL ON FUNCTION email.transition_allowed(from_status email.delivery_status, to_status email.delivery_status) FROM PUBLIC;
GRANT ALL ON FUNCTION email.transition_allowed(from_status email.delivery_status, to_status email.delivery_status) TO email_worker;
GRANT ALL ON FUNCTION email.transition_allowed(from_status email.delivery_status, to_status email.delivery_status) TO email_reader;

--
-- Name: TABLE deliveries; Type: ACL; Schema: email; Owner: -
--

GRANT SELECT,INSERT,UPDATE ON TABLE email.deliveries TO email_worker;
GRANT SELECT ON TABLE email.deliveries TO email_reader;

--
-- Name: TABLE delivery_events; Type: ACL; Schema: email; Owner: -
--

GRANT INSERT ON TABLE email.delivery_events TO email_worker;
GRANT SELECT ON TABLE email.delivery_events TO email_reader;

--
-- Name: SEQUENCE delivery_events_id_seq; Type: ACL; Schema: email; Owner: -
--

GRANT USAGE ON SEQUENCE email.delivery_events_id_seq TO email_worker;

--
-- Name: TABLE provider_events; Type: ACL; Schema: email; Owner: -
--

GRANT SELECT,INSERT ON TABLE email.provider_events TO email_worker;
GRANT SELECT ON TABLE email.provider_events TO email_reader;

--
-- Name: SEQUENCE provider_events_id_seq; Type: ACL; Schema: email; Owner: -
--

GRANT USAGE ON SEQUENCE email.provider_events_id_seq TO email_worker;

--
-- Name: TABLE relay_circuits; Type: ACL; Schema: email; Owner: -
--

GRANT SELECT,UPDATE ON TABLE email.relay_circuits TO email_worker;
GRANT SELECT ON TABLE email.relay_circuits TO email_reader;

--
-- Name: TABLE suppressions; Type: ACL; Schema: email; Owner: -
--

GRANT SELECT,INSERT,UPDATE ON TABLE email.suppressions TO email_worker;
GRANT SELECT ON TABLE email.suppressions TO email_reader;

--
-- Name: TABLE webhook_tokens; Type: ACL; Schema: email; Owner: -
--

GRANT SELECT,INSERT,DELETE ON TABLE email.webhook_tokens TO email_worker;

--
--

-- The migrations this file stands for, recorded as applied.
INSERT INTO email.schema_migrations (version, name) VALUES
    (1, 'ledger'),
    (2, 'provider_events'),
    (3, 'provider_indexes'),
    (4, 'rate_limit_index'),
    (5, 'claim_delivery'),
    (6, 'transition_functions'),
    (7, 'recipient_search_indexes'),
    (8, 'webhook_hardening'),
    (9, 'suppression_ids'),
    (10, 'freshness'),
    (11, 'idn_addresses'),
    (12, 'relays');
