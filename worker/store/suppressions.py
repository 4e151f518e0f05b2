"""The suppression list (docs/operating.md): `python -m worker suppressions list|add|remove`,
and the suppression state `history --recipient` shows.

Entries come from provider events (a hard bounce or a complaint, `worker/store/tracking.py`) and
from operators (`add`, reason `manual` by default, optionally expiring). The worker checks the
list inside its claim (`email.claim_delivery()`, migration 005): a live entry ends the
delivery `skipped` with `SUPPRESSED`. Addresses are compared in their stored form
(`rules.normalise_address`), lower-cased, everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from worker.core.rules import RECIPIENT_RULE, address_key
from worker.store.db import Store
from worker.store.ledger import SUPPRESSION_REASONS, Reason

__all__ = [
    "SUPPRESSION_REASONS",
    "InvalidAddress",
    "Suppression",
    "Suppressions",
    "normalise",
]


class InvalidAddress(ValueError):
    """Not one address by the worker's recipient rule; `str()` is one line."""


def normalise(address: str) -> str:
    """The stored form of an address, lower-cased (`rules.address_key`: a domain's U-label
    and A-label spellings are one entry), or InvalidAddress with the rule."""
    key = address_key(address.strip())
    if key is None:
        raise InvalidAddress(f"{address!r} is not an email address: {RECIPIENT_RULE}")
    return key


@dataclass(frozen=True)
class Suppression:
    address: str
    reason: Reason
    delivery_id: str | None  # the delivery whose provider event caused it
    created_at: datetime
    expires_at: datetime | None  # None: never
    live: bool  # false once expires_at has passed: the worker sends again

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Suppression:
        return cls(
            address=row["address"],
            reason=Reason(row["reason"]),
            delivery_id=row["delivery_id"],
            created_at=row["created_at"],
            expires_at=row["expires_at"],
            live=row["live"],
        )


@dataclass(frozen=True)
class Listing:
    entries: list[Suppression]
    total: int  # entries that matched, before the limit


class Suppressions(Store):
    """The suppression list: read by the claim, fed by provider events and operators."""

    def listing(self, *, reason: Reason | None = None, limit: int = 100) -> Listing:
        rows = self._all(
            "list_suppressions", reason=None if reason is None else reason.value, limit=limit
        )
        total = int(rows[0]["total"]) if rows else 0
        return Listing([Suppression.from_row(row) for row in rows], total)

    def get(self, address: str) -> Suppression | None:
        """The entry for `address` (any letter case), live or expired."""
        rows = self._all("get_suppression", address=normalise(address))
        return Suppression.from_row(rows[0]) if rows else None

    def add(
        self, address: str, *, reason: Reason = Reason.MANUAL, expires: timedelta | None = None
    ) -> tuple[Suppression, bool]:
        """Suppress `address`; idempotent. Returns the entry and whether this call made it:
        a live entry is kept as it is (remove it first to change it), an expired one renewed."""
        if reason not in SUPPRESSION_REASONS:
            raise ValueError(f"{reason!r} is not a suppression reason")
        key = normalise(address)
        rows = self._all(
            "add_suppression_if_absent",
            address=key,
            reason=reason.value,
            expires_seconds=None if expires is None else expires.total_seconds(),
        )
        if rows:
            return Suppression.from_row(rows[0]), True
        existing = self.get(key)
        # A concurrent `remove` between the two statements: add again.
        return (
            (existing, False)
            if existing is not None
            else self.add(key, reason=reason, expires=expires)
        )

    def remove(self, address: str) -> Suppression | None:
        """Lift the suppression: the next delivery to the address is sent. None: there was
        none. Needs a role that may delete (the table's owner)."""
        rows = self._all("remove_suppression", address=normalise(address))
        return Suppression.from_row(rows[0]) if rows else None
