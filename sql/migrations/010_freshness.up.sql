-- Freshness: a time-limited email (a code, a reset link) is never sent after its validity
-- end. Two columns and a claim that checks them:
--   published_at  the Pub/Sub publish time of the first copy of the event the ledger saw;
--   not_after     the validity end: the event's `not_after`, or what the worker derived
--                 from the publish time (`expires_in_minutes`) or the invite's `expires_at`.
-- A later copy (an upstream duplicate, a redelivery, a replay) never moves either later:
-- the claim keeps least() of the stored value and its own.
--
-- Additive and safe while workers of the previous release run: the columns are nullable
-- without a default (no rewrite; the ACCESS EXCLUSIVE lock is held for an instant), and the
-- claim gains two parameters with DEFAULT NULL, so the previous release's call (named
-- arguments, without them) resolves to the new function and behaves as before: a row it
-- writes has no validity end. tests/test_migration_010.py runs that release against it.
SET LOCAL lock_timeout = '5s';

ALTER TABLE email.deliveries
    ADD COLUMN published_at timestamptz,
    ADD COLUMN not_after timestamptz;

-- A new parameter list is a new function: drop the old one in the same transaction, so no
-- caller ever sees two (an ambiguous call) or none.
DROP FUNCTION email.claim_delivery(
    text, text, text, text, jsonb, text, integer, integer, integer, text);

-- As migration 005's, plus step 0 and the two columns. Returns one row:
--   outcome 'claimed'   token, attempts, lease_expires_at: the row is in_progress, ours;
--   outcome 'skipped'   code EXPIRED (reason expired), SUPPRESSED (reason hard_bounce,
--                       complaint, manual) or RATE_LIMITED (reason rate_limit), and message:
--                       the row is now `skipped` (final) with those as last_error_code,
--                       status_reason and last_error_message;
--   outcome 'unclaimed' current_status: the row's status (finished, or in_progress under a live
--                       lease).
-- The words are worker.ledger's ClaimOutcome, Reason and Code; tests/test_claim.py checks
-- that they agree.
--
-- Expiry is decided by the database's clock, in the same statement as the claim: a claim at
-- or after the validity end (the stored one or this copy's, whichever is earlier) ends the
-- row `skipped`, whatever brought the event back (a redelivery after transient failures, a
-- take-over of an expired lease, a replay). It is checked first: an expired email is
-- pointless whoever the recipient is, and the check takes no advisory lock.
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
    published_at timestamptz DEFAULT NULL,
    not_after timestamptz DEFAULT NULL,
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

REVOKE ALL ON FUNCTION email.claim_delivery(
    text, text, text, text, jsonb, text, integer, integer, integer, text, timestamptz, timestamptz)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION email.claim_delivery(
    text, text, text, text, jsonb, text, integer, integer, integer, text, timestamptz, timestamptz)
    TO email_worker;
