-- Back to 007. Roll the webhook back to the previous release first: this release's Mailgun
-- adapter claims its tokens in email.webhook_tokens. The remembered tokens are lost (they
-- are minutes old at most), and email.apply_provider_event() is 002's again, word for word:
-- events stored meanwhile keep their clamped times and their detail.
SET LOCAL lock_timeout = '5s';

DROP TABLE IF EXISTS email.webhook_tokens;

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
