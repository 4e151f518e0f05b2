"""Put dead letters back on the delivery topic: `python -m worker replay`.

A run pulls the dead-letter subscription in batches (synchronous pull) and, per message:
  1. identifies the delivery: our own dead letters name it in attributes; those Pub/Sub's
     dead-letter policy forwarded (`CloudPubSubDeadLetter*` attributes, no `reason`) only in
     their data, which is parsed best effort;
  2. leaves a message that does not match the filters for later: it stays leased for the run,
     so the run does not pull it again, and is released (ack deadline 0) at the end; so is one
     whose bytes are still an invalid event by the worker's own rules (too large, bad JSON, a
     bad field): republished, it would only be dead-lettered again, run after run;
  3. decides from the ledger row (`Action`) and makes the row replayable *before* the
     republish: a worker that got the message first would otherwise find the row finished
     and drop it;
  4. republishes the original bytes without the dead-letter attributes, with
     `replayed_from=<dead-letter message id>`, and acks only once the publish is confirmed;
     the republishes of one pulled batch run concurrently and are acked in one call.
A dead letter whose delivery's validity end has passed (the ledger row's `not_after`, or the
one the message gives itself: its `not_after` or an invite's `expires_at`; the database's
clock decides) is not republished: the
worker would only skip it `EXPIRED`. It is counted `expired` and left on the subscription, or
acked with `drop_expired` (`--drop-expired`); its row is left as it is.
Acked messages are gone, so a second run replays nothing twice; a row already `sent` is acked
without a republish. A dead letter of a message this run republished (the delivery failed
again while the run went on: its `source_message_id` is one of the run's republishes, or, when
Pub/Sub's policy forwarded it, its `replayed_from` is one of the run's replayed dead letters) is
never acked nor republished by the run: it stays on the subscription for the next run, after
the operator fixed the cause. Only an earlier copy of a dead letter for a delivery this run
replayed is acked as a duplicate.

Any message Pub/Sub accepts (10 MB) can be pulled: the client's channel takes 20 MiB
(worker/core/pubsub.py). A pull response too large for it (several big messages at once) makes the
run pull one message at a time; the messages in it were leased to that lost response, so the
run waits out the subscription's ack deadline for them to come back. One message too large
even alone is counted (`too_large`) and the run goes on with the rest.

`google.cloud.pubsub_v1` is imported only when a run starts: importing the CLI stays cheap.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, TypeVar

from worker.core import pubsub as worker_pubsub
from worker.core.settings import PubSubSettings, SettingsError
from worker.delivery import events
from worker.store.ledger import Ledger, Reason, Status

__all__ = [
    "POLICY_REASON",
    "Action",
    "DeadLetter",
    "Filters",
    "Item",
    "ReplayError",
    "ReplayOptions",
    "Summary",
    "replay",
]

T = TypeVar("T")
POLICY_REASON = Reason.PUBSUB_DEAD_LETTER_POLICY
POLICY_PREFIX = "CloudPubSubDeadLetter"
OUR_ATTRIBUTES = frozenset(
    {"reason", "error_code", "error_message", "attempts", "source_message_id"}
    | {"delivery_id", "workflow"}
)
# Held messages are leased this long (Pub/Sub's maximum) and re-leased at half-time, so a long
# run never sees them twice; a run killed hard lets them go after at most this long.
HOLD_SECONDS = 600
RPC_TIMEOUT_SECONDS = 30.0
POLL_SECONDS = 0.2
RELEASE_CHUNK = 1000
# Republishes of one pulled batch in flight at once; the publisher client batches them.
PUBLISH_CONCURRENCY = 32
# A row that changes under the replay this often (a worker racing it) is left for a later run.
MAX_DECISIONS = 3
# Slack after the subscription's ack deadline before messages of a lost pull are due again.
REDELIVERY_SLACK_SECONDS = 1.0


class ReplayError(Exception):
    """The run cannot go on (subscription missing, Pub/Sub unreachable). One line."""


class _TooLarge(ReplayError):
    """A pull's response was larger than the client's channel may receive."""


class Action(StrEnum):
    """What a dead letter's ledger row calls for."""

    NEW = "new"  # no ledger row (or no delivery id): republish
    QUEUED = "queued"  # requeued by an earlier replay, not processed yet: republish
    REQUEUE = "requeue"  # failed/dead_letter -> queued, then republish
    CLOSE_AND_REQUEUE = "close_and_requeue"  # retrying/expired lease -> dead_letter -> queued
    SKIP_SENT = "skip_sent"  # already sent: ack, nothing to do
    SKIP_SKIPPED = "skip_skipped"  # deliberately not sent (suppressed, rate limited): ack
    SKIP_IN_PROGRESS = "skip_in_progress"  # a live lease: leave for later
    SKIP_DUPLICATE = "skip_duplicate"  # this run already replayed the delivery: ack
    SKIP_INVALID = "skip_invalid"  # still an invalid event: leave it, never republish
    FAILED_AGAIN = "failed_again"  # dead letter of this run's own republish: leave for later
    # its validity end has passed: never republished; acked only with --drop-expired
    SKIP_EXPIRED = "skip_expired"

    @property
    def republishes(self) -> bool:
        return self in (Action.NEW, Action.QUEUED, Action.REQUEUE, Action.CLOSE_AND_REQUEUE)

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    Action.NEW: "no ledger row",
    Action.QUEUED: "row already queued",
    Action.REQUEUE: "row requeued",
    Action.CLOSE_AND_REQUEUE: "abandoned row closed and requeued",
    Action.SKIP_SENT: "already sent",
    Action.SKIP_SKIPPED: "deliberately not sent (skipped); final",
    Action.SKIP_IN_PROGRESS: "in progress under a live lease",
    Action.SKIP_DUPLICATE: "already replayed in this run",
    Action.SKIP_INVALID: "still invalid, not republished (it would fail again); left",
    Action.FAILED_AGAIN: "failed again after this run republished it; left for the next run",
    Action.SKIP_EXPIRED: "expired (its validity end has passed); not republished",
}


