-- Two relays and a circuit breaker shared by every instance.
--
--   email.deliveries.relay    the relay that accepted the email: 'primary' or 'fallback'
--                             (NULL until sent, and for rows sent before this migration);
--   email.deliveries.smtp_ms  how long the accepted SMTP exchange took (per-relay stats);
--   email.relay_circuits      one row per relay: its consecutive fail-over failures and,
--                             while its circuit is open, when it may be tried again.
--
-- A circuit is `closed` (reopens_at IS NULL), `open` (reopens_at in the future) or
-- `half-open` (reopens_at has passed: one delivery at a time may try the relay; the one that
-- does holds `probe_until`, a short lease). Every change is one guarded UPDATE, so two
-- instances tripping or probing at once are decided by the row lock: zero rows is "lost".
--
-- Additive and safe while workers of the previous release run: the columns are nullable
-- without a default, set_sent_if_claimed gains two parameters with DEFAULT NULL (the old
-- call resolves to the new function), and the audit trigger only adds a payload key.
SET LOCAL lock_timeout = '5s';

ALTER TABLE email.deliveries
    ADD COLUMN relay text CHECK (relay IN ('primary', 'fallback')),
    ADD COLUMN smtp_ms integer CHECK (smtp_ms >= 0);

CREATE TABLE email.relay_circuits (
    relay text PRIMARY KEY CHECK (relay IN ('primary', 'fallback')),
    consecutive_failures integer NOT NULL DEFAULT 0 CHECK (consecutive_failures >= 0),
    opened_at timestamptz,
    reopens_at timestamptz,
    probe_until timestamptz,
    last_error_code text CHECK (length(last_error_code) <= 100),
    last_error_message text CHECK (length(last_error_message) <= 500),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT open_since_when CHECK ((opened_at IS NULL) = (reopens_at IS NULL))
);

INSERT INTO email.relay_circuits (relay) VALUES ('primary'), ('fallback');

REVOKE ALL ON email.relay_circuits FROM PUBLIC;
GRANT SELECT, UPDATE ON email.relay_circuits TO email_worker;
GRANT SELECT ON email.relay_circuits TO email_reader;
ALTER TABLE email.relay_circuits ENABLE ROW LEVEL SECURITY;
CREATE POLICY worker_select ON email.relay_circuits FOR SELECT TO email_worker USING (true);
CREATE POLICY worker_update ON email.relay_circuits FOR UPDATE TO email_worker
    USING (true) WITH CHECK (true);
CREATE POLICY reader_select ON email.relay_circuits FOR SELECT TO email_reader USING (true);

-- As migration 006's, plus the relay that accepted the email and the SMTP time.
DROP FUNCTION email.set_sent_if_claimed(text, uuid, integer, text, text);

CREATE FUNCTION email.set_sent_if_claimed(
    delivery_id text,
    claim_token uuid,
    attempts integer,
    provider_message_id text,
    relay_message_id text DEFAULT NULL,
    relay text DEFAULT NULL,
    smtp_ms integer DEFAULT NULL
) RETURNS SETOF text
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

REVOKE ALL ON FUNCTION
    email.set_sent_if_claimed(text, uuid, integer, text, text, text, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    email.set_sent_if_claimed(text, uuid, integer, text, text, text, integer) TO email_worker;

-- One failed send attempt: the audit row (the one exception to "one row per status change":
-- the delivery's current status, the error, and which relay failed), written only under the
-- caller's live claim; and, for a fail-over failure (`counts`), the relay's breaker: one more
-- consecutive failure, and the circuit opened for `cooldown_seconds` when that makes
-- `trip_after` and it is not open already (a half-open circuit whose trial failed reopens).
-- Returns whether this call opened it: of two instances tripping it at once, one does.
CREATE FUNCTION email.record_send_failure(
    delivery_id text,
    claim_token uuid,
    relay text,
    attempt integer,
    error_code text,
    error_message text,
    transient boolean,
    counts boolean,
    trip_after integer,
    cooldown_seconds integer
) RETURNS boolean
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

-- A half-open relay's trial: one delivery at a time, for `seconds`.
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

-- A relay accepted an email: its failure count is back to zero and an open or half-open
-- circuit closes. Returns whether the circuit was open (so the caller logs it closing once).
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

REVOKE ALL ON FUNCTION
    email.record_send_failure(text, uuid, text, integer, text, text, boolean, boolean, integer,
                              integer),
    email.claim_relay_probe(text, integer),
    email.record_send_success(text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    email.record_send_failure(text, uuid, text, integer, text, text, boolean, boolean, integer,
                              integer),
    email.claim_relay_probe(text, integer),
    email.record_send_success(text)
    TO email_worker;

-- The status-change audit row names the relay that accepted the email.
CREATE OR REPLACE FUNCTION email.audit_delivery_transition() RETURNS trigger
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
