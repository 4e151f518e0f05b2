-- Provider webhooks hardened (issue 16): Mailgun's signature tokens are remembered, and a
-- provider event acts on a delivery only when it is about that delivery.
--
-- Safe to apply while workers of the previous release run: a new table they never read, and
-- email.apply_provider_event() replaced with the same arguments and answers. The previous
-- release's webhook does not remember Mailgun tokens; this release's needs the table, so
-- migrate before deploying it (and roll the code back before migrating down).
SET LOCAL lock_timeout = '5s';

-- 1. Mailgun signs only `timestamp + token`, not the event, so one captured signature object
-- would verify with any `event-data` for as long as its timestamp is fresh. Mailgun's advice
-- is to refuse a token seen before. The webhook claims each token here once
-- (sql/tracking.sql `claim_webhook_token`: no row back means a replay): in the database, so
-- every instance agrees. Only the SHA-256 of the token is kept, until it can no longer pass
-- the freshness check anyway.
CREATE TABLE email.webhook_tokens (
    provider     text NOT NULL CHECK (provider ~ '^[a-z0-9_-]{1,40}$'),
    token_sha256 bytea NOT NULL CHECK (length(token_sha256) = 32),
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (provider, token_sha256)
);
-- The claim forgets a few expired tokens each time, oldest first.
CREATE INDEX webhook_tokens_expires_at_idx ON email.webhook_tokens (expires_at);

REVOKE ALL ON email.webhook_tokens FROM PUBLIC;
GRANT SELECT, INSERT, DELETE ON email.webhook_tokens TO email_worker;
ALTER TABLE email.webhook_tokens ENABLE ROW LEVEL SECURITY;
CREATE POLICY worker_select ON email.webhook_tokens FOR SELECT TO email_worker USING (true);
CREATE POLICY worker_insert ON email.webhook_tokens FOR INSERT TO email_worker
    WITH CHECK (true);
-- The worker may forget a token only once it has expired: a live one always refuses a replay.
CREATE POLICY worker_delete_expired ON email.webhook_tokens FOR DELETE TO email_worker
    USING (expires_at < now());

