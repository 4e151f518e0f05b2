"""The SES adapter (worker/providers/ses.py) over real SNS signatures (worker/providers/sns.py).

Messages are signed with an RSA key made by the test, whose certificate (issued by a test CA)
is served over HTTPS on 127.0.0.1 (tests/harness/https.py); the signing helper is checked
against AWS's documented string-to-sign examples and the `openssl` command line tool.
The HTTP layer (functions-framework, status codes, the ledger) is tested with main.py.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import json
import subprocess
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.hazmat.primitives import serialization

from tests.harness.https import SnsSigner, SnsTestServer, sns_string_to_sign
from worker.core.settings import SettingsError
from worker.providers.common import user_agent_class
from worker.providers.model import Batch, Malformed, Refused, WebhookRequest
from worker.providers.ses import SesAdapter, from_env
from worker.providers.sns import (
    HostPattern,
    MessageType,
    SnsVerifier,
    Unavailable,
    parse_host_patterns,
    string_to_sign,
)
from worker.store.ledger import Ledger
from worker.store.tracking import Applied, EventType, Tracking

FIXTURES = Path(__file__).parent / "fixtures" / "providers" / "ses"
TOPIC = "arn:aws:sns:us-east-1:123456789012:ses-events"
RESET_LINK = "https://app.example.com/reset?token=s3cr3t-reset-token-0123456789"


def fixture(name: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    assert record.pop("_source").startswith("https://docs.aws.amazon.com/ses/")
    return record


def notification(record: Mapping[str, Any], **fields: str) -> dict[str, str]:
    """An unsigned SNS Notification envelope carrying `record` as its Message."""
    return {
        "Type": "Notification",
        "MessageId": fields.pop("MessageId", str(uuid.uuid4())),
        "TopicArn": fields.pop("TopicArn", TOPIC),
        "Message": json.dumps(record),
        "Timestamp": fields.pop("Timestamp", "2026-11-23T10:00:00.000Z"),
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
        **fields,
    }


def request(envelope: Mapping[str, str]) -> WebhookRequest:
    return WebhookRequest(
        provider="ses",
        url="https://region-project.cloudfunctions.net/provider-events/ses",
        headers={
            "content-type": "text/plain; charset=UTF-8",
            "x-amz-sns-message-type": envelope.get("Type", ""),
        },
        body=json.dumps(envelope).encode(),
    )


@pytest.fixture
def settings(sns_https: SnsTestServer) -> dict[str, str]:
    return sns_https.settings(TOPIC)


@pytest.fixture
def adapter(settings: dict[str, str]) -> SesAdapter:
    """A fresh adapter per test: its certificate cache starts empty."""
    built = from_env(settings.get)
    assert built is not None
    return built


@pytest.fixture
def signer(sns_https: SnsTestServer) -> SnsSigner:
    return sns_https.signer


def events_of(adapter: SesAdapter, envelope: Mapping[str, str]) -> Batch:
    req = request(envelope)
    adapter.authenticate(req)
    return adapter.events(req)


# --- the signature scheme, checked against sources other than our own code ------------------

# The two "string to sign" examples of
# https://docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message.html, verbatim.
DOC_TOPIC = "arn:aws:sns:us-east-2:123456789012:s4-MySNSTopic-1G1WEFCOXTC0P"
DOC_NOTIFICATION = {
    "Type": "Notification",
    "Message": "My Test Message",
    "MessageId": "4d4dc071-ddbf-465d-bba8-08f81c89da64",
    "Subject": "My subject",
    "Timestamp": "2019-01-31T04:37:04.321Z",
    "TopicArn": DOC_TOPIC,
}
DOC_NOTIFICATION_STRING = (
    "Message\nMy Test Message\n"
    "MessageId\n4d4dc071-ddbf-465d-bba8-08f81c89da64\n"
    "Subject\nMy subject\n"
    "Timestamp\n2019-01-31T04:37:04.321Z\n"
    f"TopicArn\n{DOC_TOPIC}\n"
    "Type\nNotification\n"
)
DOC_CONFIRMATION = {
    "Type": "SubscriptionConfirmation",
    "Message": "My Test Message",
    "MessageId": "3d891288-136d-417f-bc05-901c108273ee",
    "SubscribeURL": "https://sns.us-east-2.amazonaws.com/?Action=ConfirmSubscription"
    f"&TopicArn={DOC_TOPIC}&Token=233...",
    "Timestamp": "2019-01-31T19:25:13.719Z",
    "Token": "233...",
    "TopicArn": DOC_TOPIC,
}
DOC_CONFIRMATION_STRING = (
    "Message\nMy Test Message\n"
    "MessageId\n3d891288-136d-417f-bc05-901c108273ee\n"
    f"SubscribeURL\n{DOC_CONFIRMATION['SubscribeURL']}\n"
    "Timestamp\n2019-01-31T19:25:13.719Z\n"
    "Token\n233...\n"
    f"TopicArn\n{DOC_TOPIC}\n"
    "Type\nSubscriptionConfirmation\n"
)


def test_string_to_sign_is_the_documented_one() -> None:
    notification_bytes = DOC_NOTIFICATION_STRING.encode()
    confirmation_bytes = DOC_CONFIRMATION_STRING.encode()
    assert string_to_sign(MessageType.NOTIFICATION, DOC_NOTIFICATION) == notification_bytes
    assert sns_string_to_sign(DOC_NOTIFICATION) == notification_bytes
    assert (
        string_to_sign(MessageType.SUBSCRIPTION_CONFIRMATION, DOC_CONFIRMATION)
        == confirmation_bytes
    )
    assert sns_string_to_sign(DOC_CONFIRMATION) == confirmation_bytes
    # Without a Subject the pair is left out entirely.
    without = {k: v for k, v in DOC_NOTIFICATION.items() if k != "Subject"}
    assert b"Subject" not in string_to_sign(MessageType.NOTIFICATION, without)


def _openssl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["openssl", *args], capture_output=True, check=False, timeout=30)


@pytest.mark.parametrize(("version", "digest"), [("1", "-sha1"), ("2", "-sha256")])
def test_signer_and_verifier_agree_with_openssl(
    version: str, digest: str, sns_https: SnsTestServer, tmp_path: Path
) -> None:
    """Our test signer's signatures verify with `openssl dgst -verify`, and a signature made
    by `openssl dgst -sign` over AWS's literal example string passes the adapter."""
    signer = sns_https.signer
    public = tmp_path / "public.pem"
    public.write_bytes(
        signer.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    data = tmp_path / "string-to-sign"
    data.write_bytes(DOC_NOTIFICATION_STRING.encode())
    ours = tmp_path / "ours.sig"
    ours.write_bytes(base64.b64decode(signer.sign(DOC_NOTIFICATION, version)["Signature"]))
    verified = _openssl("dgst", digest, "-verify", str(public), "-signature", str(ours), str(data))
    assert verified.returncode == 0, verified.stderr
    assert b"Verified OK" in verified.stdout

    theirs = tmp_path / "theirs.sig"
    key = sns_https.directory / "signing-key.pem"
    made = _openssl("dgst", digest, "-sign", str(key), "-out", str(theirs), str(data))
    assert made.returncode == 0, made.stderr
    envelope = {
        **DOC_NOTIFICATION,
        "SignatureVersion": version,
        "Signature": base64.b64encode(theirs.read_bytes()).decode(),
        "SigningCertURL": signer.cert_url,
    }
    settings = sns_https.settings(DOC_TOPIC)
    adapter = from_env(settings.get)
    assert adapter is not None
    adapter.authenticate(request(envelope))
    # The same bytes with one character changed no longer verify.
    tampered = {**envelope, "Message": "My Test Message!"}
    with pytest.raises(Refused) as refused:
        adapter.authenticate(request(tampered))
    assert refused.value.status == 403


# --- every SES record type -----------------------------------------------------------------

SES_ID = "EXAMPLE7c191be45-e9aedb9a-02f9-4d12-a87d-dd0099a07f8a-000000"


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize(
    ("name", "event_type", "recipients", "bounce_type", "occurred_at"),
    [
        (
            "event-delivery",
            EventType.DELIVERED,
            ["recipient@example.com"],
            None,
            "2016-10-19T23:21:04.133",
        ),
        (
            "event-open",
            EventType.OPENED,
            ["recipient@example.com"],
            None,
            "2017-08-09T22:00:19.652",
        ),
        (
            "event-click",
            EventType.CLICKED,
            ["recipient@example.com"],
            None,
            "2017-08-09T23:51:25.570",
        ),
        (
            "event-bounce",
            EventType.BOUNCED,
            ["recipient@example.com"],
            "hard",
            "2017-08-05T00:41:02.669",
        ),
        (
            "event-complaint",
            EventType.COMPLAINED,
            ["recipient@example.com"],
            None,
            "2017-08-05T00:41:02.669",
        ),
        (
            "event-delivery-delay",
            EventType.DEFERRED,
            ["recipient@example.com"],
            None,
            "2020-06-16T00:25:40.095",
        ),
        (
            "event-reject",
            EventType.BOUNCED,
            ["sender@example.com"],
            "hard",
            "2016-10-14T17:38:15.211",
        ),
        (
            "notification-delivery",
            EventType.DELIVERED,
            ["jane@example.com"],
            None,
            "2016-01-27T14:59:38.237",
        ),
        (
            "notification-bounce-dsn",
            EventType.BOUNCED,
            ["jane@example.com"],
            "hard",
            "2016-01-27T14:59:38.237",
        ),
        (
            "notification-complaint",
            EventType.COMPLAINED,
            ["richard@example.com"],
            None,
            "2016-01-27T14:59:38.237",
        ),
    ],
)
def test_each_documented_record_yields_its_event(
    adapter: SesAdapter,
    signer: SnsSigner,
    version: str,
    name: str,
    event_type: EventType,
    recipients: list[str],
    bounce_type: str | None,
    occurred_at: str,
) -> None:
    record = fixture(name)
    envelope = signer.sign(notification(record, MessageId="sns-1"), version)
    batch = events_of(adapter, envelope)
    assert batch.rejected == ()
    assert [e.recipient for e in batch.events] == recipients
    mail_id = record["mail"]["messageId"]
    for event in batch.events:
        assert event.provider == "ses"
        assert event.event_type is event_type
        assert event.bounce_type == bounce_type
        assert event.occurred_at == dt.datetime.fromisoformat(occurred_at).replace(tzinfo=dt.UTC)
        assert event.relay_message_id == mail_id
        assert event.provider_event_id.startswith("sns-1:")
        assert event.detail["provider_message_id"] == mail_id
        assert event.detail["event"] == record.get("eventType", record.get("notificationType"))


@pytest.mark.parametrize("name", ["event-send", "event-rendering-failure", "event-subscription"])
def test_records_outside_the_six_types_are_acknowledged_with_no_event(
    adapter: SesAdapter, signer: SnsSigner, name: str
) -> None:
    assert events_of(adapter, signer.sign(notification(fixture(name)))) == Batch(())


def test_bounce_detail_keeps_what_support_needs_sanitised(
    adapter: SesAdapter, signer: SnsSigner
) -> None:
    (event,) = events_of(
        adapter, signer.sign(notification(fixture("notification-bounce-dsn")))
    ).events
    assert dict(event.detail) == {
        "event": "Bounce",
        "provider_message_id": "00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa0680-000000",
        "type": "Permanent",
        "sub_type": "General",
        "feedback_id": "00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa068a-000000",
        "status": "5.1.1",
        # The address inside the diagnostic code is masked like every log value.
        "diagnostic": "smtp; 550 5.1.1 <j***@example.com>... User",
    }


@pytest.mark.parametrize(
    ("bounce_type", "sub_type"), [("Transient", "MailboxFull"), ("Undetermined", "Undetermined")]
)
def test_transient_and_undetermined_bounces_are_soft_and_deferred(
    adapter: SesAdapter, signer: SnsSigner, bounce_type: str, sub_type: str
) -> None:
    record = fixture("event-bounce")
    record["bounce"].update(bounceType=bounce_type, bounceSubType=sub_type)
    (event,) = events_of(adapter, signer.sign(notification(record))).events
    assert event.event_type is EventType.DEFERRED
    assert event.bounce_type == "soft"
    assert event.detail["type"] == bounce_type


def test_complaint_and_delay_detail(adapter: SesAdapter, signer: SnsSigner) -> None:
    (complaint,) = events_of(adapter, signer.sign(notification(fixture("event-complaint")))).events
    assert complaint.detail["feedback_type"] == "abuse"
    assert "user_agent" not in json.dumps(dict(complaint.detail))
    (delay,) = events_of(adapter, signer.sign(notification(fixture("event-delivery-delay")))).events
    assert delay.detail["type"] == "TransientCommunicationFailure"
    assert delay.detail["status"] == "4.4.1"


def test_open_keeps_only_a_user_agent_class(adapter: SesAdapter, signer: SnsSigner) -> None:
    record = fixture("event-open")
    (event,) = events_of(adapter, signer.sign(notification(record))).events
    assert event.detail["user_agent_class"] == "mobile"
    kept = repr(event)
    assert record["open"]["userAgent"] not in kept
    assert record["open"]["ipAddress"] not in kept


def test_a_clicked_link_appears_nowhere_in_the_event(
    adapter: SesAdapter, signer: SnsSigner
) -> None:
    record = fixture("event-click")
    record["click"]["link"] = RESET_LINK
    record["click"]["linkTags"] = {"workflow": ["password-reset"], "token": ["s3cr3t-reset-token"]}
    (event,) = events_of(adapter, signer.sign(notification(record))).events
    assert event.event_type is EventType.CLICKED
    kept = repr(event) + json.dumps(dict(event.detail))
    for secret in (
        RESET_LINK,
        "s3cr3t",
        "reset?token",
        "app.example.com",
        "password-reset",
        "linkTags",
    ):
        assert secret not in kept
    assert event.detail == {
        "event": "Click",
        "provider_message_id": SES_ID,
        "user_agent_class": "desktop",
    }


# --- matching keys ---------------------------------------------------------------------------


def test_event_publishing_matches_by_the_delivery_id_tag_and_message_id(
    adapter: SesAdapter, signer: SnsSigner
) -> None:
    record = fixture("event-delivery")
    record["mail"]["tags"]["delivery_id"] = ["inv_2f6c9d1e"]
    record["mail"]["commonHeaders"]["messageId"] = "<inv_2f6c9d1e@mail.example.com>"
    (event,) = events_of(adapter, signer.sign(notification(record))).events
    assert event.delivery_id == "inv_2f6c9d1e"
    assert event.message_id == "<inv_2f6c9d1e@mail.example.com>"
    assert event.relay_message_id == SES_ID


def test_notifications_fall_back_to_the_original_headers(
    adapter: SesAdapter, signer: SnsSigner
) -> None:
    """Identity notifications carry no tags; with original headers on, the worker's
    X-SES-MESSAGE-TAGS and Message-ID headers are there."""
    record = fixture("notification-delivery")
    del record["mail"]["commonHeaders"]
    record["mail"]["headers"] += [
        {"name": "X-SES-MESSAGE-TAGS", "value": "workflow=invite, delivery_id=inv_2f6c9d1e"},
    ]
    (event,) = events_of(adapter, signer.sign(notification(record))).events
    assert event.delivery_id == "inv_2f6c9d1e"
    # The documented header value has no angle brackets: normalised to the worker's form.
    assert event.message_id == "<custom-message-ID>"


def test_without_headers_only_the_relay_id_matches(adapter: SesAdapter, signer: SnsSigner) -> None:
    record = fixture("notification-bounce-no-dsn")
    events = events_of(adapter, signer.sign(notification(record))).events
    assert {(e.delivery_id, e.message_id) for e in events} == {(None, None)}
    assert {e.relay_message_id for e in events} == {record["mail"]["messageId"]}


def test_a_multi_recipient_bounce_is_one_event_each_with_stable_ids(
    adapter: SesAdapter, signer: SnsSigner
) -> None:
    envelope = notification(fixture("notification-bounce-no-dsn"), MessageId="sns-multi")
    first = events_of(adapter, signer.sign(envelope)).events
    assert [e.recipient for e in first] == ["jane@example.com", "richard@example.com"]
    assert len({e.provider_event_id for e in first}) == 2
    # SNS retries keep the MessageId (and here a different signature version): same ids.
    retry = events_of(adapter, signer.sign(envelope, "1")).events
    assert [e.provider_event_id for e in retry] == [e.provider_event_id for e in first]
    # A different SNS message about the same recipients is a different event.
    other = events_of(adapter, signer.sign({**envelope, "MessageId": "sns-other"})).events
    assert not {e.provider_event_id for e in other} & {e.provider_event_id for e in first}


def test_sns_messages_are_not_aged_out(adapter: SesAdapter, signer: SnsSigner) -> None:
    """SNS keeps the original Timestamp across retries (up to days): still accepted."""
    envelope = notification(fixture("event-delivery"), Timestamp="2012-04-25T21:49:25.719Z")
    assert len(events_of(adapter, signer.sign(envelope)).events) == 1


def test_a_subject_is_signed_when_present(adapter: SesAdapter, signer: SnsSigner) -> None:
    envelope = signer.sign(
        notification(fixture("event-delivery"), Subject="Amazon SES Email Event")
    )
    assert len(events_of(adapter, envelope).events) == 1
    with pytest.raises(Refused):
        adapter.authenticate(request({**envelope, "Subject": "Something else"}))


# --- refusals: nothing is read past them, and forged requests fetch nothing ---------------------


def _refused(adapter: SesAdapter, envelope: Mapping[str, Any]) -> Refused:
    with pytest.raises(Refused) as authenticate:
        adapter.authenticate(request(envelope))
    with pytest.raises(Refused) as events:
        adapter.events(request(envelope))
    assert authenticate.value.status == events.value.status
    return authenticate.value


def _signed(signer: SnsSigner, **fields: str) -> dict[str, str]:
    return signer.sign(notification(fixture("event-delivery"), **fields))


Mutation = Callable[[dict[str, str], SnsTestServer], None]


def _wrong_signature(envelope: dict[str, str], server: SnsTestServer) -> None:
    envelope["Signature"] = base64.b64encode(b"\x01" * 256).decode()


def _not_base64(envelope: dict[str, str], server: SnsTestServer) -> None:
    envelope["Signature"] = "not base64!"


def _tampered_message(envelope: dict[str, str], server: SnsTestServer) -> None:
    envelope["Message"] = envelope["Message"].replace("recipient@", "someone@")


def _unknown_topic(envelope: dict[str, str], server: SnsTestServer) -> None:
    envelope["TopicArn"] = "arn:aws:sns:us-east-1:123456789012:someone-elses-topic"


def _foreign_host(envelope: dict[str, str], server: SnsTestServer) -> None:
    envelope["SigningCertURL"] = "https://sns.us-east-1.amazonaws.com.evil.example/cert.pem"


def _other_port(envelope: dict[str, str], server: SnsTestServer) -> None:
    envelope["SigningCertURL"] = envelope["SigningCertURL"].replace(
        f":{server.server.port}/", f":{server.server.port + 1}/"
    )


def _plain_http(envelope: dict[str, str], server: SnsTestServer) -> None:
    envelope["SigningCertURL"] = envelope["SigningCertURL"].replace("https://", "http://")


def _credentials_in_url(envelope: dict[str, str], server: SnsTestServer) -> None:
    envelope["SigningCertURL"] = envelope["SigningCertURL"].replace("https://", "https://u:p@")


def _not_pem(envelope: dict[str, str], server: SnsTestServer) -> None:
    envelope["SigningCertURL"] = server.server.url("/cert.txt")


def _unknown_version(envelope: dict[str, str], server: SnsTestServer) -> None:
    envelope["SignatureVersion"] = "3"


def _missing_message_id(envelope: dict[str, str], server: SnsTestServer) -> None:
    del envelope["MessageId"]


def _unknown_type(envelope: dict[str, str], server: SnsTestServer) -> None:
    envelope["Type"] = "Announcement"


@pytest.mark.parametrize(
    ("mutate", "status"),
    [
        (_wrong_signature, 403),
        (_not_base64, 403),
        (_tampered_message, 403),
        (_unknown_topic, 403),
        (_foreign_host, 403),
        (_other_port, 403),
        (_plain_http, 403),
        (_credentials_in_url, 403),
        (_not_pem, 403),
        (_unknown_version, 403),
        (_missing_message_id, 403),
        (_unknown_type, 403),
    ],
)
def test_a_message_that_does_not_hold_is_refused(
    adapter: SesAdapter, sns_https: SnsTestServer, mutate: Mutation, status: int
) -> None:
    envelope = _signed(sns_https.signer)
    mutate(envelope, sns_https)
    assert _refused(adapter, envelope).status == status


def test_a_correctly_signed_message_from_an_unknown_topic_is_refused(
    adapter: SesAdapter, signer: SnsSigner
) -> None:
    envelope = _signed(signer, TopicArn="arn:aws:sns:us-east-1:123456789012:someone-elses-topic")
    assert _refused(adapter, envelope).status == 403


def test_a_message_naming_no_certificate_is_401(adapter: SesAdapter, signer: SnsSigner) -> None:
    """No Signature at all, and a key other than the certificate's: the contract suite."""
    envelope = _signed(signer)
    del envelope["SigningCertURL"]
    assert _refused(adapter, envelope).status == 401


@pytest.mark.parametrize("body", [b"", b"not json", b"[]", b'"Notification"', b"\xff\xfe"])
def test_a_body_that_is_not_an_sns_message_is_401(adapter: SesAdapter, body: bytes) -> None:
    with pytest.raises(Refused) as refused:
        adapter.authenticate(WebhookRequest("ses", "https://x/ses", {}, body))
    assert refused.value.status == 401


def test_an_expired_or_not_yet_valid_certificate_is_refused(
    adapter: SesAdapter, sns_https: SnsTestServer
) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = sns_https.new_signer(
        valid_from=now - dt.timedelta(days=3),
        valid_until=now - dt.timedelta(days=1),
    )
    future = sns_https.new_signer(valid_from=now + dt.timedelta(days=1))
    for signer in (expired, future):
        assert _refused(adapter, signer.sign(notification(fixture("event-delivery")))).status == 403


def test_refused_requests_never_fetch_anything(
    adapter: SesAdapter, sns_https: SnsTestServer
) -> None:
    """Topic and host are checked before any network access."""
    decoy = sns_https.new_signer()
    for mutate in (_unknown_topic, _plain_http):
        envelope = decoy.sign(notification(fixture("event-delivery")))
        mutate(envelope, sns_https)
        _refused(adapter, envelope)
    assert sns_https.server.hits(decoy.cert_path) == []


def _cert_url_variants(signer: SnsSigner, server: SnsTestServer) -> dict[str, str]:
    """SigningCertURLs on the allowed host that are not SNS's form: each one would be
    another URL to fetch (and to cache) for every forged request."""
    url, path, root = signer.cert_url, signer.cert_path, server.server.url("")
    return {
        "query": url + "?bust=1",
        "another query": url + "?bust=2",
        "empty query": url + "?",
        "fragment": url + "#x",
        "user info": url.replace("https://", "https://u@"),
        "empty user info": url.replace("https://", "https://@"),
        "name not hex": root + "/SimpleNotificationService-notahexname.pem",
        "another file name": root + "/cert.pem",
        "in a directory": root + "/x" + path,
        "dot segment": root + "/x/.." + path,
        "encoded dot": url.removesuffix(".pem") + "%2Epem",
        "path parameters": url + ";x",
        "upper-case suffix": url.removesuffix(".pem") + ".PEM",
        "trailing slash": url + "/",
    }


@pytest.mark.parametrize(
    "variant",
    [
        "query",
        "another query",
        "empty query",
        "fragment",
        "user info",
        "empty user info",
        "name not hex",
        "another file name",
        "in a directory",
        "dot segment",
        "encoded dot",
        "path parameters",
        "upper-case suffix",
        "trailing slash",
    ],
)
def test_a_certificate_url_not_of_the_sns_form_is_refused_before_any_fetch(
    adapter: SesAdapter, sns_https: SnsTestServer, variant: str
) -> None:
    signer = sns_https.new_signer()
    # As SNS's own host would: the certificate's path with any query gets the certificate.
    sns_https.server.serve_prefix(signer.cert_path, sns_https.server.served(signer.cert_path))
    forged = signer.sign(notification(fixture("event-delivery")))
    _wrong_signature(forged, sns_https)
    before = len(sns_https.server.hits())

    refused = _refused(
        adapter, {**forged, "SigningCertURL": _cert_url_variants(signer, sns_https)[variant]}
    )

    assert refused.status == 403
    assert len(sns_https.server.hits()) == before
    # The counter sees fetches: the same forgery naming SNS's own form is fetched, once.
    assert _refused(adapter, forged).status == 403
    assert sns_https.server.hits(signer.cert_path) == [signer.cert_path]


def test_the_certificate_is_fetched_once_per_instance(
    adapter: SesAdapter, sns_https: SnsTestServer
) -> None:
    signer = sns_https.new_signer()
    for _ in range(3):
        events_of(adapter, signer.sign(notification(fixture("event-delivery"))))
    assert sns_https.server.hits(signer.cert_path) == [signer.cert_path]


def test_the_certificate_cache_is_bounded(sns_https: SnsTestServer) -> None:
    verifier = SnsVerifier(
        frozenset({TOPIC}),
        parse_host_patterns(sns_https.host_pattern),
        sns_https.ca_file,
        cache_size=2,
    )
    adapter = SesAdapter(verifier)
    signers = [sns_https.new_signer() for _ in range(3)]
    for signer in [*signers, signers[2], signers[0]]:  # the first was evicted by the third
        adapter.authenticate(request(signer.sign(notification(fixture("event-open")))))
    assert [len(sns_https.server.hits(s.cert_path)) for s in signers] == [2, 1, 1]


def test_an_unreachable_certificate_is_503_so_sns_retries(
    adapter: SesAdapter, sns_https: SnsTestServer
) -> None:
    signer = sns_https.new_signer()
    sns_https.server.serve(signer.cert_path, b"busy", status=503)
    with pytest.raises(Unavailable) as unavailable:
        adapter.authenticate(request(signer.sign(notification(fixture("event-delivery")))))
    assert unavailable.value.status == 503
    # A missing certificate (404) is no transient failure.
    sns_https.server.serve(signer.cert_path, b"gone", status=404)
    assert _refused(adapter, signer.sign(notification(fixture("event-delivery")))).status == 403


# --- subscription handshake ---------------------------------------------------------------------


def _confirmation(sns_https: SnsTestServer, kind: str, subscribe_url: str) -> dict[str, str]:
    return sns_https.signer.sign(
        {
            "Type": kind,
            "MessageId": str(uuid.uuid4()),
            "Token": "2336412f37fb687f5d51e6e241d09c805a5a57b30d712f794cc5f6a988666d9276",
            "TopicArn": TOPIC,
            "Message": f"You have chosen to subscribe to the topic {TOPIC}.\n"
            "To confirm the subscription, visit the SubscribeURL included in this message.",
            "SubscribeURL": subscribe_url,
            "Timestamp": "2026-11-23T10:00:00.000Z",
        }
    )


def test_a_subscription_confirmation_visits_subscribe_url_once(
    adapter: SesAdapter, sns_https: SnsTestServer
) -> None:
    token = uuid.uuid4().hex
    path = f"/?Action=ConfirmSubscription&TopicArn={TOPIC}&Token={token}"
    sns_https.server.serve(path, b"<ConfirmSubscriptionResponse/>")
    envelope = _confirmation(sns_https, "SubscriptionConfirmation", sns_https.server.url(path))
    adapter.authenticate(request(envelope))
    assert sns_https.server.hits(path) == []  # authenticating alone confirms nothing
    assert adapter.events(request(envelope)) == Batch(())
    assert sns_https.server.hits(path) == [path]


def test_a_subscribe_url_on_a_foreign_host_is_refused(
    adapter: SesAdapter, sns_https: SnsTestServer
) -> None:
    """The signature holds, but we never visit a foreign host: refused at authentication."""
    for url in (
        "https://sns.us-east-1.amazonaws.com.evil.example/?Action=ConfirmSubscription&Token=x",
        sns_https.server.url("/?Action=ConfirmSubscription&Token=x").replace("https:", "http:"),
    ):
        envelope = _confirmation(sns_https, "SubscriptionConfirmation", url)
        assert _refused(adapter, envelope).status == 403
    assert sns_https.server.hits("/?Action=ConfirmSubscription&Token=x") == []


def test_a_failed_confirmation_is_503_so_sns_resends_it(
    adapter: SesAdapter, sns_https: SnsTestServer
) -> None:
    path = f"/?Action=ConfirmSubscription&Token={uuid.uuid4().hex}"
    sns_https.server.serve(path, b"<Error/>", status=500)
    envelope = _confirmation(sns_https, "SubscriptionConfirmation", sns_https.server.url(path))
    with pytest.raises(Unavailable):
        adapter.events(request(envelope))
    assert sns_https.server.hits(path) == [path]


def test_an_unsubscribe_confirmation_yields_nothing_and_fetches_nothing(
    adapter: SesAdapter, sns_https: SnsTestServer
) -> None:
    path = f"/?Action=ConfirmSubscription&Token={uuid.uuid4().hex}"
    envelope = _confirmation(sns_https, "UnsubscribeConfirmation", sns_https.server.url(path))
    assert events_of(adapter, envelope) == Batch(())
    assert sns_https.server.hits(path) == []
    tampered = {**envelope, "SubscribeURL": envelope["SubscribeURL"] + "&x=1"}
    assert _refused(adapter, tampered).status == 403


# --- authentic but malformed: 400 ---------------------------------------------------------------


def _malformed(adapter: SesAdapter, signer: SnsSigner, record: Any) -> Malformed:
    envelope = signer.sign(
        {**notification({}), "Message": record if isinstance(record, str) else json.dumps(record)}
    )
    adapter.authenticate(request(envelope))
    with pytest.raises(Malformed) as malformed:
        adapter.events(request(envelope))
    return malformed.value


def test_malformed_records_name_the_field(adapter: SesAdapter, signer: SnsSigner) -> None:
    assert _malformed(adapter, signer, "not json").field == "Message"
    assert _malformed(adapter, signer, ["a list"]).field == "Message"
    assert _malformed(adapter, signer, {"mail": {}}).field == "Message.eventType"
    no_mail_id = fixture("event-delivery")
    del no_mail_id["mail"]["messageId"]
    assert _malformed(adapter, signer, no_mail_id).field == "mail.messageId"
    no_recipients = fixture("event-bounce")
    no_recipients["bounce"]["bouncedRecipients"] = []
    assert _malformed(adapter, signer, no_recipients).field == "bounce.bouncedRecipients"
    odd_bounce = fixture("event-bounce")
    odd_bounce["bounce"]["bounceType"] = "Sometimes"
    assert _malformed(adapter, signer, odd_bounce).field == "bounce.bounceType"
    bad_time = fixture("event-open")
    bad_time["open"]["timestamp"] = "yesterday"
    error = _malformed(adapter, signer, bad_time)
    assert (error.field, error.rule) == ("open.timestamp", "must be an ISO 8601 time")
    assert "yesterday" not in str(error)


LONG_ADDRESS = "victim" + "x" * 282 + "@example.com"  # 300 characters


def _with(name: str, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    record = fixture(name)
    change(record)
    return record


@pytest.mark.parametrize(
    ("record", "field"),
    [
        (
            _with(
                "event-bounce",
                lambda r: r["bounce"]["bouncedRecipients"][0].update(emailAddress=LONG_ADDRESS),
            ),
            "bounce.bouncedRecipients",
        ),
        (
            _with(
                "event-delivery",
                lambda r: r["delivery"].update(recipients=["victim\x00@example.com"]),
            ),
            "delivery.recipients",
        ),
        (
            _with(
                "event-complaint",
                lambda r: r["complaint"]["complainedRecipients"][0].update(
                    emailAddress="victim\ud800@example.com"
                ),
            ),
            "complaint.complainedRecipients",
        ),
        (
            _with("event-open", lambda r: r["mail"].update(destination=[LONG_ADDRESS])),
            "mail.destination",
        ),
        (
            _with("event-delivery", lambda r: r["mail"].update(messageId="m" * 501)),
            "mail.messageId",
        ),
        (_with("event-delivery", lambda r: r["mail"].update(messageId="m\x00")), "mail.messageId"),
        ("[" * 100_000 + "]" * 100_000, "Message"),
        ('{"eventType": ' + "9" * 100_000 + "}", "Message"),
    ],
    ids=[
        "bounced address of 300",
        "NUL in a delivered address",
        "lone surrogate in a complained address",
        "destination of 300",
        "SES message id of 501",
        "NUL in SES message id",
        "Message nested 100000 deep",
        "Message with a number of 100000 digits",
    ],
)
def test_a_record_the_ledger_cannot_store_is_malformed(
    adapter: SesAdapter, signer: SnsSigner, record: Any, field: str
) -> None:
    error = _malformed(adapter, signer, record)
    assert error.field == field
    assert "victim" not in str(error)


def test_an_sns_message_id_too_long_for_an_event_id_is_malformed(
    adapter: SesAdapter, signer: SnsSigner
) -> None:
    envelope = signer.sign(notification(fixture("event-delivery"), MessageId="m" * 484))
    adapter.authenticate(request(envelope))
    with pytest.raises(Malformed) as malformed:
        adapter.events(request(envelope))
    assert malformed.value.field == "MessageId"
    shorter = signer.sign(notification(fixture("event-delivery"), MessageId="m" * 483))
    (event,) = events_of(adapter, shorter).events
    assert len(event.provider_event_id) == 500


def test_diagnostic_text_is_kept_without_nul_or_lone_surrogates(
    adapter: SesAdapter, signer: SnsSigner
) -> None:
    record = fixture("event-bounce")
    entry = record["bounce"]["bouncedRecipients"][0]
    entry["diagnosticCode"] = "smtp; 550\x00 user\ud800 unknown"
    (event,) = events_of(adapter, signer.sign(notification(record))).events
    assert event.detail["diagnostic"] == "smtp; 550 user? unknown"
    json.dumps(event.detail).encode("utf-8")  # storable


# --- settings ----------------------------------------------------------------------------------


def test_from_env_is_none_without_topic_arns() -> None:
    assert from_env(dict[str, str]().get) is None
    assert from_env({"SNS_TOPIC_ARNS": " "}.get) is None


@pytest.mark.parametrize(
    ("values", "setting"),
    [
        ({"SNS_TOPIC_ARNS": "ses-events"}, "SNS_TOPIC_ARNS"),
        ({"SNS_TOPIC_ARNS": f"{TOPIC},arn:aws:s3:::bucket"}, "SNS_TOPIC_ARNS"),
        ({"SNS_TOPIC_ARNS": TOPIC, "SNS_CERT_HOSTS": "sns.**.amazonaws.com"}, "SNS_CERT_HOSTS"),
        (
            {"SNS_TOPIC_ARNS": TOPIC, "SNS_CERT_HOSTS": "https://sns.x.amazonaws.com"},
            "SNS_CERT_HOSTS",
        ),
        ({"SNS_TOPIC_ARNS": TOPIC, "SNS_CERT_HOSTS": "127.0.0.1:99999"}, "SNS_CERT_HOSTS"),
        ({"SNS_TOPIC_ARNS": TOPIC, "SNS_CERT_HOSTS": ","}, "SNS_CERT_HOSTS"),
        ({"SNS_TOPIC_ARNS": TOPIC, "SNS_CA_FILE": "/nonexistent/ca.pem"}, "SNS_CA_FILE"),
    ],
)
def test_malformed_settings_stop_with_one_line_naming_the_setting(
    values: dict[str, str], setting: str
) -> None:
    with pytest.raises(SettingsError) as error:  # also a ValueError
        from_env(values.get)
    assert isinstance(error.value, ValueError)
    message = str(error.value)
    assert message.startswith(f"{setting}:")
    assert "\n" not in message


def test_a_ca_file_that_is_not_pem_is_refused_at_start(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate")
    with pytest.raises(SettingsError, match=r"^SNS_CA_FILE:"):
        from_env({"SNS_TOPIC_ARNS": TOPIC, "SNS_CA_FILE": str(bogus)}.get)


def test_several_topics_are_allowed(sns_https: SnsTestServer) -> None:
    other = "arn:aws:sns:eu-west-1:123456789012:ses-eu"
    settings = {**sns_https.settings(f" {TOPIC} , {other} ")}
    adapter = from_env(settings.get)
    assert adapter is not None
    for topic in (TOPIC, other):
        adapter.authenticate(
            request(sns_https.signer.sign(notification(fixture("event-open"), TopicArn=topic)))
        )


@pytest.mark.parametrize(
    ("pattern", "host", "port", "matches"),
    [
        ("sns.*.amazonaws.com", "sns.us-east-1.amazonaws.com", None, True),
        ("sns.*.amazonaws.com", "SNS.EU-WEST-1.AMAZONAWS.COM", 443, True),
        ("sns.*.amazonaws.com", "sns.amazonaws.com", None, False),
        ("sns.*.amazonaws.com", "sns.a.b.amazonaws.com", None, False),
        ("sns.*.amazonaws.com", "sns.us-east-1.amazonaws.com.evil.example", None, False),
        ("sns.*.amazonaws.com", "evil-sns.us-east-1.amazonaws.com", None, False),
        ("sns.*.amazonaws.com", "sns.us-east-1.amazonaws.com", 8443, False),
        ("sns.*.amazonaws.com.cn", "sns.cn-north-1.amazonaws.com.cn", None, True),
        ("127.0.0.1:8443", "127.0.0.1", 8443, True),
        ("127.0.0.1:8443", "127.0.0.1", None, False),
    ],
)
def test_cert_host_patterns(pattern: str, host: str, port: int | None, matches: bool) -> None:
    assert HostPattern.parse(pattern, "SNS_CERT_HOSTS").matches(host, port) is matches


@pytest.mark.parametrize(
    ("agent", "kind"),
    [
        ("Mozilla/5.0 (Windows NT 5.1) Firefox/11.0 (via ggpht.com GoogleImageProxy)", "proxy"),
        ("YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html", "proxy"),
        ("Mozilla/5.0 (iPhone; CPU iPhone OS 10_3_3 like Mac OS X) Mobile/14G60", "mobile"),
        ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/60.0.3112.90 Safari/537.36", "desktop"),
        ("Googlebot/2.1 (+http://www.google.com/bot.html)", "bot"),
        ("Microsoft Office/16.0", "desktop"),
    ],
)
def test_user_agent_class(agent: str, kind: str) -> None:
    assert user_agent_class(agent) == kind


def test_fixtures_are_left_untouched_by_parsing(adapter: SesAdapter, signer: SnsSigner) -> None:
    record = fixture("event-click")
    before = copy.deepcopy(record)
    events_of(adapter, signer.sign(notification(record)))
    assert record == before


# --- through the ledger (real PostgreSQL): what the events do, and what is stored -------------


def _sent_delivery(ledger: Ledger, relay_id: str) -> str:
    delivery_id = f"reset_{uuid.uuid4().hex[:12]}"
    claim = ledger.claim(
        delivery_id=delivery_id,
        workflow="password-reset",
        recipient="recipient@example.com",
        locale="en",
        metadata=None,
        source_message_id=None,
        lease_seconds=60,
    )
    assert claim is not None
    assert ledger.set_sent_if_claimed(
        claim, attempts=1, provider_message_id=f"<{delivery_id}@mail.example.com>"
    )
    with ledger.pool.connection() as conn:
        conn.execute(
            "UPDATE email.deliveries SET relay_message_id = %s WHERE delivery_id = %s",
            (relay_id, delivery_id),
        )
    return delivery_id


def test_ses_events_through_the_ledger_never_store_the_link(
    adapter: SesAdapter, signer: SnsSigner, ledger: Ledger, database_url: str
) -> None:
    relay_id = f"0100018c{uuid.uuid4().hex}-000000"
    delivery_id = _sent_delivery(ledger, relay_id)
    tracking = Tracking(ledger.pool)

    delivered = fixture("event-delivery")
    delivered["mail"]["tags"]["delivery_id"] = [delivery_id]  # matched by the tag
    envelope = signer.sign(notification(delivered, MessageId="sns-delivered-" + delivery_id))
    (event,) = events_of(adapter, envelope).events
    assert tracking.apply(event) is Applied.APPLIED
    (again,) = events_of(adapter, envelope).events  # SNS retries the same message
    assert tracking.apply(again) is Applied.DUPLICATE

    click = fixture("event-click")
    click["mail"]["messageId"] = relay_id  # matched by SES's own id
    click["mail"]["commonHeaders"]["messageId"] = "unrelated@example.com"
    click["click"]["link"] = RESET_LINK
    click["click"]["linkTags"] = {"token": ["s3cr3t-reset-token"]}
    # A time this email can have had (the ledger keeps no time from before it was queued).
    clicked_at = dt.datetime.now(dt.UTC).replace(microsecond=570000)
    click["click"]["timestamp"] = clicked_at.isoformat().replace("+00:00", "Z")
    for event in events_of(adapter, signer.sign(notification(click))).events:
        assert tracking.apply(event) is Applied.APPLIED

    with psycopg.connect(database_url) as conn:
        status = conn.execute(
            "SELECT provider_status::text, clicked_at FROM email.deliveries WHERE delivery_id = %s",
            (delivery_id,),
        ).fetchone()
        stored = conn.execute(
            "SELECT concat_ws(' ', (SELECT string_agg(t::text, ' ') FROM email.provider_events t),"
            " (SELECT string_agg(t::text, ' ') FROM email.deliveries t),"
            " (SELECT string_agg(t::text, ' ') FROM email.delivery_events t))"
        ).fetchone()
    assert status == ("clicked", clicked_at)
    assert stored is not None
    for secret in (RESET_LINK, "s3cr3t", "reset?token"):
        assert secret not in stored[0]


def test_a_hard_ses_bounce_suppresses_the_recipient(
    adapter: SesAdapter, signer: SnsSigner, ledger: Ledger, database_url: str
) -> None:
    relay_id = f"0100018c{uuid.uuid4().hex}-000000"
    delivery_id = _sent_delivery(ledger, relay_id)
    bounce = fixture("notification-bounce-no-dsn")  # no headers: only the relay id matches
    bounce["mail"]["messageId"] = relay_id
    bounce["bounce"]["bouncedRecipients"] = [{"emailAddress": "Recipient@Example.com"}]
    (event,) = events_of(adapter, signer.sign(notification(bounce))).events
    assert Tracking(ledger.pool).apply(event) is Applied.APPLIED
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT provider_status::text, bounce_type FROM email.deliveries"
            " WHERE delivery_id = %s",
            (delivery_id,),
        ).fetchone()
        suppressed = conn.execute(
            "SELECT reason::text, delivery_id FROM email.suppressions WHERE address = %s",
            ("recipient@example.com",),
        ).fetchone()
    assert row == ("bounced", "hard")
    assert suppressed == ("hard_bounce", delivery_id)
