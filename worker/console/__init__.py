"""The read-only support console (function target `delivery_console`, documented in
docs/console.md): a JSON API and HTML pages over the ledger, as an `email_reader` login.

Imported only when that target is served: the delivery path never loads it.
"""
