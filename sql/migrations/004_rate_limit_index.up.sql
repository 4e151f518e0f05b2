-- migrate: no-transaction
-- The index of the per-recipient rate limit (contract section 7), which email.claim_delivery()
-- (migration 005) counts through: emails of one workflow to one lower-cased recipient that were
-- sent or are being sent, by the latest moment each could have left. A sent row left at
-- sent_at; an in_progress row's SMTP attempts all end inside its lease (worker/pipeline.py), so
-- it leaves by lease_expires_at at the latest. Partial: only the rows the count can match, so
-- a recipient's queued, failed and skipped rows never enter it. Built CONCURRENTLY (outside a
-- transaction, worker/migrations.py): running workers keep claiming and recording meanwhile.
CREATE INDEX CONCURRENTLY IF NOT EXISTS deliveries_rate_limit_idx
    ON email.deliveries (lower(recipient), workflow, (coalesce(sent_at, lease_expires_at)))
    WHERE status IN ('sent', 'in_progress');
