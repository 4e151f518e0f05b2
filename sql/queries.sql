-- Named queries, loaded by worker/store/db.py. Each block starts with `-- name: NAME`.
-- Every transition is one guarded statement named after its guard; zero rows back means the
-- guard did not hold (another worker won, or the claim went stale): an answer, not an error.

-- name: claim
-- Claim for sending, or end the row `skipped` (validity end passed, suppressed recipient, rate
-- limit reached), or nothing (finished, or leased by a live worker): email.claim_delivery(),
-- migrations 005 and 010, in one round trip. Its guard is the one upsert inside: a new row, or one that is queued,
-- retrying, or in progress with an expired lease; concurrent claims of one id serialise on
-- the row, and the loser re-checks the guard against the winner's row and changes nothing.
-- A claim also reads every relay's circuit (migration 012) in the same statement, so a
-- healthy delivery learns that all is well without a second round trip.
SELECT outcome, token, attempt, lease_until, code, reason, message, current_status,
       CASE WHEN outcome = 'claimed' THEN (
           SELECT json_agg(json_build_object(
               'relay', r.relay,
               'state', CASE WHEN r.reopens_at IS NULL THEN 'closed'
                             WHEN r.reopens_at > now() THEN 'open'
                             ELSE 'half-open' END,
               'failures', r.consecutive_failures,
               'probing', coalesce(r.probe_until > now(), false)))
           FROM email.relay_circuits r) END AS relays
FROM email.claim_delivery(
    delivery_id => %(delivery_id)s,
    workflow => %(workflow)s,
    recipient => %(recipient)s,
    locale => %(locale)s,
    metadata => %(metadata)s,
    source_message_id => %(source_message_id)s,
    lease_seconds => %(lease_seconds)s,
    rate_limit => %(rate_limit)s,
    rate_window_seconds => %(rate_window_seconds)s,
    takeover_reason => %(takeover_reason)s,
    published_at => %(published_at)s,
    not_after => %(not_after)s
);

-- name: set_sent_if_claimed
-- The guarded UPDATE is inside email.set_sent_if_claimed() (migrations 006, 012), so the server
-- plans it once per connection; no row back: the claim no longer holds the row.
SELECT sent AS delivery_id
FROM email.set_sent_if_claimed(
    delivery_id => %(delivery_id)s,
    claim_token => %(claim_token)s,
    attempts => %(attempts)s,
    provider_message_id => %(provider_message_id)s,
    relay_message_id => %(relay_message_id)s,
    relay => %(relay)s,
    smtp_ms => %(smtp_ms)s
) AS sent;

-- name: set_unsent_if_claimed
-- The claim ends without an email: `retrying` (Pub/Sub will redeliver), `failed` (permanent)
-- or `dead_letter` (attempts exhausted). Like set_sent_if_claimed, fenced by the claim token,
-- and a function of migration 006.
SELECT unsent AS delivery_id
FROM email.set_unsent_if_claimed(
    delivery_id => %(delivery_id)s,
    claim_token => %(claim_token)s,
    status => %(status)s::email.delivery_status,
    reason => %(reason)s,
    attempts => %(attempts)s,
    error_code => %(error_code)s,
    error_message => %(error_message)s
) AS unsent;

-- name: set_failed_if_new_or_queued
-- An invalid event: a new row says why nothing was sent. An existing row is only touched
-- when it waits in `queued` (a replayed event that is still invalid); a row another copy
-- of the event is working on, or already finished, is left alone.
INSERT INTO email.deliveries AS d (
    delivery_id, workflow, recipient, status, status_reason,
    last_error_code, last_error_message, source_message_id, last_attempted_at
) VALUES (
    %(delivery_id)s, %(workflow)s, %(recipient)s, 'failed', %(reason)s,
    %(error_code)s, %(error_message)s, %(source_message_id)s, now()
)
ON CONFLICT (delivery_id) DO UPDATE SET
    status = 'failed',
    status_reason = excluded.status_reason,
    last_error_code = excluded.last_error_code,
    last_error_message = excluded.last_error_message,
    source_message_id = excluded.source_message_id,
    last_attempted_at = now()
WHERE d.status = 'queued'
RETURNING delivery_id;

-- name: set_queued_if_finished
-- Replay: a fresh attempt budget; the history stays in email.delivery_events.
UPDATE email.deliveries SET
    status = 'queued',
    status_reason = %(reason)s,
    attempts = 0,
    replays = replays + 1,
    queued_at = now()
WHERE delivery_id = %(delivery_id)s AND status IN ('failed', 'dead_letter')
RETURNING delivery_id;

