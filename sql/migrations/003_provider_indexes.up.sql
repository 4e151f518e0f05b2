-- migrate: no-transaction
-- The part of 002 that reads the whole ledger, done without blocking the workers' writes.
--
-- Matching a provider event must not scan the ledger: by the Message-ID the worker wrote
-- (provider_message_id) and by the relay's id. Built CONCURRENTLY (outside a transaction, see
-- worker/migrations.py), so running workers keep claiming and recording while they build.
-- Partial: rows never sent have neither id.
CREATE INDEX CONCURRENTLY IF NOT EXISTS deliveries_provider_message_id_idx
    ON email.deliveries (provider_message_id) WHERE provider_message_id IS NOT NULL;
CREATE INDEX CONCURRENTLY IF NOT EXISTS deliveries_relay_message_id_idx
    ON email.deliveries (relay_message_id) WHERE relay_message_id IS NOT NULL;
-- 002's NOT VALID checks: VALIDATE scans under SHARE UPDATE EXCLUSIVE, which lets writes
-- through (and is a no-op once valid).
ALTER TABLE email.deliveries VALIDATE CONSTRAINT deliveries_bounce_type_check;
ALTER TABLE email.deliveries VALIDATE CONSTRAINT deliveries_relay_message_id_check;
