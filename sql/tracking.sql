-- Provider events (docs/webhooks.md), loaded by worker/store/tracking.py. Each block starts with
-- `-- name: NAME`. The work is in email.apply_provider_event() (migration 002, matching and
-- times revised in 008): one short statement, one transaction per event.

-- name: apply_provider_event
SELECT email.apply_provider_event(
    provider => %(provider)s,
    provider_event_id => %(provider_event_id)s,
    event_type => %(event_type)s,
    occurred_at => %(occurred_at)s,
    recipient => %(recipient)s,
    delivery_id => %(delivery_id)s,
    message_id => %(message_id)s,
    relay_message_id => %(relay_message_id)s,
    bounce_type => %(bounce_type)s,
    detail => %(detail)s
) AS applied;

-- name: provider_events_for_delivery
SELECT id, provider, provider_event_id, event_type, occurred_at, received_at, bounce_type,
       detail
FROM email.provider_events
WHERE delivery_id = %(delivery_id)s
ORDER BY occurred_at, id;

-- name: count_prunable_unmatched
-- `python -m worker prune`: unmatched events hold an address and belong to no delivery, so
-- they would outlive every retention window; they go by received_at.
SELECT count(*) AS n FROM email.provider_events
WHERE delivery_id IS NULL AND received_at < now() - %(older_than_seconds)s * interval '1 second';

-- name: prune_unmatched_batch
WITH doomed AS (
    SELECT id FROM email.provider_events
    WHERE delivery_id IS NULL
      AND received_at < now() - %(older_than_seconds)s * interval '1 second'
    ORDER BY received_at
    LIMIT %(batch_size)s
    FOR UPDATE SKIP LOCKED
), gone AS (
    DELETE FROM email.provider_events WHERE id IN (SELECT id FROM doomed) RETURNING id
)
SELECT count(*) AS n FROM gone;

-- name: claim_webhook_token
-- A signature token's first use (migration 008): one row back, or none when the token was
-- claimed before (a replay; a concurrent claim waits on the key and then finds it taken). The
-- same statement forgets a few expired tokens, so the table holds about one freshness window
-- of them. The token itself is never sent here, only its SHA-256.
WITH forgotten AS (
    DELETE FROM email.webhook_tokens AS t
    USING (
        SELECT provider, token_sha256 FROM email.webhook_tokens
        WHERE expires_at < now()
        ORDER BY expires_at
        LIMIT 100
    ) AS expired
    WHERE t.provider = expired.provider AND t.token_sha256 = expired.token_sha256
)
INSERT INTO email.webhook_tokens (provider, token_sha256, expires_at)
VALUES (%(provider)s, %(token_sha256)s, now() + %(remember_seconds)s * interval '1 second')
ON CONFLICT (provider, token_sha256) DO NOTHING
RETURNING true AS first_use;
