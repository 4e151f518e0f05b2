-- Provider events (contract section 6), suppressions (section 7) and the `skipped` status.
--
-- Safe to apply while workers of version 001 run: nothing here rewrites a table. New columns
-- are nullable without defaults (a catalog change), new tables are new, the triggers only act
-- on the new columns, and the replaced transition function accepts everything it accepted
-- before. The ALTERs take short exclusive locks; lock_timeout makes the migration fail (and
-- roll back, to be run again) instead of queueing every worker's statement behind it while a
-- long transaction holds the table.
SET LOCAL lock_timeout = '5s';

-- `skipped` (issue 11): deliberately not sent, final. A label added in this transaction
-- cannot be *used* before it commits, so nothing below casts 'skipped' to the enum:
-- transition_allowed compares as text.
ALTER TYPE email.delivery_status ADD VALUE IF NOT EXISTS 'skipped';

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

-- What the provider reported last, in the order of section 6 (NULL until the first event).
CREATE TYPE email.provider_status AS ENUM (
    'delivered', 'opened', 'clicked', 'bounced', 'complained'
);

-- A CHECK added with its column would scan the whole ledger under this exclusive lock to
-- prove what is obvious (the column is empty): NOT VALID enforces it on every write from now
-- on, and 003 validates it under a lock that lets the workers write.
ALTER TABLE email.deliveries
    ADD COLUMN provider_status  email.provider_status,
    ADD COLUMN delivered_at     timestamptz,
    ADD COLUMN opened_at        timestamptz,  -- the first open
    ADD COLUMN clicked_at       timestamptz,  -- the first click
    ADD COLUMN bounced_at       timestamptz,
    ADD COLUMN complained_at    timestamptz,
    ADD COLUMN bounce_type      text,
    -- The relay's own id for the message, from its final 250 reply.
    ADD COLUMN relay_message_id text,
    ADD CONSTRAINT deliveries_bounce_type_check CHECK (length(bounce_type) <= 100) NOT VALID,
    ADD CONSTRAINT deliveries_relay_message_id_check
        CHECK (length(relay_message_id) <= 500) NOT VALID;

-- The indexes that make matching cheap (Message-ID, relay id) are built by 003, concurrently:
-- built here they would hold this transaction's exclusive lock on a big ledger for seconds.

-- The order of section 6: forward only along delivered -> opened -> clicked (steps may be
-- skipped: an open may be the first event to arrive); bounced only from NULL or delivered;
-- complained from any state but bounced; bounced and complained are final.
CREATE FUNCTION email.provider_status_allowed(
    from_status email.provider_status, to_status email.provider_status
) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog
AS $$
    SELECT CASE
        WHEN to_status IS NULL THEN from_status IS NULL
        WHEN from_status IS NULL THEN true
        WHEN from_status IN ('bounced', 'complained') THEN false
        WHEN to_status = 'complained' THEN true
        WHEN to_status = 'bounced' THEN from_status = 'delivered'
        -- delivered, opened, clicked: only further along
        ELSE array_position(ARRAY['delivered', 'opened', 'clicked']::email.provider_status[],
                            to_status)
           > array_position(ARRAY['delivered', 'opened', 'clicked']::email.provider_status[],
                            from_status)
    END
$$;

CREATE FUNCTION email.guard_provider_status() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
BEGIN
    IF NOT email.provider_status_allowed(OLD.provider_status, NEW.provider_status) THEN
        RAISE EXCEPTION 'illegal provider status change % -> % for delivery %',
            coalesce(OLD.provider_status::text, '(none)'),
            coalesce(NEW.provider_status::text, '(none)'), NEW.delivery_id
            USING ERRCODE = 'check_violation',
                  HINT = 'allowed changes are listed in email.provider_status_allowed()';
    END IF;
    RETURN NEW;
END
$$;

