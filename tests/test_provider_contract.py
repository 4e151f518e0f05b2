"""What every provider webhook adapter does, held by one suite over the provider table.

Each case runs for every row of worker/core/providers.py PROVIDERS, through the webhook an
instance builds from its settings (`webhook.parse` and `webhook.build`: every adapter, the
shared token ledger, a real PostgreSQL `Tracking`), called in-process; how a request for each
provider is made is its driver's business (tests/provider_drivers.py). A provider added to the
table fails here until it has a driver. What is particular to one provider stays in its own
file (tests/test_provider_<name>.py, tests/test_webhook_ses.py); the HTTP layer in front,
functions-framework and main.py, is held by tests/test_webhook.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.harness.https import SnsTestServer
from tests.harness.webhook import (
    Database,
    ProviderKeys,
    connected,
    count_provider_events,
    delivery,
    new_id,
    now_unix,
    provider_events,
    seed_delivery,
)
from tests.provider_drivers import DRIVER_TYPES, Driver, Email, Signed, Timestamped, make_drivers
from worker.core.providers import BY_NAME, PROVIDERS
from worker.providers import webhook
from worker.providers.webhook import Answer, Webhook

NAMES = [provider.name for provider in PROVIDERS]
# The providers whose scheme signs a time; the others declare none (SNS keeps a message's
# Timestamp across days of retries, Postmark signs nothing).
TIMESTAMPED = [name for name in NAMES if issubclass(DRIVER_TYPES.get(name, Driver), Timestamped)]
# The providers whose bodies the webhook holds below its own ceiling.
CAPPED = [name for name in NAMES if DRIVER_TYPES.get(name, Driver).body_cap is not None]


@pytest.fixture(scope="module")
def drivers(provider_keys: ProviderKeys, sns_https: SnsTestServer) -> dict[str, Driver]:
    return make_drivers(provider_keys, sns_https)


@pytest.fixture
def driver(drivers: dict[str, Driver], name: str) -> Driver:
    assert name in drivers, f"{name} is in PROVIDERS: give it a driver in provider_drivers.py"
    return drivers[name]


@pytest.fixture(scope="module")
def db(webhook_db: str) -> Iterator[psycopg.Connection[Any]]:
    """One connection for the tests' own looks at the database (cheaper than one per look)."""
    with psycopg.connect(webhook_db, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="module")
def hook(webhook_db: str, drivers: dict[str, Driver]) -> Iterator[Webhook]:
    """The webhook of an instance whose settings are every driver's."""
    env = {"DATABASE_URL": webhook_db}
    for each in drivers.values():
        env |= each.env()
    config = webhook.parse(env)
    try:
        yield webhook.build(config)
    finally:
        if config.pool.value is not None:
            config.pool.value.close()


def send(hook: Webhook, driver: Driver, request: Signed) -> Answer:
    url = f"https://hooks.example.com/webhooks/{driver.name}"
    return hook.handle(
        "POST", webhook.request_from(driver.name, url, request.headers, request.body)
    )


def sent(db: Database, name: str, owner: str = "ada") -> Email:
    """A delivery the worker sent, in the ledger, to an address of its own (a bounce
    suppresses it)."""
    delivery_id = new_id(name)
    email = Email(delivery_id, f"{owner}+{delivery_id}@example.com")
    seed_delivery(db, delivery_id, recipient=email.recipient)
    return email


def suppressed(db: Database, address: str) -> bool:
    with connected(db) as conn:
        row = conn.execute(
            "SELECT count(*) FROM email.suppressions WHERE address = %s", (address,)
        ).fetchone()
    return row == (1,)


def test_every_provider_has_a_driver_and_one_instance_serves_them_all(
    hook: Webhook, drivers: dict[str, Driver]
) -> None:
    assert sorted(DRIVER_TYPES) == sorted(drivers) == sorted(NAMES)
    assert sorted(hook.adapters) == sorted(NAMES)
    for name, each in drivers.items():
        # A driver sets only its provider's settings (the deploy mounts the same ones).
        provider = BY_NAME[name]
        assert set(each.env()) <= {*provider.secrets, *provider.settings}, name


# --- authenticity ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_a_signed_event_is_applied(
    hook: Webhook, db: psycopg.Connection[Any], driver: Driver
) -> None:
    email = sent(db, driver.name)

    answer = send(hook, driver, driver.sign(driver.delivered(email)))

    assert answer.status == 200, answer
    assert answer.body["applied"] == 1, answer
    [row] = provider_events(db, driver.name, delivery_id=email.delivery_id)
    assert row["event_type"] == "delivered" and row["tagged_delivery_id"] == email.delivery_id
    assert delivery(db, email.delivery_id)["provider_status"] == "delivered"


