-- Back to 001. Safe while workers run, like the way up: drops what 002 added, rewrites nothing.
-- The `skipped` label stays in email.delivery_status: PostgreSQL cannot drop an enum label,
-- and rebuilding the type would rewrite deliveries and delivery_events under an exclusive
-- lock. 001's transition_allowed() (restored below) never allows a move into `skipped`, and
-- treats a row already `skipped` as final. Provider events and suppressions are lost.
SET LOCAL lock_timeout = '5s';

DROP FUNCTION IF EXISTS email.apply_provider_event(
    text, text, text, timestamptz, text, text, text, text, text, jsonb);
DROP TABLE IF EXISTS email.suppressions;
DROP TABLE IF EXISTS email.provider_events;
DROP TRIGGER IF EXISTS deliveries_audit_provider_status ON email.deliveries;
DROP TRIGGER IF EXISTS deliveries_guard_provider_status ON email.deliveries;
DROP FUNCTION IF EXISTS email.audit_provider_status();
DROP FUNCTION IF EXISTS email.guard_provider_status();
DROP FUNCTION IF EXISTS email.provider_status_allowed(email.provider_status, email.provider_status);
DROP INDEX IF EXISTS email.deliveries_relay_message_id_idx;
DROP INDEX IF EXISTS email.deliveries_provider_message_id_idx;
-- Dropping columns only marks them dropped in the catalog: no rewrite.
ALTER TABLE email.deliveries
    DROP COLUMN IF EXISTS provider_status,
    DROP COLUMN IF EXISTS delivered_at,
    DROP COLUMN IF EXISTS opened_at,
    DROP COLUMN IF EXISTS clicked_at,
    DROP COLUMN IF EXISTS bounced_at,
    DROP COLUMN IF EXISTS complained_at,
    DROP COLUMN IF EXISTS bounce_type,
    DROP COLUMN IF EXISTS relay_message_id;
DROP TYPE IF EXISTS email.provider_status;

CREATE OR REPLACE FUNCTION email.transition_allowed(
    from_status email.delivery_status, to_status email.delivery_status
) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog
AS $$
    SELECT CASE
        WHEN from_status IS NULL THEN to_status IN ('queued', 'in_progress', 'failed')
        WHEN from_status = 'queued' THEN to_status IN ('in_progress', 'failed', 'dead_letter')
        WHEN from_status = 'in_progress'
            THEN to_status IN ('in_progress', 'sent', 'retrying', 'failed', 'dead_letter')
        WHEN from_status = 'retrying' THEN to_status IN ('in_progress', 'failed', 'dead_letter')
        WHEN from_status IN ('failed', 'dead_letter') THEN to_status = 'queued'
        ELSE false
    END
$$;
