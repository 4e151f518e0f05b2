-- The suppression list (docs/operating.md), loaded by worker/store/suppressions.py for
-- `python -m worker suppressions ...` and `history`. Each block starts with `-- name: NAME`.
-- Addresses are stored lower-cased (a CHECK on the table); callers pass them lower-cased.
-- The worker reads the list inside email.claim_delivery() (migration 005), not here.

-- name: list_suppressions
-- Newest first; `total` is the number of entries that match, before the limit.
SELECT address, reason, delivery_id, created_at, expires_at,
       (expires_at IS NULL OR expires_at > now()) AS live,
       count(*) OVER () AS total
FROM email.suppressions
WHERE %(reason)s::text IS NULL OR reason = %(reason)s::text
ORDER BY created_at DESC, address
LIMIT %(limit)s;

-- name: get_suppression
SELECT address, reason, delivery_id, created_at, expires_at,
       (expires_at IS NULL OR expires_at > now()) AS live
FROM email.suppressions
WHERE address = %(address)s;

-- name: add_suppression_if_absent
-- Idempotent: a live entry is kept as it is (its reason, origin and expiry); an expired one
-- is replaced. No row back: a live entry was there already.
INSERT INTO email.suppressions AS s (address, reason, expires_at)
VALUES (%(address)s, %(reason)s,
        now() + %(expires_seconds)s::float8 * interval '1 second')
ON CONFLICT (address) DO UPDATE SET
    reason = excluded.reason,
    delivery_id = NULL,
    created_at = now(),
    expires_at = excluded.expires_at
WHERE s.expires_at IS NOT NULL AND s.expires_at <= now()
RETURNING address, reason, delivery_id, created_at, expires_at, true AS live;

-- name: remove_suppression
-- Only the table's owner may delete (docs/operating.md): the worker and reader roles cannot.
DELETE FROM email.suppressions
WHERE address = %(address)s
RETURNING address, reason, delivery_id, created_at, expires_at,
          (expires_at IS NULL OR expires_at > now()) AS live;
