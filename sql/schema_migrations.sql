-- The migration runner's own statements (worker/store/migrations.py), one named query each
-- (`-- name: NAME`). Every one runs inside the runner's transaction-scoped advisory lock.

-- name: try_migration_lock
-- Tried, never waited for: see migrations._locked for why.
SELECT pg_try_advisory_xact_lock(%(key)s) AS locked;

-- name: create_migrations_table
-- The record of applied migrations, made by the first `migrate` (before migration 001).
CREATE SCHEMA IF NOT EXISTS email;
CREATE TABLE IF NOT EXISTS email.schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
REVOKE ALL ON email.schema_migrations FROM PUBLIC;

-- name: applied_migrations
SELECT version FROM email.schema_migrations;

-- name: record_migration
INSERT INTO email.schema_migrations (version, name) VALUES (%(version)s, %(name)s);

-- name: forget_migration
DELETE FROM email.schema_migrations WHERE version = %(version)s;

-- name: invalid_indexes
-- Indexes of the email schema left unusable by an interrupted concurrent build.
SELECT i.indexrelid::regclass::text AS index
FROM pg_catalog.pg_index i
JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid
WHERE NOT i.indisvalid AND c.relnamespace = 'email'::regnamespace;
