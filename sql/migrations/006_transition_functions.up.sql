-- The ledger's cost per email (issue 9, item 4; figures in the README, bench/ledgercost.py).
-- Much of the server's time per email went to parsing and planning, on every statement:
-- (1) the body of transition_allowed(), called by the guard trigger, and (2) the worker's
-- guarded UPDATE. Both are now planned once per connection.
--
-- Safe to apply while workers of the previous release run: the replaced function accepts the
-- same transitions as before, and the new functions are new. Nothing takes a table lock.
SET LOCAL lock_timeout = '5s';

-- 1. transition_allowed() without `SET search_path`. A SQL function with a SET clause is never
-- inlined, and PostgreSQL (before 18) parses and plans a called SQL function's body again in
-- every transaction: on the worker's autocommit connections, every statement. Without the
-- clause the planner inlines the CASE into the guard trigger's cached plan, planned once per
-- connection under the trigger's own `search_path = pg_catalog`. The body names no object
-- and no function, only enum labels and pg_catalog's comparisons. It compares enums, not
-- text: `skipped` (migration 002) is committed by now, and enums compare without a text
-- conversion.
-- Same table as 002's, the contract's section 3.
CREATE OR REPLACE FUNCTION email.transition_allowed(
    from_status email.delivery_status, to_status email.delivery_status
) RETURNS boolean
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

-- 2. The transitions a claim ends with, as functions: one short statement from the worker
-- (`SELECT ... FROM email.set_sent_if_claimed(...)`), and the guarded UPDATE inside is
-- planned once per connection (plpgsql caches its plans per session) instead of parsed and
-- planned on every call. Nothing is held across transactions, so a transaction-mode pooler
-- (PgBouncer, Supavisor) may hand each call to any server connection. Each is still one
-- guarded UPDATE named after its guard: no row back means the guard did not hold (another
-- claim took the row over, or this one already finished), an answer, not an error. The guard
-- and audit triggers fire as for any writer.
--
-- No SET clause (it costs a configuration save and restore per call): the functions run with
-- the caller's rights, name their table with its schema, and the guard trigger, which pins
-- its own search_path, still refuses whatever transition a caller could contrive.

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

-- The claim ends without an email: `retrying` (Pub/Sub will redeliver), `failed` (permanent)
-- or `dead_letter` (attempts exhausted), with the reason and the error.
CREATE FUNCTION email.set_unsent_if_claimed(
    delivery_id text,
    claim_token uuid,
    status email.delivery_status,
    reason text,
    attempts integer,
    error_code text,
    error_message text
) RETURNS SETOF text
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

REVOKE ALL ON FUNCTION
    email.set_sent_if_claimed(text, uuid, integer, text, text),
    email.set_unsent_if_claimed(text, uuid, email.delivery_status, text, integer, text, text)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    email.set_sent_if_claimed(text, uuid, integer, text, text),
    email.set_unsent_if_claimed(text, uuid, email.delivery_status, text, integer, text, text)
    TO email_worker;
