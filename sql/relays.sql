-- The relays' circuit breaker (migration 012), loaded by worker/store/db.py. The claim reads
-- every relay's state in its own statement (`claim` in queries.sql); these write only when
-- something happened: a failed attempt, a trial of a half-open relay, a success after
-- failures.

-- name: record_send_failure
-- One failed send attempt: its audit row under the live claim and, for a fail-over failure,
-- one more on the relay's count (opening its circuit at RELAY_TRIP_AFTER). `opened`: this
-- call opened it.
SELECT email.record_send_failure(
    delivery_id => %(delivery_id)s,
    claim_token => %(claim_token)s,
    relay => %(relay)s,
    attempt => %(attempt)s,
    error_code => %(error_code)s,
    error_message => %(error_message)s,
    transient => %(transient)s,
    counts => %(counts)s,
    trip_after => %(trip_after)s,
    cooldown_seconds => %(cooldown_seconds)s
) AS opened;

-- name: claim_relay_probe
-- The one trial of a half-open relay, held for `seconds`: false when another delivery holds
-- it, or the circuit is not half-open any more.
SELECT email.claim_relay_probe(relay => %(relay)s, seconds => %(seconds)s) AS won;

-- name: record_send_success
-- The relay accepted an email: its count back to zero, its circuit closed. `was_open`: it
-- had been open or half-open.
SELECT email.record_send_success(relay => %(relay)s) AS was_open;

-- name: relay_circuits
-- Every relay's breaker, as `python -m worker relays` shows it.
SELECT relay,
       CASE WHEN reopens_at IS NULL THEN 'closed'
            WHEN reopens_at > now() THEN 'open'
            ELSE 'half-open' END AS state,
       consecutive_failures, opened_at, reopens_at, last_error_code, last_error_message
FROM email.relay_circuits
ORDER BY relay = 'fallback', relay;

-- name: stats_by_relay
-- Per relay, over deliveries queued in the window: emails it accepted and the p50/p95 of
-- that SMTP exchange (deliveries.relay, smtp_ms), and its failed send attempts (the audit
-- rows marked attempt_failed), transient or permanent. Every relay has a row.
WITH window_rows AS (
    SELECT delivery_id, status, relay, smtp_ms
    FROM email.deliveries
    WHERE queued_at >= now() - %(since_seconds)s * interval '1 second'
), sent AS (
    SELECT relay, count(*) AS sent,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY smtp_ms) AS smtp_p50_ms,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY smtp_ms) AS smtp_p95_ms
    FROM window_rows
    WHERE status = 'sent' AND relay IS NOT NULL
    GROUP BY relay
), failures AS (
    SELECT e.payload ->> 'relay' AS relay,
           count(*) FILTER (WHERE (e.payload ->> 'transient')::boolean) AS transient_failures,
           count(*) FILTER (WHERE NOT (e.payload ->> 'transient')::boolean)
               AS permanent_failures
    FROM window_rows w
    JOIN email.delivery_events e ON e.delivery_id = w.delivery_id
    WHERE e.payload ? 'attempt_failed'
    GROUP BY 1
)
SELECT r.relay,
       coalesce(s.sent, 0) AS sent,
       coalesce(f.transient_failures, 0) AS transient_failures,
       coalesce(f.permanent_failures, 0) AS permanent_failures,
       s.smtp_p50_ms, s.smtp_p95_ms
FROM email.relay_circuits r
LEFT JOIN sent s ON s.relay = r.relay
LEFT JOIN failures f ON f.relay = r.relay
ORDER BY r.relay = 'fallback', r.relay;
