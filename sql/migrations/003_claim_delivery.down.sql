-- Back to 002: the claim is the single INSERT ... ON CONFLICT of sql/queries.sql again, with
-- no suppression check and no rate limit. Roll the workers back first: a worker of this
-- version calls email.claim_delivery(). Rows already `skipped` stay skipped (final).
SET LOCAL lock_timeout = '5s';

DROP FUNCTION IF EXISTS email.claim_delivery(
    text, text, text, text, jsonb, text, integer, integer, integer, text);
DROP INDEX IF EXISTS email.deliveries_rate_limit_idx;