-- WHEN keeps the trigger off every update that leaves provider_status alone (all of 001's).
CREATE TRIGGER deliveries_guard_provider_status
    BEFORE UPDATE ON email.deliveries
    FOR EACH ROW WHEN (OLD.provider_status IS DISTINCT FROM NEW.provider_status)
    EXECUTE FUNCTION email.guard_provider_status();

-- One audit row per provider-status change. The delivery status is unchanged by it, so 001's
-- audit trigger writes nothing for the same update: no double audit. `provider` comes from
-- the transaction-local setting email.apply_provider_event() makes; a manual UPDATE has none.
CREATE FUNCTION email.audit_provider_status() RETURNS trigger
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog
AS $$
BEGIN
    INSERT INTO email.delivery_events (delivery_id, status, attempt, payload)
    VALUES (
        NEW.delivery_id, NEW.status, NEW.attempts,
        jsonb_strip_nulls(jsonb_build_object(
            'provider_status', NEW.provider_status,
            'from', OLD.provider_status,
            'provider', nullif(current_setting('email.provider', true), '')
        ))
    );
    RETURN NULL;
END
$$;

CREATE TRIGGER deliveries_audit_provider_status
    AFTER UPDATE ON email.deliveries
    FOR EACH ROW WHEN (OLD.provider_status IS DISTINCT FROM NEW.provider_status)
    EXECUTE FUNCTION email.audit_provider_status();

-- One row per provider event, matched or not. ON DELETE CASCADE: an event belongs to its
-- delivery like its audit rows do, so pruning a delivery removes what providers said about
-- it (and the address in it) instead of turning it into a fake "unmatched" event.
CREATE TABLE email.provider_events (
    id                 bigserial PRIMARY KEY,
    provider           text NOT NULL CHECK (provider ~ '^[a-z0-9_-]{1,40}$'),
    provider_event_id  text NOT NULL CHECK (length(provider_event_id) BETWEEN 1 AND 500),
    delivery_id        text REFERENCES email.deliveries (delivery_id) ON DELETE CASCADE,
    event_type         text NOT NULL CHECK (event_type IN
                           ('delivered', 'opened', 'clicked', 'bounced', 'deferred',
                            'complained')),
    occurred_at        timestamptz NOT NULL,
    received_at        timestamptz NOT NULL DEFAULT now(),
    bounce_type        text CHECK (length(bounce_type) <= 100),
    -- The keys the event carried, kept so an unmatched event can be traced (and matched by
    -- hand) later. Never a link, a body or an envelope.
    recipient          text CHECK (length(recipient) <= 254),
    tagged_delivery_id text CHECK (length(tagged_delivery_id) <= 200),
    message_id         text CHECK (length(message_id) <= 1000),
    relay_message_id   text CHECK (length(relay_message_id) <= 500),
    detail             jsonb NOT NULL DEFAULT '{}'::jsonb,
    CONSTRAINT provider_events_once UNIQUE (provider, provider_event_id)
);

CREATE INDEX provider_events_delivery_id_idx ON email.provider_events (delivery_id, occurred_at);
CREATE INDEX provider_events_received_at_idx ON email.provider_events (received_at);
-- "What did not match lately": the README's query, and a later prune of unmatched rows.
CREATE INDEX provider_events_unmatched_idx ON email.provider_events (received_at)
    WHERE delivery_id IS NULL;

CREATE TABLE email.suppressions (
    address     text PRIMARY KEY CHECK (address = lower(address) AND length(address) <= 254),
    reason      text NOT NULL CHECK (reason IN ('hard_bounce', 'complaint', 'manual')),
    -- The delivery whose event caused it; kept when that delivery is pruned.
    delivery_id text REFERENCES email.deliveries (delivery_id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz  -- NULL: never
);

-- Apply one provider event in one statement: store it (a repeat is a no-op), match it, move
-- provider_status forward, keep the earliest time of each kind, suppress on bounce/complaint.
-- Returns 'applied', 'duplicate' or 'unmatched' (worker.providers.model.Applied).
-- SECURITY INVOKER: the caller's grants and row-level security apply.
CREATE FUNCTION email.apply_provider_event(
    provider text,
    provider_event_id text,
    event_type text,
    occurred_at timestamptz,
    recipient text DEFAULT NULL,
    delivery_id text DEFAULT NULL,
    message_id text DEFAULT NULL,
    relay_message_id text DEFAULT NULL,
    bounce_type text DEFAULT NULL,
    detail jsonb DEFAULT '{}'::jsonb
) RETURNS text
LANGUAGE plpgsql
SET search_path = pg_catalog
AS $$
DECLARE
    event_id bigint;
    matched text;
    target email.provider_status;
    rcpt text;
BEGIN
    -- Matching keys, tried in order (section 6). A Message-ID may come with or without its
    -- angle brackets; the worker stores it with them.
    IF apply_provider_event.delivery_id IS NOT NULL THEN
        SELECT d.delivery_id INTO matched FROM email.deliveries d
        WHERE d.delivery_id = apply_provider_event.delivery_id;
    END IF;
    IF matched IS NULL AND nullif(btrim(message_id, '<> '), '') IS NOT NULL THEN
        SELECT d.delivery_id INTO matched FROM email.deliveries d
        WHERE d.provider_message_id IN (btrim(message_id, '<> '),
                                        '<' || btrim(message_id, '<> ') || '>')
        ORDER BY d.queued_at DESC LIMIT 1;
    END IF;
    IF matched IS NULL AND nullif(btrim(relay_message_id, '<> '), '') IS NOT NULL THEN
        SELECT d.delivery_id INTO matched FROM email.deliveries d
        WHERE d.relay_message_id IN (btrim(apply_provider_event.relay_message_id, '<> '),
                                     '<' || btrim(apply_provider_event.relay_message_id, '<> ')
                                         || '>')
        ORDER BY d.queued_at DESC LIMIT 1;
    END IF;

    INSERT INTO email.provider_events AS e (
        provider, provider_event_id, delivery_id, event_type, occurred_at, bounce_type,
        recipient, tagged_delivery_id, message_id, relay_message_id, detail
    ) VALUES (
        apply_provider_event.provider, apply_provider_event.provider_event_id, matched,
        apply_provider_event.event_type, apply_provider_event.occurred_at,
        apply_provider_event.bounce_type, apply_provider_event.recipient,
        apply_provider_event.delivery_id, apply_provider_event.message_id,
        apply_provider_event.relay_message_id, coalesce(apply_provider_event.detail, '{}')
    )
    ON CONFLICT ON CONSTRAINT provider_events_once DO NOTHING
    RETURNING e.id INTO event_id;
    IF event_id IS NULL THEN
        RETURN 'duplicate';
    END IF;
    IF matched IS NULL THEN
        RETURN 'unmatched';
    END IF;
    IF apply_provider_event.event_type = 'deferred' THEN
        RETURN 'applied';  -- recorded, no status change
    END IF;

    target := apply_provider_event.event_type::email.provider_status;
    -- For the audit row written by the provider-status trigger.
    PERFORM set_config('email.provider', apply_provider_event.provider, true);
    -- One UPDATE that reads the row it changes: concurrent events for one delivery serialise
    -- on the row lock and each re-reads the other's result (READ COMMITTED re-evaluates the
    -- SET expressions against the newest version). least() ignores NULL: the earliest wins.
    UPDATE email.deliveries d SET
        provider_status = CASE WHEN email.provider_status_allowed(d.provider_status, target)
                               THEN target ELSE d.provider_status END,
        delivered_at = CASE WHEN target = 'delivered'
                            THEN least(d.delivered_at, occurred_at) ELSE d.delivered_at END,
        opened_at = CASE WHEN target = 'opened'
                         THEN least(d.opened_at, occurred_at) ELSE d.opened_at END,
        clicked_at = CASE WHEN target = 'clicked'
                          THEN least(d.clicked_at, occurred_at) ELSE d.clicked_at END,
        bounced_at = CASE WHEN target = 'bounced'
                          THEN least(d.bounced_at, occurred_at) ELSE d.bounced_at END,
        complained_at = CASE WHEN target = 'complained'
                             THEN least(d.complained_at, occurred_at) ELSE d.complained_at END,
        -- The bounce type of the earliest bounce.
        bounce_type = CASE WHEN target = 'bounced' AND apply_provider_event.bounce_type IS NOT NULL
                            AND (d.bounced_at IS NULL OR occurred_at < d.bounced_at)
                           THEN apply_provider_event.bounce_type ELSE d.bounce_type END
    WHERE d.delivery_id = matched
    RETURNING d.recipient INTO rcpt;

    IF target IN ('bounced', 'complained') AND rcpt IS NOT NULL THEN
        -- Once: a live entry is kept (its reason and origin stay); an expired one is renewed.
        INSERT INTO email.suppressions AS s (address, reason, delivery_id)
        VALUES (lower(rcpt), CASE WHEN target = 'bounced' THEN 'hard_bounce' ELSE 'complaint' END,
                matched)
        ON CONFLICT (address) DO UPDATE SET
            reason = excluded.reason,
            delivery_id = excluded.delivery_id,
            created_at = now(),
            expires_at = NULL
        WHERE s.expires_at IS NOT NULL AND s.expires_at <= now();
    END IF;
    RETURN 'applied';
END
$$;

-- Grants (contract sections 3, 6, 7) and row-level security: the owner alone deletes.
REVOKE ALL ON email.provider_events, email.suppressions FROM PUBLIC;
REVOKE ALL ON SEQUENCE email.provider_events_id_seq FROM PUBLIC;
REVOKE ALL ON FUNCTION
    email.provider_status_allowed(email.provider_status, email.provider_status),
    email.guard_provider_status(), email.audit_provider_status(),
    email.apply_provider_event(text, text, text, timestamptz, text, text, text, text, text, jsonb)
    FROM PUBLIC;

GRANT SELECT, INSERT ON email.provider_events TO email_worker;
GRANT USAGE ON SEQUENCE email.provider_events_id_seq TO email_worker;
GRANT SELECT, INSERT, UPDATE ON email.suppressions TO email_worker;
GRANT SELECT ON email.provider_events, email.suppressions TO email_reader;
GRANT EXECUTE ON FUNCTION
    email.apply_provider_event(text, text, text, timestamptz, text, text, text, text, text, jsonb)
    TO email_worker;
GRANT EXECUTE ON FUNCTION
    email.provider_status_allowed(email.provider_status, email.provider_status)
    TO email_worker, email_reader;

ALTER TABLE email.provider_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE email.suppressions ENABLE ROW LEVEL SECURITY;

CREATE POLICY worker_select ON email.provider_events FOR SELECT TO email_worker USING (true);
CREATE POLICY worker_insert ON email.provider_events FOR INSERT TO email_worker
    WITH CHECK (true);
CREATE POLICY worker_select ON email.suppressions FOR SELECT TO email_worker USING (true);
CREATE POLICY worker_insert ON email.suppressions FOR INSERT TO email_worker WITH CHECK (true);
CREATE POLICY worker_update ON email.suppressions FOR UPDATE TO email_worker
    USING (true) WITH CHECK (true);
CREATE POLICY reader_select ON email.provider_events FOR SELECT TO email_reader USING (true);
CREATE POLICY reader_select ON email.suppressions FOR SELECT TO email_reader USING (true);
