-- migrate: no-transaction
DROP INDEX CONCURRENTLY IF EXISTS email.deliveries_rate_limit_idx;
