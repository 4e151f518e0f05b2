-- One step back: the transition functions go (workers of the previous release do not call them),
-- and transition_allowed() is 002's again (the same table, not inlined).
SET LOCAL lock_timeout = '5s';

DROP FUNCTION IF EXISTS email.set_unsent_if_claimed(
    text, uuid, email.delivery_status, text, integer, text, text);
DROP FUNCTION IF EXISTS email.set_sent_if_claimed(text, uuid, integer, text, text);

CREATE OR REPLACE FUNCTION email.transition_allowed(
    from_status email.delivery_status, to_status email.delivery_status
) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog
AS $$
    SELECT CASE
        WHEN from_status IS NULL
            THEN to_status::text IN ('queued', 'in_progress', 'failed', 'skipped')
        WHEN from_status::text = 'queued'
            THEN to_status::text IN ('in_progress', 'failed', 'dead_letter', 'skipped')
        WHEN from_status::text = 'in_progress'
            THEN to_status::text IN
                ('in_progress', 'sent', 'retrying', 'failed', 'dead_letter', 'skipped')
        WHEN from_status::text = 'retrying'
            THEN to_status::text IN ('in_progress', 'failed', 'dead_letter', 'skipped')
        WHEN from_status::text IN ('failed', 'dead_letter') THEN to_status::text = 'queued'
        ELSE false  -- sent, skipped: final
    END
$$;