class ItemResult(StrEnum):
    REPLAYED = "replayed"
    WOULD_REPLAY = "would replay"
    SKIPPED = "skipped"
    FAILED = "failed"
    LEFT = "left"
    EXPIRED = "expired"


# --- one dead letter ------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    ack_id: str = field(repr=False)
    message_id: str
    data: bytes = field(repr=False)  # the original event: holds codes and links
    attributes: Mapping[str, str]
    reason: str
    error_code: str | None
    delivery_id: str | None
    workflow: str | None
    # Why the bytes are an invalid event by this code's rules ("field: rule"); None if valid.
    invalid: str | None = None
    # The event's own validity end, when it gives one (`Checked.not_after`).
    not_after: datetime | None = None

    @classmethod
    def from_received(cls, received: Any) -> DeadLetter:
        """From a `google.pubsub_v1.types.ReceivedMessage`."""
        message = received.message
        attributes = dict(message.attributes)
        data = bytes(message.data)
        ours = "reason" in attributes
        checked = check(data)
        from_data = (checked.delivery_id, checked.workflow)
        return cls(
            ack_id=received.ack_id,
            message_id=message.message_id,
            data=data,
            attributes=attributes,
            reason=attributes.get("reason") or _policy_or_unknown(attributes),
            error_code=attributes.get("error_code"),
            delivery_id=attributes.get("delivery_id") if ours else from_data[0],
            workflow=attributes.get("workflow") if ours else from_data[1],
            invalid=checked.invalid,
            not_after=checked.not_after,
        )

    def republish_attributes(self) -> dict[str, str]:
        """The original attributes without any dead-letter ones, plus where it came from."""
        kept = {
            key: value
            for key, value in self.attributes.items()
            if key not in OUR_ATTRIBUTES and not key.startswith(POLICY_PREFIX)
        }
        return {**kept, "replayed_from": self.message_id}

    def descends_from(self, republished: set[str], replayed: set[str]) -> bool:
        """Whether this is the dead letter of a message in `republished` (our own dead
        letters name the failed message in `source_message_id`; Pub/Sub's policy forwards the
        message's own attributes, which carry `replayed_from`, a dead letter in `replayed`)."""
        if "reason" in self.attributes:
            return self.attributes.get("source_message_id") in republished
        return self.attributes.get("replayed_from") in replayed


def _policy_or_unknown(attributes: Mapping[str, str]) -> str:
    forwarded = any(key.startswith(POLICY_PREFIX) for key in attributes)
    return POLICY_REASON if forwarded else "unknown"


