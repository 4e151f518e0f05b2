-- The delivery ledger: one row per delivery_id, one audit row per status change.
-- Everything is schema-qualified and creates no extension, so it applies next to other
-- schemas (Supabase's auth/storage, pgvector) without touching them.

CREATE TYPE email.delivery_status AS ENUM (
    'queued', 'in_progress', 'sent', 'retrying', 'failed', 'dead_letter'
);

CREATE TABLE email.deliveries (
    delivery_id         text PRIMARY KEY
                        CHECK (delivery_id ~ '^[A-Za-z0-9._:@-]{1,200}$'),
    -- NULL only for an invalid event whose workflow or recipient could not be read.
    workflow            text,
    recipient           text CHECK (length(recipient) <= 254),
    locale              text NOT NULL DEFAULT 'en',
    status              email.delivery_status NOT NULL,
    -- Why the row is in its current status: lease_expired, replay, retries_exhausted, ...
    status_reason       text,
    attempts            integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error_code     text,
    last_error_message  text CHECK (length(last_error_message) <= 500),
    last_attempted_at   timestamptz,
    queued_at           timestamptz NOT NULL DEFAULT now(),
    sent_at             timestamptz,
    claim_token         uuid,
    lease_expires_at    timestamptz,
    provider_message_id text,
    source_message_id   text,
    replays             integer NOT NULL DEFAULT 0 CHECK (replays >= 0),
    metadata            jsonb,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),

    CONSTRAINT sent_exactly_when_sent_at CHECK ((status = 'sent') = (sent_at IS NOT NULL)),
    -- A claim (token and lease) exists exactly while a worker holds the row.
    CONSTRAINT lease_only_in_progress CHECK (
        (status = 'in_progress') = (claim_token IS NOT NULL)
        AND (claim_token IS NULL) = (lease_expires_at IS NULL)
    ),
    -- Only a rejected event may lack what an email needs.
    CONSTRAINT addressable_unless_failed CHECK (
        status IN ('failed', 'dead_letter', 'queued')
        OR (workflow IS NOT NULL AND recipient IS NOT NULL)
    ),
    CONSTRAINT sent_has_no_error CHECK (
        status <> 'sent' OR (last_error_code IS NULL AND last_error_message IS NULL)
    )
);

CREATE INDEX deliveries_status_updated_at_idx ON email.deliveries (status, updated_at);
CREATE INDEX deliveries_recipient_updated_at_idx ON email.deliveries (recipient, updated_at);
-- "In progress with an expired lease": the stuck-delivery query scans only live claims.
CREATE INDEX deliveries_in_progress_lease_idx ON email.deliveries (lease_expires_at)
    WHERE status = 'in_progress';

CREATE TABLE email.delivery_events (
    id            bigserial PRIMARY KEY,
    delivery_id   text NOT NULL REFERENCES email.deliveries (delivery_id) ON DELETE CASCADE,
    status        email.delivery_status NOT NULL,
    attempt       integer NOT NULL,
    error_code    text,
    error_message text,
    payload       jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX delivery_events_delivery_id_idx ON email.delivery_events (delivery_id, id);

-- The state machine of contract section 3. A transition the table does not list is refused,
-- whoever issues it: the worker, an operator's manual UPDATE, or a buggy migration.
CREATE FUNCTION email.transition_allowed(
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

CREATE FUNCTION email.guard_delivery_transition() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
DECLARE
    from_status email.delivery_status := CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END;
BEGIN
    -- A same-status update is a transition only when it is a new claim (a lease taken over).
    IF TG_OP = 'UPDATE' AND OLD.status = NEW.status
       AND NEW.claim_token IS NOT DISTINCT FROM OLD.claim_token THEN
        NEW.updated_at := now();
        RETURN NEW;
    END IF;
    IF NOT email.transition_allowed(from_status, NEW.status) THEN
        RAISE EXCEPTION 'illegal delivery transition % -> % for delivery %',
            coalesce(from_status::text, '(new row)'), NEW.status, NEW.delivery_id
            USING ERRCODE = 'check_violation',
                  HINT = 'allowed transitions are listed in email.transition_allowed()';
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

CREATE TRIGGER deliveries_guard_transition
    BEFORE INSERT OR UPDATE ON email.deliveries
    FOR EACH ROW EXECUTE FUNCTION email.guard_delivery_transition();

-- The audit trail is written by the database, so no code path can forget it. SECURITY DEFINER
-- lets the worker's inserts audit themselves without the worker reading the audit table.
CREATE FUNCTION email.audit_delivery_transition() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog
AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND OLD.status = NEW.status
       AND NEW.claim_token IS NOT DISTINCT FROM OLD.claim_token THEN
        RETURN NULL;
    END IF;
    INSERT INTO email.delivery_events
        (delivery_id, status, attempt, error_code, error_message, payload)
    VALUES (
        NEW.delivery_id, NEW.status, NEW.attempts, NEW.last_error_code, NEW.last_error_message,
        jsonb_strip_nulls(jsonb_build_object(
            'from', CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END,
            'reason', NEW.status_reason,
            'provider_message_id', NEW.provider_message_id,
            'source_message_id', NEW.source_message_id,
            'lease_expires_at', NEW.lease_expires_at,
            'replays', NULLIF(NEW.replays, 0)
        ))
    );
    RETURN NULL;
END
$$;

CREATE TRIGGER deliveries_audit_transition
    AFTER INSERT OR UPDATE ON email.deliveries
    FOR EACH ROW EXECUTE FUNCTION email.audit_delivery_transition();

-- Roles are cluster-wide: create them only if missing, NOLOGIN, so a deployment grants them
-- to its own login users (GRANT email_worker TO app_user).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'email_worker') THEN
        CREATE ROLE email_worker NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'email_reader') THEN
        CREATE ROLE email_reader NOLOGIN;
    END IF;
END
$$;

REVOKE ALL ON SCHEMA email FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA email FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA email FROM PUBLIC;
REVOKE ALL ON FUNCTION email.transition_allowed(email.delivery_status, email.delivery_status),
    email.guard_delivery_transition(), email.audit_delivery_transition() FROM PUBLIC;

GRANT USAGE ON SCHEMA email TO email_worker, email_reader;
GRANT SELECT, INSERT, UPDATE ON email.deliveries TO email_worker;
GRANT INSERT ON email.delivery_events TO email_worker;
GRANT USAGE ON SEQUENCE email.delivery_events_id_seq TO email_worker;
GRANT SELECT ON email.deliveries, email.delivery_events TO email_reader;
GRANT EXECUTE ON FUNCTION email.transition_allowed(email.delivery_status, email.delivery_status)
    TO email_worker, email_reader;

ALTER TABLE email.deliveries ENABLE ROW LEVEL SECURITY;
ALTER TABLE email.delivery_events ENABLE ROW LEVEL SECURITY;

CREATE POLICY worker_select ON email.deliveries FOR SELECT TO email_worker USING (true);
CREATE POLICY worker_insert ON email.deliveries FOR INSERT TO email_worker WITH CHECK (true);
CREATE POLICY worker_update ON email.deliveries FOR UPDATE TO email_worker
    USING (true) WITH CHECK (true);
CREATE POLICY worker_insert ON email.delivery_events FOR INSERT TO email_worker
    WITH CHECK (true);
CREATE POLICY reader_select ON email.deliveries FOR SELECT TO email_reader USING (true);
CREATE POLICY reader_select ON email.delivery_events FOR SELECT TO email_reader USING (true);
