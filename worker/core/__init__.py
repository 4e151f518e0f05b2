"""The ground floor: settings, secrets, logging, redaction, tracing, the address and
delivery-id rules, the per-instance holder and the Pub/Sub client. It imports nothing else of
the worker."""
