-- Suppressions get an id, so the support console pages its list on (created_at, id) rather
-- than on the address: a page cursor then holds nothing about anyone (a cursor keyed on the
-- address carried it, and the order of a chosen key against it told whether an address sorts
-- before a guess). Additive: nothing reads or writes the column but the console's search.
-- GENERATED ALWAYS: every row, existing and new, gets one from the sequence (inserting needs
-- no grant on it), and none is written by hand. Adding the column rewrites the table under
-- its lock; the list is small (one row per suppressed address), so this is brief.
-- The unique index serves the console's newest-first order (scanned backwards, the cursor
-- its bound) and keeps the page key unique; a renewed entry (new created_at) keeps its id.
ALTER TABLE email.suppressions ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY;
CREATE UNIQUE INDEX suppressions_created_at_id_idx ON email.suppressions (created_at, id);
