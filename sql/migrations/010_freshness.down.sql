-- Back to 009: the claim of migration 005 (word for word), without the validity end, and
-- the two columns dropped (what they held is lost; nothing else reads them). Roll the
-- workers back first: a worker of this version passes published_at and not_after, which the
-- restored claim does not take. Rows already `skipped` with EXPIRED stay skipped (final).
SET LOCAL lock_timeout = '5s';

DROP FUNCTION email.claim_delivery(
    text, text, text, text, jsonb, text, integer, integer, integer, text, timestamptz, timestamptz);

CREATE FUNCTION email.claim_delivery(
    delivery_id text,
    workflow text,
    recipient text,
    locale text,
    metadata jsonb,
    source_message_id text,
    lease_seconds integer,
    rate_limit integer DEFAULT NULL,
    rate_window_seconds integer DEFAULT NULL,
    takeover_reason text DEFAULT 'lease_expired',
    OUT outcome text,
    OUT token uuid,
    OUT attempt integer,
    OUT lease_until timestamptz,
    OUT code text,
    OUT reason text,
    OUT message text,
    OUT current_status email.delivery_status
)
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
DECLARE
    rcpt text := lower(claim_delivery.recipient);
    since timestamptz;
    recent integer;
    new_status email.delivery_status;
BEGIN
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

    -- 3. One guarded upsert, the claim's guard of before: a new row, or one that is queued,
    -- retrying, or in progress under an expired lease. Concurrent claims of one id serialise
    -- on the row; the loser re-checks the guard against the winner's row and changes nothing.
    new_status := CASE WHEN code IS NULL THEN 'in_progress' ELSE 'skipped' END;
    INSERT INTO email.deliveries AS d (
        delivery_id, workflow, recipient, locale, metadata, source_message_id,
        status, status_reason, attempts, claim_token, lease_expires_at, last_attempted_at,
        last_error_code, last_error_message
    ) VALUES (
        claim_delivery.delivery_id, claim_delivery.workflow, claim_delivery.recipient,
        claim_delivery.locale, claim_delivery.metadata, claim_delivery.source_message_id,
        new_status, reason,
        CASE WHEN code IS NULL THEN 1 ELSE 0 END,
        CASE WHEN code IS NULL THEN gen_random_uuid() END,
        CASE WHEN code IS NULL THEN now() + claim_delivery.lease_seconds * interval '1 second' END,
        CASE WHEN code IS NULL THEN now() END,
        code, message
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
                                  ELSE d.last_error_message END
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

REVOKE ALL ON FUNCTION email.claim_delivery(
    text, text, text, text, jsonb, text, integer, integer, integer, text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION email.claim_delivery(
    text, text, text, text, jsonb, text, integer, integer, integer, text) TO email_worker;

ALTER TABLE email.deliveries
    DROP COLUMN not_after,
    DROP COLUMN published_at;
