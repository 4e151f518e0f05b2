"""Two relays and the breaker between them: which relays one delivery tries, in what order,
and what each failed or successful send tells the shared circuit breaker.

Routing (`plan`) reads the breaker state the claim brought back, so a delivery while every
relay is healthy costs no statement here. A relay whose circuit is open is skipped without
connecting to it; a half-open one is tried by the one delivery that wins its trial
(`Circuits.claim_probe`); when every configured relay is open, all are tried in order, and a
lone relay is always tried.

Within one attempt (`FailoverSender.send`) the next relay is tried at once, without waiting,
only when the failed one does not have the message (`SmtpError.fails_over`), or cannot take
it (no SMTPUTF8 for a non-ASCII local part), and only while the lease leaves room for
another attempt. A connection lost after the whole message was sent pins the rest of the
invocation to that relay: it may have queued the email.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from worker.core.logging import get_logger
from worker.delivery.config import BreakerSettings
from worker.delivery.relay import SmtpProvider, tracking_headers
from worker.delivery.smtp import SMTPUTF8_UNSUPPORTED, OutgoingEmail, Sends, SmtpError
from worker.store.ledger import Claim
from worker.store.relays import AttemptFailure, Circuit, Circuits, CircuitState, Relay

log = get_logger()


@dataclass(frozen=True)
class Route:
    """One configured relay: its name, its connections, and its provider's headers."""

    relay: Relay
    sender: Sends
    provider: SmtpProvider = SmtpProvider.NONE


def plan(
    routes: Sequence[Route], claim: Claim, claim_probe: Callable[[Relay], bool]
) -> list[Route]:
    """The relays this delivery tries, in order."""
    if len(routes) < 2:
        return list(routes)  # with no other relay, an open relay is still tried
    usable = [route for route in routes if _usable(claim.circuits.get(route.relay), claim_probe)]
    return usable or list(routes)  # every circuit open: try them anyway, primary first


def _usable(circuit: Circuit | None, claim_probe: Callable[[Relay], bool]) -> bool:
    if circuit is None or circuit.state is CircuitState.CLOSED:
        return True
    if circuit.state is CircuitState.OPEN or circuit.probing:
        return False
    return claim_probe(circuit.relay)  # half-open: one delivery at a time tries it


def probe_seconds(smtp_timeout_seconds: float) -> int:
    """How long a trial of a half-open relay is held: one attempt's worst case."""
    return math.ceil(2 * smtp_timeout_seconds + 1)


@dataclass
class FailoverSender:
    """One delivery's relays, tried in order within each attempt (`send_with_retry` calls
    `send` once per attempt). Records every failed send attempt (its audit row, the relay's
    breaker) and, when it is due, the success that resets a relay's breaker."""

    routes: Sequence[Route]
    claim: Claim
    circuits: Circuits
    breaker: BreakerSettings
    delivery_id: str
    deadline_at: float | None = None  # monotonic: no failover may start after it
    clock: Callable[[], float] = time.monotonic
    accepted_by: Relay | None = None
    smtp_ms: int | None = None
    _passes: int = 0
    _pinned: Route | None = None
    _failed: set[Relay] = field(default_factory=set)

    def send(self, message: OutgoingEmail) -> str | None:
        self._passes += 1
        routes = [self._pinned] if self._pinned is not None else list(self.routes)
        errors: list[SmtpError] = []
        for index, route in enumerate(routes):
            if errors and not self._may_fail_over(routes[index - 1], errors[-1], route):
                break
            started = self.clock()
            try:
                relay_id = route.sender.send(
                    message.with_headers(tracking_headers(route.provider, self.delivery_id))
                )
            except SmtpError as error:
                self._record_failure(route.relay, error)
                errors.append(error)
                if error.may_have_message:
                    self._pinned = route  # it may have queued it: nowhere else this time
                    break
                continue
            self.smtp_ms = max(0, round((self.clock() - started) * 1000))
            self.accepted_by = route.relay
            self._record_success(route.relay)
            return relay_id
        raise _reported(errors)

    def _may_fail_over(self, source: Route, error: SmtpError, target: Route) -> bool:
        if not (error.fails_over or error.code == SMTPUTF8_UNSUPPORTED):
            return False
        if self.deadline_at is not None and self.clock() > self.deadline_at:
            return False  # another attempt could outlive the lease
        log.warning(
            "relay failover",
            relay=source.relay.value,
            to_relay=target.relay.value,
            error_code=error.code,
            error_message=error.message,
            phase=None if error.phase is None else error.phase.value,
        )
        return True

    def _record_failure(self, relay: Relay, error: SmtpError) -> None:
        counts = error.fails_over
        if counts:
            self._failed.add(relay)
        opened = self.circuits.record_failure(
            delivery_id=self.delivery_id,
            claim_token=self.claim.claim_token,
            failure=AttemptFailure(
                relay=relay,
                attempt=self.claim.attempts + self._passes - 1,
                code=error.code,
                message=error.message,
                transient=error.transient,
                counts=counts,
            ),
            trip_after=self.breaker.trip_after,
            cooldown_seconds=self.breaker.cooldown_seconds,
        )
        if opened:
            log.error(
                "relay circuit opened",
                relay=relay.value,
                cooldown_seconds=self.breaker.cooldown_seconds,
                error_code=error.code,
                error_message=error.message,
            )

    def _record_success(self, relay: Relay) -> None:
        circuit = self.claim.circuits.get(relay)
        due = relay in self._failed or (
            circuit is not None
            and (circuit.failures > 0 or circuit.state is not CircuitState.CLOSED)
        )
        if not due:
            return  # the healthy path: nothing to reset, no statement
        if self.circuits.record_success(relay):
            log.info("relay circuit closed", relay=relay.value)


def _reported(errors: Sequence[SmtpError]) -> SmtpError:
    """The error the attempt ends with: the last relay's, except that a relay without SMTPUTF8
    does not turn another relay's transient failure into a permanent one."""
    last = errors[-1]
    if last.code == SMTPUTF8_UNSUPPORTED:
        return next((error for error in errors if error.transient), last)
    return last