-- name: set_dead_letter_if_abandoned
-- A row whose Pub/Sub message is gone (forwarded by the subscription's dead-letter policy)
-- while it waited in `retrying` or held an expired lease: close it so replay can requeue it.
UPDATE email.deliveries SET
    status = 'dead_letter',
    status_reason = %(reason)s,
    claim_token = NULL,
    lease_expires_at = NULL
WHERE delivery_id = %(delivery_id)s
  AND (status = 'retrying' OR (status = 'in_progress' AND lease_expires_at < now()))
RETURNING delivery_id;

-- name: get_delivery
SELECT * FROM email.deliveries WHERE delivery_id = %(delivery_id)s;

-- name: list_events
SELECT * FROM email.delivery_events WHERE delivery_id = %(delivery_id)s ORDER BY id;

-- name: deliveries_for_recipient
-- Addresses compare case-insensitively (docs/operating.md), through migration 007's
-- (lower(recipient), created_at, delivery_id) index; one recipient's rows are then sorted.
SELECT * FROM email.deliveries
WHERE lower(recipient) = lower(%(recipient)s::text)
ORDER BY updated_at DESC
LIMIT %(limit)s;

-- name: stuck_deliveries
-- In progress past its lease (the worker died), or waiting in queued/retrying for longer than
-- Pub/Sub's redelivery should ever take.
SELECT * FROM email.deliveries
WHERE (status = 'in_progress' AND lease_expires_at < now())
   OR (status IN ('queued', 'retrying') AND updated_at < now() - %(idle_seconds)s * interval '1 second')
ORDER BY updated_at
LIMIT %(limit)s;

-- operators' commands
-- `python -m worker replay/stats/prune` (worker/ops/replay.py, worker/store/reports.py).

-- name: lease_expired
-- Replay's dry run asks this instead of comparing clocks: the database's now() is the one
-- the claim and set_dead_letter_if_abandoned use.
SELECT delivery_id FROM email.deliveries
WHERE delivery_id = %(delivery_id)s AND status = 'in_progress' AND lease_expires_at < now();

-- name: validity_ended
-- Replay: a dead letter whose delivery's validity end has passed is not republished. The
-- earlier of the row's not_after and the message's own (least() ignores a NULL; no row, or
-- neither known: not ended), by the database's clock, the one the claim decides with.
SELECT coalesce(least(
    (SELECT d.not_after FROM email.deliveries d WHERE d.delivery_id = %(delivery_id)s),
    %(not_after)s::timestamptz
) <= now(), false) AS ended;

-- name: stats_by_workflow
-- One row per workflow plus a total (is_total). Success rate and mean attempts are over
-- rows whose sending finished (sent, failed, dead_letter: `skipped` was never attempted);
-- the percentiles over sent rows (percentile_cont skips the NULLs of the rest). Time to send
-- runs from the first copy's publish time to the relay's acceptance (migration 010; rows
-- written before it have no published_at and are left out).
SELECT
    coalesce(workflow, '(none)') AS workflow,
    grouping(workflow) = 1 AS is_total,
    count(*) AS total,
    count(*) FILTER (WHERE status = 'queued') AS queued,
    count(*) FILTER (WHERE status = 'in_progress') AS in_progress,
    count(*) FILTER (WHERE status = 'retrying') AS retrying,
    count(*) FILTER (WHERE status = 'sent') AS sent,
    count(*) FILTER (WHERE status = 'failed') AS failed,
    count(*) FILTER (WHERE status = 'dead_letter') AS dead_letter,
    count(*) FILTER (WHERE status = 'skipped') AS skipped,
    -- Why they were skipped (migration 005); the codes come from worker.ledger.Code.
    count(*) FILTER (WHERE status = 'skipped' AND last_error_code = %(suppressed)s)
        AS skipped_suppressed,
    count(*) FILTER (WHERE status = 'skipped' AND last_error_code = %(rate_limited)s)
        AS skipped_rate_limited,
    count(*) FILTER (WHERE status = 'skipped' AND last_error_code = %(expired)s)
        AS skipped_expired,
    -- What providers reported about the sent ones (migration 002). An open, a click or a
    -- complaint implies the email arrived; a bounce after a delivery report counts as bounced.
    count(*) FILTER (WHERE status = 'sent'
                     AND provider_status IN ('delivered', 'opened', 'clicked', 'complained'))
        AS provider_delivered,
    count(*) FILTER (WHERE status = 'sent' AND provider_status = 'bounced') AS provider_bounced,
    count(*) FILTER (WHERE status = 'sent' AND provider_status = 'complained')
        AS provider_complained,
    (avg(attempts) FILTER (WHERE status IN ('sent', 'failed', 'dead_letter')))::float8
        AS mean_attempts,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - queued_at))
        AS p50_seconds,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - queued_at))
        AS p95_seconds,
    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - published_at))
        AS send_p50_seconds,
    percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - published_at))
        AS send_p95_seconds,
    percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM sent_at - published_at))
        AS send_p99_seconds
FROM email.deliveries
WHERE queued_at >= now() - %(since_seconds)s * interval '1 second'
GROUP BY GROUPING SETS ((workflow), ())
HAVING count(*) > 0  -- the grand total exists even over no rows
ORDER BY grouping(workflow), workflow NULLS LAST;

-- name: count_prunable
SELECT
    count(*) AS deliveries,
    (SELECT count(*) FROM email.delivery_events e
     JOIN email.deliveries d USING (delivery_id)
     WHERE d.status IN ('sent', 'failed', 'dead_letter', 'skipped')
       AND d.updated_at < now() - %(older_than_seconds)s * interval '1 second') AS events
FROM email.deliveries
WHERE status IN ('sent', 'failed', 'dead_letter', 'skipped')
  AND updated_at < now() - %(older_than_seconds)s * interval '1 second';

-- name: prune_batch
-- One short transaction per batch: rows a replay or worker holds are skipped (SKIP LOCKED),
-- and the row lock re-checks the status, so a row requeued meanwhile is not deleted. Events
-- go with their delivery (ON DELETE CASCADE); they are counted first for the report.
WITH doomed AS (
    SELECT delivery_id FROM email.deliveries
    WHERE status IN ('sent', 'failed', 'dead_letter', 'skipped')
      AND updated_at < now() - %(older_than_seconds)s * interval '1 second'
    ORDER BY updated_at
    LIMIT %(batch_size)s
    FOR UPDATE SKIP LOCKED
), doomed_events AS (
    SELECT count(*) AS n FROM email.delivery_events
    WHERE delivery_id IN (SELECT delivery_id FROM doomed)
), gone AS (
    DELETE FROM email.deliveries
    WHERE delivery_id IN (SELECT delivery_id FROM doomed)
    RETURNING delivery_id
)
SELECT (SELECT count(*) FROM gone) AS deliveries, (SELECT n FROM doomed_events) AS events;
