-- The support console's reads (worker/store/console.py), loaded like sql/queries.sql.
-- Every statement here is a SELECT: the console connects as an email_reader login, which may
-- only read, and has no write path at all. Columns are named, never `*`, so what the console
-- shows (and never shows: metadata, claim tokens) is decided here.

-- name: delivery
SELECT delivery_id, workflow, recipient, locale, status::text AS status, status_reason,
       attempts, replays, last_error_code, last_error_message, last_attempted_at, queued_at,
       sent_at, lease_expires_at, provider_message_id, relay_message_id, source_message_id,
       provider_status::text AS provider_status, delivered_at, opened_at, clicked_at,
       bounced_at, complained_at, bounce_type, created_at, updated_at
FROM email.deliveries
WHERE delivery_id = %(delivery_id)s;

-- name: delivery_events
-- The audit trail, oldest first: each send attempt, error and status change.
SELECT id, status::text AS status, attempt, error_code, error_message, payload, created_at
FROM email.delivery_events
WHERE delivery_id = %(delivery_id)s
ORDER BY id;

-- name: delivery_provider_events
-- What the provider reported, in the order it happened (arrival order breaks ties).
-- Matching keys (the recipient, message ids) are left out: the delivery row has them.
SELECT provider, provider_event_id, event_type, occurred_at, received_at, bounce_type, detail
FROM email.provider_events
WHERE delivery_id = %(delivery_id)s
ORDER BY occurred_at, id;

-- name: search_deliveries
-- Newest first, keyset-paginated on (created_at, delivery_id): a page never repeats or skips
-- a row, however many rows change status meanwhile. Each filter is off when its value is
-- NULL (the pool does not prepare statements, so each search is planned with its values).
-- Recipients compare case-insensitively, as support types them. Migration 007's indexes serve
-- both orders: (lower(recipient), created_at, delivery_id) for a recipient, (created_at,
-- delivery_id) without one, each scanned backwards with the cursor as its bound; the ORDER BY
-- and the cursor's row comparison must keep naming exactly those columns.
SELECT delivery_id, workflow, recipient, locale, status::text AS status, status_reason,
       attempts, replays, last_error_code, last_error_message, last_attempted_at, queued_at,
       sent_at, lease_expires_at, provider_message_id, relay_message_id, source_message_id,
       provider_status::text AS provider_status, delivered_at, opened_at, clicked_at,
       bounced_at, complained_at, bounce_type, created_at, updated_at
FROM email.deliveries
WHERE (%(recipient)s::text IS NULL OR lower(recipient) = lower(%(recipient)s::text))
  AND (%(workflow)s::text IS NULL OR workflow = %(workflow)s::text)
  AND (%(status)s::email.delivery_status IS NULL OR status = %(status)s::email.delivery_status)
  AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s::timestamptz)
  AND (%(after_created_at)s::timestamptz IS NULL
       OR (created_at, delivery_id) < (%(after_created_at)s::timestamptz, %(after_id)s::text))
ORDER BY created_at DESC, delivery_id DESC
LIMIT %(limit)s;

-- name: stats_timeline
-- Deliveries queued in the window, in `buckets` equal slices of it, by outcome: the chart on
-- the stats page. Slices with no deliveries are absent (the caller fills them with zeros).
WITH bounds AS (
    SELECT now() - %(since_seconds)s * interval '1 second' AS start_at
)
SELECT
    least(
        floor(extract(epoch FROM d.queued_at - b.start_at) / %(bucket_seconds)s)::int,
        %(buckets)s - 1
    ) AS bucket,
    count(*) FILTER (WHERE d.status = 'sent') AS sent,
    count(*) FILTER (WHERE d.status IN ('failed', 'dead_letter')) AS failed,
    count(*) FILTER (WHERE d.status = 'skipped') AS skipped,
    count(*) FILTER (WHERE d.status IN ('queued', 'in_progress', 'retrying')) AS in_flight
FROM email.deliveries d CROSS JOIN bounds b
WHERE d.queued_at >= b.start_at
GROUP BY 1
ORDER BY 1;

-- name: suppression_for_address
-- Suppressions are stored lower-cased (docs/operating.md).
SELECT address, reason, delivery_id, created_at, expires_at,
       (expires_at IS NULL OR expires_at > now()) AS active
FROM email.suppressions
WHERE address = lower(%(address)s::text);

-- name: search_suppressions
-- Newest first, keyset-paginated on (created_at, id) like search_deliveries, never on the
-- address: the cursor must say nothing about anyone. Migration 009's unique index
-- (created_at, id) serves the order, scanned backwards with the cursor as its bound.
SELECT id, address, reason, delivery_id, created_at, expires_at,
       (expires_at IS NULL OR expires_at > now()) AS active
FROM email.suppressions
WHERE (%(address)s::text IS NULL OR address = lower(%(address)s::text))
  AND (%(reason)s::text IS NULL OR reason = %(reason)s::text)
  AND (%(active)s::boolean IS NULL
       OR (expires_at IS NULL OR expires_at > now()) = %(active)s::boolean)
  AND (%(after_created_at)s::timestamptz IS NULL
       OR (created_at, id) < (%(after_created_at)s::timestamptz, %(after_id)s::bigint))
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s;
