-- migrate: no-transaction
DROP INDEX CONCURRENTLY IF EXISTS email.deliveries_created_at_idx;
DROP INDEX CONCURRENTLY IF EXISTS email.deliveries_lower_recipient_created_at_idx;
