-- Back to 004: the previous release's claim is its own INSERT ... ON CONFLICT, with no
-- suppression check and no rate limit. Roll the workers back first: a worker of this version
-- calls email.claim_delivery(). Rows already `skipped` stay skipped (final).
SET LOCAL lock_timeout = '5s';

DROP FUNCTION IF EXISTS email.claim_delivery(
    text, text, text, text, jsonb, text, integer, integer, integer, text);
