-- Removes the ledger. Roles are cluster-wide and may be granted to users of other databases,
-- so they are emptied here but not dropped (DROP ROLE email_worker, email_reader by hand).
DROP TABLE IF EXISTS email.delivery_events;
DROP TABLE IF EXISTS email.deliveries;
DROP FUNCTION IF EXISTS email.audit_delivery_transition();
DROP FUNCTION IF EXISTS email.guard_delivery_transition();
DROP FUNCTION IF EXISTS email.transition_allowed(email.delivery_status, email.delivery_status);
DROP TYPE IF EXISTS email.delivery_status;
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'email_worker') THEN
        REVOKE ALL ON SCHEMA email FROM email_worker;
    END IF;
    IF EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'email_reader') THEN
        REVOKE ALL ON SCHEMA email FROM email_reader;
    END IF;
END
$$;
