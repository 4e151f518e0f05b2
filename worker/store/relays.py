"""The relays' circuit breaker, shared by every instance through `email.relay_circuits`
(migration 012). Each write is one guarded statement: two instances tripping a circuit, or
trying a half-open relay, at once are decided by the database (the loser gets False).

A circuit is `closed`, `open` (its cool-down runs: deliveries go to the other relay without
connecting to this one) or `half-open` (the cool-down is over: one delivery at a time may try
it, and a success closes it).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from worker.store.db import Store


class Relay(StrEnum):
    """The relays, as they are named wherever they are reported."""

    PRIMARY = "primary"
    FALLBACK = "fallback"


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"  # the cool-down is over: awaiting a trial


@dataclass(frozen=True)
class Circuit:
    """One relay's breaker as the claim read it: enough to route one delivery."""

    relay: Relay
    state: CircuitState = CircuitState.CLOSED
    failures: int = 0  # consecutive fail-over failures
    probing: bool = False  # half-open, and another delivery holds the trial

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Circuit:
        return cls(
            Relay(value["relay"]),
            CircuitState(value["state"]),
            int(value["failures"]),
            bool(value["probing"]),
        )


def circuits_from_claim(value: Sequence[Mapping[str, Any]] | None) -> dict[Relay, Circuit]:
    """The claim's `relays` column, by relay; a relay without a row counts as closed."""
    found = {circuit.relay: circuit for circuit in map(Circuit.from_json, value or ())}
    return {relay: found.get(relay, Circuit(relay)) for relay in Relay}


@dataclass(frozen=True)
class CircuitReport:
    """One relay's breaker, for `python -m worker relays` and the console."""

    relay: Relay
    state: CircuitState
    consecutive_failures: int
    opened_at: datetime | None
    reopens_at: datetime | None
    last_error_code: str | None
    last_error_message: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "relay": self.relay.value,
            "state": self.state.value,
            "consecutive_failures": self.consecutive_failures,
            "opened_at": None if self.opened_at is None else self.opened_at.isoformat(),
            "reopens_at": None if self.reopens_at is None else self.reopens_at.isoformat(),
            "last_error_code": self.last_error_code,
            "last_error_message": self.last_error_message,
        }


@dataclass(frozen=True)
class AttemptFailure:
    """One failed send attempt to one relay, as it is recorded."""

    relay: Relay
    attempt: int
    code: str
    message: str  # sanitised
    transient: bool
    counts: bool  # a fail-over failure: it counts towards opening the relay's circuit


class Circuits(Store):
    """The breaker's statements; the healthy path runs none of them."""

    def record_failure(
        self,
        *,
        delivery_id: str,
        claim_token: uuid.UUID,
        failure: AttemptFailure,
        trip_after: int,
        cooldown_seconds: int,
    ) -> bool:
        """The attempt's audit row and, if it counts, the relay's breaker. True: this call
        opened the relay's circuit."""
        row = self._row(
            "record_send_failure",
            delivery_id=delivery_id,
            claim_token=claim_token,
            relay=failure.relay.value,
            attempt=failure.attempt,
            error_code=failure.code,
            error_message=failure.message,
            transient=failure.transient,
            counts=failure.counts,
            trip_after=trip_after,
            cooldown_seconds=cooldown_seconds,
        )
        return bool(row["opened"])

    def claim_probe(self, relay: Relay, *, seconds: int) -> bool:
        """The trial of a half-open relay for this delivery; False: another one holds it."""
        return bool(self._row("claim_relay_probe", relay=relay.value, seconds=seconds)["won"])

    def record_success(self, relay: Relay) -> bool:
        """The relay's count back to zero and its circuit closed; True: it had been open."""
        return bool(self._row("record_send_success", relay=relay.value)["was_open"])

    def report(self) -> list[CircuitReport]:
        return [
            CircuitReport(
                Relay(row["relay"]),
                CircuitState(row["state"]),
                row["consecutive_failures"],
                row["opened_at"],
                row["reopens_at"],
                row["last_error_code"],
                row["last_error_message"],
            )
            for row in self._all("relay_circuits")
        ]
