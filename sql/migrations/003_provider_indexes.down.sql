-- migrate: no-transaction
DROP INDEX CONCURRENTLY IF EXISTS email.deliveries_relay_message_id_idx;
DROP INDEX CONCURRENTLY IF EXISTS email.deliveries_provider_message_id_idx;
