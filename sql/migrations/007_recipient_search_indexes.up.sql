-- migrate: no-transaction
-- The indexes of the support console's searches (sql/console.sql `search_deliveries`) and of
-- `python -m worker history` (sql/queries.sql `deliveries_for_recipient`), so neither reads the
-- whole ledger. The console pages newest first by (created_at, delivery_id) and compares
-- recipients lower-cased (contract section 7): an equality on lower(recipient), then a backward
-- scan whose row comparison `(created_at, delivery_id) < cursor` is an index bound. History
-- finds the recipient's rows through the same index and sorts them by updated_at (one
-- recipient's rows are few; another index would cost every write of the ledger). The second
-- index serves the listing with no recipient: the newest rows, and every page after them.
-- 001's (recipient, updated_at) index no longer serves a query here, but the contract (section
-- 3) names it, so it stays. Built CONCURRENTLY (outside a transaction, worker/migrations.py):
-- running workers keep claiming and recording meanwhile.
CREATE INDEX CONCURRENTLY IF NOT EXISTS deliveries_lower_recipient_created_at_idx
    ON email.deliveries (lower(recipient), created_at, delivery_id);
CREATE INDEX CONCURRENTLY IF NOT EXISTS deliveries_created_at_idx
    ON email.deliveries (created_at, delivery_id);
