"""The delivery function's wing: a Pub/Sub event decoded (events), its workflow and template
(workflows, rendering), sent over SMTP (smtp, relay), its ending decided (outcomes) and carried
out (pipeline, deadletter)."""
