-- Back to 011: one relay. The breaker, the per-relay columns and functions are dropped (what
-- they held is lost; the per-attempt audit rows stay, as history). Roll the workers back
-- first: a worker of this version calls the functions dropped here.
SET LOCAL lock_timeout = '5s';

DROP FUNCTION email.record_send_failure(
    text, uuid, text, integer, text, text, boolean, boolean, integer, integer);
DROP FUNCTION email.claim_relay_probe(text, integer);
DROP FUNCTION email.record_send_success(text);
DROP TABLE email.relay_circuits;

DROP FUNCTION email.set_sent_if_claimed(text, uuid, integer, text, text, text, integer);

CREATE FUNCTION email.set_sent_if_claimed(
    delivery_id text,
    claim_token uuid,
    attempts integer,
    provider_message_id text,
    relay_message_id text DEFAULT NULL
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
        -- The relay's own id from its 250 reply (contract section 2): provider events may
        -- name it.
        relay_message_id = set_sent_if_claimed.relay_message_id,
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

REVOKE ALL ON FUNCTION email.set_sent_if_claimed(text, uuid, integer, text, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION email.set_sent_if_claimed(text, uuid, integer, text, text)
    TO email_worker;

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
            'replays', NULLIF(NEW.replays, 0)
        ))
    );
    RETURN NULL;
END
$$;

ALTER TABLE email.deliveries DROP COLUMN relay, DROP COLUMN smtp_ms;