-- 2. email.apply_provider_event() as in 002, except that an event acts only on a delivery it
-- is about, and only on one that was sent:
--   - where the event names its recipient, a delivery matches only if its recipient is the
--     same address (lower-cased, trimmed, a display name's angle brackets taken off): a
--     signed event naming someone else's delivery is kept unmatched and suppresses no one;
--   - an event for a delivery that was never sent (status other than `sent`) is kept with
--     its delivery but changes nothing and suppresses no one;
--   - an occurred_at more than an hour after receipt, or more than five minutes (the
--     signatures' freshness window, for the providers' clocks) before the email was sent
--     (before its row was created, for one never sent), is not a time this email had: it is stored as the receipt time, and
--     detail.occurred_at_clamped keeps the time the provider gave (ISO 8601, UTC).
CREATE OR REPLACE FUNCTION email.apply_provider_event(
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
    matched_status email.delivery_status;
    matched_since timestamptz;  -- its send time, or its row's creation before one
    -- The address the event names, as the ledger's is compared: NULL when it names none.
    named text := nullif(lower(btrim(coalesce(
        substring(apply_provider_event.recipient FROM '<([^<>]*)>\s*$'),
        apply_provider_event.recipient))), '');
    happened timestamptz := apply_provider_event.occurred_at;
    kept jsonb := coalesce(apply_provider_event.detail, '{}');
    target email.provider_status;
    rcpt text;
BEGIN
    -- Matching keys, tried in order: the delivery id the worker tagged the email with, its
    -- Message-ID, the relay's id. A Message-ID may come with or without its angle brackets;
    -- the worker stores it with them. Each key finds only a delivery to the recipient the
    -- event names, if it names one.
    IF apply_provider_event.delivery_id IS NOT NULL THEN
        SELECT d.delivery_id, d.status, coalesce(d.sent_at, d.created_at)
        INTO matched, matched_status, matched_since
        FROM email.deliveries d
        WHERE d.delivery_id = apply_provider_event.delivery_id
          AND (named IS NULL OR lower(btrim(d.recipient)) = named);
    END IF;
    IF matched IS NULL AND nullif(btrim(message_id, '<> '), '') IS NOT NULL THEN
        SELECT d.delivery_id, d.status, coalesce(d.sent_at, d.created_at)
        INTO matched, matched_status, matched_since
        FROM email.deliveries d
        WHERE d.provider_message_id IN (btrim(message_id, '<> '),
                                        '<' || btrim(message_id, '<> ') || '>')
          AND (named IS NULL OR lower(btrim(d.recipient)) = named)
        ORDER BY d.queued_at DESC LIMIT 1;
    END IF;
    IF matched IS NULL AND nullif(btrim(relay_message_id, '<> '), '') IS NOT NULL THEN
        SELECT d.delivery_id, d.status, coalesce(d.sent_at, d.created_at)
        INTO matched, matched_status, matched_since
        FROM email.deliveries d
        WHERE d.relay_message_id IN (btrim(apply_provider_event.relay_message_id, '<> '),
                                     '<' || btrim(apply_provider_event.relay_message_id, '<> ')
                                         || '>')
          AND (named IS NULL OR lower(btrim(d.recipient)) = named)
        ORDER BY d.queued_at DESC LIMIT 1;
    END IF;

    -- A time this email cannot have had (a provider's bug, a forged or misread timestamp)
    -- would become its delivered_at or bounced_at and win every "earliest" comparison.
    IF happened > now() + interval '1 hour'
       OR happened < matched_since - interval '5 minutes' THEN
        kept := kept || jsonb_build_object('occurred_at_clamped',
            to_char(happened AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'));
        happened := now();
    END IF;

    INSERT INTO email.provider_events AS e (
        provider, provider_event_id, delivery_id, event_type, occurred_at, bounce_type,
        recipient, tagged_delivery_id, message_id, relay_message_id, detail
    ) VALUES (
        apply_provider_event.provider, apply_provider_event.provider_event_id, matched,
        apply_provider_event.event_type, happened,
        apply_provider_event.bounce_type, apply_provider_event.recipient,
        apply_provider_event.delivery_id, apply_provider_event.message_id,
        apply_provider_event.relay_message_id, kept
    )
    ON CONFLICT ON CONSTRAINT provider_events_once DO NOTHING
    RETURNING e.id INTO event_id;
    IF event_id IS NULL THEN
        RETURN 'duplicate';
    END IF;
    IF matched IS NULL THEN
        RETURN 'unmatched';
    END IF;
    -- Recorded, no status change: a soft bounce, or an email that was never sent (skipped,
    -- failed, still queued...), which nothing a provider says can have happened to.
    IF apply_provider_event.event_type = 'deferred' OR matched_status <> 'sent' THEN
        RETURN 'applied';
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
                            THEN least(d.delivered_at, happened) ELSE d.delivered_at END,
        opened_at = CASE WHEN target = 'opened'
                         THEN least(d.opened_at, happened) ELSE d.opened_at END,
        clicked_at = CASE WHEN target = 'clicked'
                          THEN least(d.clicked_at, happened) ELSE d.clicked_at END,
        bounced_at = CASE WHEN target = 'bounced'
                          THEN least(d.bounced_at, happened) ELSE d.bounced_at END,
        complained_at = CASE WHEN target = 'complained'
                             THEN least(d.complained_at, happened) ELSE d.complained_at END,
        -- The bounce type of the earliest bounce.
        bounce_type = CASE WHEN target = 'bounced' AND apply_provider_event.bounce_type IS NOT NULL
                            AND (d.bounced_at IS NULL OR happened < d.bounced_at)
                           THEN apply_provider_event.bounce_type ELSE d.bounce_type END
    WHERE d.delivery_id = matched AND d.status = 'sent'
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
