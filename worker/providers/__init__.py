"""Provider webhooks (docs/webhooks.md): one adapter module per email provider.

Nothing here is imported on the delivery path: `handle_delivery` never loads a provider's
crypto. `model.py` is the vocabulary every adapter and the ledger side share.
"""