@dataclass(frozen=True)
class Checked:
    """An event's bytes read by the worker's own parser: best-effort (delivery id, workflow),
    None where unreadable, and the rule they break (`"field: rule"`), None when valid."""

    delivery_id: str | None
    workflow: str | None
    invalid: str | None
    # The validity end the event gives itself, without a publish time: its `not_after`, or an
    # invite's `expires_at` (valid events only).
    not_after: datetime | None = None


def check(data: bytes) -> Checked:
    message = events.PubSubMessage(data=data, attributes={}, message_id="")
    try:
        event = events.parse_delivery(message)
    except events.InvalidEvent as invalid:
        return Checked(invalid.delivery_id, invalid.workflow, str(invalid))
    return Checked(event.delivery_id, event.workflow, None, event.valid_until)


def identify(data: bytes) -> tuple[str | None, str | None]:
    """Best-effort (delivery id, workflow) of an event's bytes; None where unreadable."""
    checked = check(data)
    return checked.delivery_id, checked.workflow


@dataclass(frozen=True)
class Filters:
    reason: str | None = None
    workflow: str | None = None
    delivery_id: str | None = None

    def match(self, letter: DeadLetter) -> bool:
        wanted = (
            (self.reason, letter.reason),
            (self.workflow, letter.workflow),
            (self.delivery_id, letter.delivery_id),
        )
        return all(want is None or want == got for want, got in wanted)


# --- a run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayOptions:
    subscription: str  # an id in the project, or projects/P/subscriptions/S
    filters: Filters = Filters()
    limit: int | None = None  # replay at most this many
    dry_run: bool = False
    # Ack the dead letters whose validity end has passed (they are never republished).
    drop_expired: bool = False
    # Stop once pulls have come back empty for this long. Pulls return at once (a long poll
    # cut short by a client deadline can take messages the caller never sees).
    wait_seconds: float = 2.0
    batch_size: int = 100


@dataclass(frozen=True)
class Item:
    """One dead letter the run acted on (or, in a dry run, would have)."""

    letter: DeadLetter
    action: Action | None  # None: the decision itself failed
    outcome: ItemResult
    detail: str = ""


@dataclass
class Summary:
    dry_run: bool
    pulled: int = 0
    replayed: int = 0  # in a dry run: would replay
    skipped: int = 0
    failed: int = 0
    left: int = 0  # did not match the filters, or over the limit: released for later
    expired: int = 0  # validity end passed: not republished (acked with drop_expired)
    dropped_expired: bool = False  # whether the expired ones were acked (never in a dry run)
    too_large: int = 0  # pulls of one message that could not be received (none with 20 MiB)


OnItem = Callable[[Item], None]
OnProgress = Callable[[Summary], None]


def replay(
    ledger: Ledger,
    settings: PubSubSettings,
    options: ReplayOptions,
    *,
    on_item: OnItem = lambda _item: None,
    on_progress: OnProgress = lambda _summary: None,
    subscriber: Any = None,
) -> Summary:
    """One replay run against the subscription; see the module docstring. `subscriber` is a
    `SubscriberClient` the caller owns; by default the run makes (and closes) its own."""
    if settings.delivery_topic is None:
        raise SettingsError("DELIVERY_TOPIC is required but not set")
    with _subscriber(subscriber) as client:
        run = _Run(ledger, settings, options, _Subscription(client, settings, options))
        return run.execute(on_item, on_progress)


@contextlib.contextmanager
def _subscriber(given: Any) -> Iterator[Any]:
    if given is not None:
        yield given
        return
    client = worker_pubsub.subscriber_client()  # imports the library: only when a run starts
    try:
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.close()


def subscription_path(settings: PubSubSettings, subscription_id: str) -> str:
    return f"projects/{settings.project}/subscriptions/{subscription_id}"


