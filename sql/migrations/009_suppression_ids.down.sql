-- The console of 009 pages suppressions on this column: roll the console back first.
DROP INDEX IF EXISTS email.suppressions_created_at_id_idx;
ALTER TABLE email.suppressions DROP COLUMN IF EXISTS id;