@pytest.mark.parametrize("name", NAMES)
def test_a_forged_signature_is_refused_and_stores_nothing(
    hook: Webhook, db: psycopg.Connection[Any], driver: Driver
) -> None:
    email = sent(db, driver.name)
    before = count_provider_events(db)

    answer = send(hook, driver, driver.forge(driver.bounced(email)))

    assert answer.status == driver.forged_status, answer
    assert count_provider_events(db) == before
    assert delivery(db, email.delivery_id)["provider_status"] is None
    assert not suppressed(db, email.recipient)


@pytest.mark.parametrize("name", TIMESTAMPED)
@pytest.mark.parametrize("offset", [-301, 301], ids=["stale", "future"])
def test_a_signature_outside_the_five_minute_window_is_refused(
    hook: Webhook, db: psycopg.Connection[Any], driver: Driver, offset: int
) -> None:
    assert isinstance(driver, Timestamped)
    email = sent(db, driver.name)
    content = driver.delivered(email)
    before = count_provider_events(db)

    answer = send(hook, driver, driver.signed_at(content, now_unix() + offset))

    assert answer.status == 403, answer
    assert count_provider_events(db) == before
    assert delivery(db, email.delivery_id)["provider_status"] is None
    # The control: the same content signed now is taken.
    assert send(hook, driver, driver.signed_at(content, now_unix())).status == 200


def test_the_providers_declaring_no_window_or_no_cap_are_the_expected_ones() -> None:
    """SNS keeps a message's Timestamp across its retries (days), Postmark signs nothing:
    neither has a window, every other provider has one. Mailgun's and SNS's bodies are
    parsed before they are verified: held to what the provider sends."""
    assert sorted(set(NAMES) - set(TIMESTAMPED)) == ["postmark", "ses"]
    assert sorted(CAPPED) == ["mailgun", "ses"]


@pytest.mark.parametrize("name", NAMES)
def test_a_request_without_its_signature_is_401_and_stores_nothing(
    hook: Webhook, db: psycopg.Connection[Any], driver: Driver
) -> None:
    email = sent(db, driver.name)
    before = count_provider_events(db)

    answer = send(hook, driver, driver.strip(driver.delivered(email)))

    assert answer.status == 401, answer
    assert count_provider_events(db) == before
    assert delivery(db, email.delivery_id)["provider_status"] is None


# --- the body -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_an_authentic_malformed_body_is_400_and_stores_nothing(
    hook: Webhook, db: psycopg.Connection[Any], driver: Driver
) -> None:
    before = count_provider_events(db)
    cases = driver.malformed()

    answers = {case: send(hook, driver, driver.sign(content)) for case, content in cases.items()}

    assert cases
    assert {case: answer.status for case, answer in answers.items()} == dict.fromkeys(cases, 400)
    assert count_provider_events(db) == before


HOSTILE = {
    "nested 100000 deep": b"[" * 100_000 + b"]" * 100_000,
    "a number of a million digits": b"1" + b"0" * 999_999,
    "a number of 100000 digits": b"1" + b"0" * 99_999,
}


def hostile_status(driver: Driver, request: Signed) -> int:
    """413 where the body is larger than the provider sends; else 401 where the content hides
    the signature (Mailgun), 400 where the signature holds and the content cannot be read."""
    if driver.body_cap is not None and len(request.body) > driver.body_cap:
        return 413
    return 401 if driver.unreadable_content_is_unsigned else 400


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", list(HOSTILE))
def test_signed_content_too_deep_or_too_long_to_read_is_a_4xx(
    hook: Webhook, db: psycopg.Connection[Any], driver: Driver, kind: str
) -> None:
    request = driver.sign(HOSTILE[kind])
    before = count_provider_events(db)

    answer = send(hook, driver, request)  # a 500 would be an exception here

    assert answer.status == hostile_status(driver, request), answer
    assert count_provider_events(db) == before


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", list(HOSTILE))
def test_an_unsigned_body_too_deep_or_too_long_to_read_is_refused(
    hook: Webhook, db: psycopg.Connection[Any], driver: Driver, kind: str
) -> None:
    """No signature and no JSON to find one in: Mailgun's and SNS's bodies are parsed before
    they can be verified, and must not fail there otherwise than as not authentic."""
    request = Signed(HOSTILE[kind], {})
    over_cap = driver.body_cap is not None and len(request.body) > driver.body_cap
    before = count_provider_events(db)

    answer = send(hook, driver, request)

    assert answer.status == (413 if over_cap else 401), answer
    assert count_provider_events(db) == before