class _Subscription:
    """The RPCs of one run, each bounded and turned into a one-line `ReplayError`."""

    def __init__(self, client: Any, settings: PubSubSettings, options: ReplayOptions) -> None:
        self.client = client
        sub = options.subscription
        self.path = sub if sub.startswith("projects/") else subscription_path(settings, sub)

    def pull(self, max_messages: int) -> list[Any]:
        def call() -> list[Any]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # return_immediately
                response = self.client.pull(
                    request={
                        "subscription": self.path,
                        "max_messages": max_messages,
                        "return_immediately": True,
                    },
                    timeout=RPC_TIMEOUT_SECONDS,
                )
            return list(response.received_messages)

        return self._rpc("pull", call)

    def ack_deadline(self) -> int:
        """The subscription's ack deadline in seconds."""

        def call() -> int:
            found = self.client.get_subscription(
                request={"subscription": self.path}, timeout=RPC_TIMEOUT_SECONDS
            )
            return int(found.ack_deadline_seconds)

        return self._rpc("get_subscription", call)

    def ack(self, ack_ids: Sequence[str]) -> None:
        request = {"subscription": self.path, "ack_ids": list(ack_ids)}
        self._rpc(
            "ack", lambda: self.client.acknowledge(request=request, timeout=RPC_TIMEOUT_SECONDS)
        )

    def lease(self, ack_ids: Sequence[str], seconds: int) -> None:
        """Set the ack deadline: HOLD_SECONDS keeps a message from this run, 0 releases it."""
        for start in range(0, len(ack_ids), RELEASE_CHUNK):
            self._modify_ack_deadline(ack_ids[start : start + RELEASE_CHUNK], seconds)

    def _modify_ack_deadline(self, ack_ids: Sequence[str], seconds: int) -> None:
        request = {
            "subscription": self.path,
            "ack_ids": list(ack_ids),
            "ack_deadline_seconds": seconds,
        }
        self._rpc(
            "modify_ack_deadline",
            lambda: self.client.modify_ack_deadline(request=request, timeout=RPC_TIMEOUT_SECONDS),
        )

    def _rpc(self, what: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except Exception as error:
            text = " ".join(str(error).split()) or type(error).__name__
            kind = _TooLarge if _too_large(error) else ReplayError
            raise kind(f"{what} on {self.path} failed: {text[:300]}") from error


def _too_large(error: Exception) -> bool:
    """gRPC's own limit on a received message (RESOURCE_EXHAUSTED, "larger than max")."""
    from google.api_core import exceptions

    return isinstance(error, exceptions.ResourceExhausted) and "larger than max" in str(error)


class _Run:
    def __init__(
        self,
        ledger: Ledger,
        settings: PubSubSettings,
        options: ReplayOptions,
        subscription: _Subscription,
    ) -> None:
        self.ledger = ledger
        self.settings = settings
        self.options = options
        self.sub = subscription
        self.summary = Summary(
            dry_run=options.dry_run, dropped_expired=options.drop_expired and not options.dry_run
        )
        self.held: dict[str, str] = {}  # message id -> latest ack id, released at the end
        self.acked: set[str] = set()
        self.replayed_ids: set[str] = set()  # delivery ids
        # Message ids of this run's republishes, and of the dead letters they replayed: a dead
        # letter naming one of them is a new failure, not a copy of one this run handled.
        self.republished: set[str] = set()
        self.replayed_letters: set[str] = set()
        self.leased_at = time.monotonic()
        # At most this many per pull: 1 after a response too large to receive.
        self.pull_cap = options.batch_size
        # Messages of a lost pull response come back after the ack deadline: wait until then.
        self.lost_until = 0.0
        # Decided and made replayable, waiting for the batch's concurrent republish.
        self.pending: list[tuple[DeadLetter, Action]] = []
        self.publishers = ThreadPoolExecutor(PUBLISH_CONCURRENCY, "replay-publish")

    def execute(self, on_item: OnItem, on_progress: OnProgress) -> Summary:
        try:
            with self.publishers:
                self._loop(on_item, on_progress)
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to report
                self._release()
            raise
        self._release()
        return self.summary

    def _loop(self, on_item: OnItem, on_progress: OnProgress) -> None:
        last_message = time.monotonic()
        while (want := self._room()) > 0:
            batch = self._pull(want)
            if not batch:
                now = time.monotonic()
                if now - last_message >= self.options.wait_seconds and now >= self.lost_until:
                    return
                time.sleep(POLL_SECONDS)
                continue
            last_message = time.monotonic()
            # Lease the whole batch first: working through it may outlast the ack deadline.
            self.sub.lease([m.ack_id for m in batch], HOLD_SECONDS)
            for received in batch:
                self._one(DeadLetter.from_received(received), on_item)
                on_progress(self.summary)
            for item in self._republish_pending():
                on_item(item)
            on_progress(self.summary)
            self._renew_held()

    def _pull(self, want: int) -> list[Any]:
        """A pull of at most `want` (and the cap). Pub/Sub leased what it sent in a response
        too large to receive: those come back after the ack deadline, and the run pulls one
        at a time from then on. A single message too large is counted, and skipped."""
        while True:
            size = min(want, self.pull_cap)
            try:
                return self.sub.pull(size)
            except _TooLarge:
                if size == 1:
                    self.summary.too_large += 1
                    return []
                # Which of its messages were large is unknown; one at a time is sure to get
                # each of them (and the rest) through once they come back.
                self.pull_cap = 1
                deadline = self.sub.ack_deadline() + REDELIVERY_SLACK_SECONDS
                self.lost_until = time.monotonic() + deadline

    def _room(self) -> int:
        """How many messages the next pull may take."""
        if self.options.limit is None:
            return self.options.batch_size
        taken = self.summary.replayed + len(self.pending)
        return min(self.options.batch_size, self.options.limit - taken)

    def _one(self, letter: DeadLetter, on_item: OnItem) -> None:
        if letter.message_id in self.acked or letter.message_id in self.held:
            self._seen_again(letter)
            return
        self.summary.pulled += 1
        if letter.descends_from(self.republished, self.replayed_letters):
            self._hold(letter)
            self.summary.left += 1
            on_item(Item(letter, Action.FAILED_AGAIN, ItemResult.LEFT))
            return
        if not self.options.filters.match(letter) or self._room() <= 0:
            self._hold(letter)
            self.summary.left += 1
            return
        if letter.invalid is not None:
            # The worker would refuse the same bytes again: left for someone to fix and
            # publish anew, and the ledger row stays as it is.
            self._hold(letter)
            self.summary.skipped += 1
            on_item(Item(letter, Action.SKIP_INVALID, ItemResult.SKIPPED, letter.invalid))
            return
        item = self._dry(letter) if self.options.dry_run else self._live(letter)
        if item is not None:
            on_item(item)

    def _seen_again(self, letter: DeadLetter) -> None:
        """Pub/Sub gave back a message this run already handled (a lost ack or lease)."""
        if letter.message_id in self.acked:
            self.sub.ack([letter.ack_id])
        else:
            self._hold(letter)

    # --- decisions --------------------------------------------------------------------------

    def _plan(self, delivery_id: str | None) -> Action:
        """The action the row calls for now; reads only."""
        if delivery_id is None:
            return Action.NEW
        if delivery_id in self.replayed_ids:
            return Action.SKIP_DUPLICATE
        row = self.ledger.get(delivery_id)
        if row is None:
            return Action.NEW
        if row.status is Status.SENT:
            return Action.SKIP_SENT
        if row.status is Status.SKIPPED:
            return Action.SKIP_SKIPPED
        if row.status in (Status.FAILED, Status.DEAD_LETTER):
            return Action.REQUEUE
        if row.status is Status.QUEUED:
            return Action.QUEUED
        if row.status is Status.RETRYING or self.ledger.lease_expired(delivery_id):
            # Its Pub/Sub message is gone (the policy forwarded it): nobody will finish it.
            return Action.CLOSE_AND_REQUEUE
        return Action.SKIP_IN_PROGRESS

    def _apply(self, delivery_id: str, action: Action) -> bool:
        """Make the row replayable; False when a guard did not hold (the row moved on)."""
        if action is Action.CLOSE_AND_REQUEUE:
            closed = self.ledger.set_dead_letter_if_abandoned(delivery_id, reason=POLICY_REASON)
            return closed and self.ledger.set_queued_if_finished(delivery_id)
        if action is Action.REQUEUE:
            return self.ledger.set_queued_if_finished(delivery_id)
        return True

    def _fresh_plan(self, letter: DeadLetter) -> Action:
        """`_plan`, unless the delivery's validity end has passed: republished, it would only
        be skipped. Asked only of what would be republished (a sent row's letter is acked as
        before, a live lease's left)."""
        action = self._plan(letter.delivery_id)
        if action.republishes and self.ledger.validity_ended(letter.delivery_id, letter.not_after):
            return Action.SKIP_EXPIRED
        return action

    def _decide(self, letter: DeadLetter) -> Action | None:
        if letter.delivery_id is None:
            return self._fresh_plan(letter)
        for _ in range(MAX_DECISIONS):
            action = self._fresh_plan(letter)
            if self._apply(letter.delivery_id, action):
                return action
        return None

    # --- acting -----------------------------------------------------------------------------

    def _dry(self, letter: DeadLetter) -> Item:
        self._hold(letter)  # a dry run acks nothing
        action = self._fresh_plan(letter)
        if action is Action.SKIP_EXPIRED:
            self.summary.expired += 1
            return Item(letter, action, ItemResult.EXPIRED)
        if action.republishes:
            self._count_replayed(letter)
            return Item(letter, action, ItemResult.WOULD_REPLAY)
        self.summary.skipped += 1
        return Item(letter, action, ItemResult.SKIPPED)

    def _live(self, letter: DeadLetter) -> Item | None:
        """The item, or None when the letter waits for the batch's republish."""
        action = self._decide(letter)
        if action is None:
            self._hold(letter)
            self.summary.failed += 1
            return Item(letter, None, ItemResult.FAILED, "the ledger row kept changing; try again")
        if action.republishes:
            self.pending.append((letter, action))
            if letter.delivery_id is not None:  # a second copy in this run is a duplicate
                self.replayed_ids.add(letter.delivery_id)
            return None
        if action is Action.SKIP_EXPIRED:
            return self._expired(letter)
        if action is Action.SKIP_IN_PROGRESS:
            self._hold(letter)
        else:
            self._ack(letter)
        self.summary.skipped += 1
        return Item(letter, action, ItemResult.SKIPPED)

    def _expired(self, letter: DeadLetter) -> Item:
        """Never republished; gone only when the operator asked (`drop_expired`)."""
        self.summary.expired += 1
        if self.options.drop_expired:
            self._ack(letter)
            return Item(letter, Action.SKIP_EXPIRED, ItemResult.EXPIRED, "dropped (acked)")
        self._hold(letter)
        return Item(
            letter, Action.SKIP_EXPIRED, ItemResult.EXPIRED, "left (--drop-expired acks it)"
        )

    def _republish_pending(self) -> list[Item]:
        """Republish the batch's decided letters at once (one confirmation wait, not one per
        message), then ack every confirmed one in a single call."""
        pending, self.pending = self.pending, []
        if not pending:
            return []
        results = list(self.publishers.map(lambda entry: self._publish(entry[0]), pending))
        confirmed = [
            letter
            for (letter, _), result in zip(pending, results, strict=True)
            if not isinstance(result, worker_pubsub.PublishError)
        ]
        if confirmed:
            self.sub.ack([letter.ack_id for letter in confirmed])
            self.acked.update(letter.message_id for letter in confirmed)
        items = []
        for (letter, action), result in zip(pending, results, strict=True):
            if isinstance(result, worker_pubsub.PublishError):
                # Released (nacked) at the end, not now: this run would only pull it again.
                # A requeued row waits in `queued`, which the next run republishes.
                self._hold(letter)
                self.summary.failed += 1
                items.append(Item(letter, action, ItemResult.FAILED, str(result)))
            else:
                self._count_replayed(letter)
                self.republished.add(result)
                self.replayed_letters.add(letter.message_id)
                items.append(Item(letter, action, ItemResult.REPLAYED, f"as message {result}"))
        return items

    def _publish(self, letter: DeadLetter) -> str | worker_pubsub.PublishError:
        assert self.settings.delivery_topic is not None  # checked by replay()
        try:
            return worker_pubsub.publish(
                self.settings.topic_path(self.settings.delivery_topic),
                letter.data,
                letter.republish_attributes(),
                timeout=self.settings.publish_timeout_seconds,
            )
        except worker_pubsub.PublishError as error:
            return error

    def _count_replayed(self, letter: DeadLetter) -> None:
        self.summary.replayed += 1
        if letter.delivery_id is not None:
            self.replayed_ids.add(letter.delivery_id)

    # --- leases -----------------------------------------------------------------------------

    def _ack(self, letter: DeadLetter) -> None:
        self.sub.ack([letter.ack_id])
        self.acked.add(letter.message_id)

    def _hold(self, letter: DeadLetter) -> None:
        """Keep it from this run (leased since its pull); released at the end."""
        self.held[letter.message_id] = letter.ack_id

    def _renew_held(self) -> None:
        if self.held and time.monotonic() - self.leased_at > HOLD_SECONDS / 2:
            self.sub.lease(list(self.held.values()), HOLD_SECONDS)
            self.leased_at = time.monotonic()

    def _release(self) -> None:
        if self.held:
            self.sub.lease(list(self.held.values()), 0)
            self.held.clear()