@pytest.mark.parametrize("name", CAPPED)
def test_no_body_larger_than_the_provider_sends_is_read(hook: Webhook, driver: Driver) -> None:
    """Where the body is parsed before it is verified, no larger than the provider sends."""
    assert driver.body_cap is not None
    at_cap = send(hook, driver, Signed(b" " * driver.body_cap, {}))
    over = send(hook, driver, Signed(b" " * (driver.body_cap + 1), {}))

    assert at_cap.status == 401, at_cap  # read, and not a signed request
    assert over.status == 413, over


VICTIM = "victim" + "x" * 282 + "@example.com"  # 300 characters: longer than any address


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["delivered", "bounced"])
@pytest.mark.parametrize(
    "recipient",
    [VICTIM, "victim\x00@example.com", "victim\ud800@example.com"],
    ids=["300 characters", "NUL", "lone surrogate"],
)
def test_an_address_the_ledger_cannot_store_is_400_and_never_logged(
    hook: Webhook,
    db: psycopg.Connection[Any],
    driver: Driver,
    kind: str,
    recipient: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    email = sent(db, driver.name)
    named = Email(email.delivery_id, recipient)
    content = driver.delivered(named) if kind == "delivered" else driver.bounced(named)
    before = count_provider_events(db)
    capsys.readouterr()

    answer = send(hook, driver, driver.sign(content))

    assert answer.status == 400, answer
    assert count_provider_events(db) == before
    assert delivery(db, email.delivery_id)["provider_status"] is None
    logged = capsys.readouterr().out
    assert "provider request refused" in logged  # the log is real
    assert "victim" not in logged


# --- what is stored, and what it acts on --------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_the_same_event_twice_is_stored_once_and_applied_once(
    hook: Webhook, db: psycopg.Connection[Any], driver: Driver
) -> None:
    email = sent(db, driver.name)
    content = driver.bounced(email)

    first = send(hook, driver, driver.sign(content))
    again = send(hook, driver, driver.sign(content))  # the provider's retry

    assert first.status == again.status == 200, (first, again)
    assert (first.body["applied"], first.body["duplicate"]) == (1, 0)
    assert (again.body["applied"], again.body["duplicate"]) == (0, 1)
    assert len(provider_events(db, driver.name, delivery_id=email.delivery_id)) == 1
    row = delivery(db, email.delivery_id)
    assert (row["provider_status"], row["bounce_type"]) == ("bounced", "hard")


@pytest.mark.parametrize("name", NAMES)
def test_an_event_for_no_known_delivery_is_kept_unmatched_and_answered_200(
    hook: Webhook, db: psycopg.Connection[Any], driver: Driver
) -> None:
    nobody = Email(new_id("nobody"))  # no such delivery, Message-ID or relay id

    answer = send(hook, driver, driver.sign(driver.delivered(nobody)))

    assert answer.status == 200, answer
    assert answer.body["unmatched"] == 1, answer
    [row] = provider_events(db, driver.name, tagged_delivery_id=nobody.delivery_id)
    assert row["delivery_id"] is None


@pytest.mark.parametrize("name", NAMES)
def test_a_signed_bounce_naming_someone_elses_delivery_is_kept_unmatched(
    hook: Webhook, db: psycopg.Connection[Any], driver: Driver
) -> None:
    """Every key of the event names the delivery (its id, its Message-ID): its recipient
    does not. A signed event acts only on a delivery to the address it names."""
    email = sent(db, driver.name, owner="Owner")
    other = Email(email.delivery_id, f"else+{email.delivery_id}@example.com")

    answer = send(hook, driver, driver.sign(driver.bounced(other)))

    assert (answer.status, answer.body["unmatched"]) == (200, 1), answer
    assert delivery(db, email.delivery_id)["provider_status"] is None
    assert not suppressed(db, email.recipient.lower())
    assert not suppressed(db, other.recipient)
    # The control: the owner's address, in other case, is the same address.
    owner = Email(email.delivery_id, email.recipient.upper())
    assert send(hook, driver, driver.sign(driver.bounced(owner))).body["applied"] == 1
    assert delivery(db, email.delivery_id)["provider_status"] == "bounced"
    assert suppressed(db, email.recipient.lower())
