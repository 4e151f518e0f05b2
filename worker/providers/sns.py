"""Amazon SNS message authenticity for HTTPS subscriptions (docs/webhooks.md), generic:
the SES adapter builds on it, and any other SNS-carried provider could.

What is checked, in this order (cheap and offline first, so a forged request never makes
us fetch anything):

1. The body is a JSON object with the documented envelope fields
   (https://docs.aws.amazon.com/sns/latest/dg/http-notification-json.html,
   https://docs.aws.amazon.com/sns/latest/dg/http-subscription-confirmation-json.html).
2. `TopicArn` is one of `SNS_TOPIC_ARNS`.
3. `SigningCertURL` is https on an allowed host (`SNS_CERT_HOSTS`), without user info, query
   or fragment, and its path has the form SNS uses, `/SimpleNotificationService-<hex>.pem`:
   anything else could make each forged request fetch (and cache) another URL. A
   SubscriptionConfirmation's `SubscribeURL` is https on an allowed host too (visited only
   by `confirm_subscription`).
4. The certificate, fetched over TLS (system store plus `SNS_CA_FILE`, no redirects, short
   timeout, cached per instance), is valid now and holds an RSA key. Its trust comes from
   that verified TLS fetch from an allowed SNS host (as in AWS's own SDK validators): the
   file holds only the leaf, so its chain is not built here.
5. `Signature` is SHA1withRSA (SignatureVersion 1) or SHA256withRSA (2) over the string to
   sign built per `Type`
   (https://docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message.html).

SNS keeps a message's original `Timestamp` (and `MessageId`) across its retries, so messages
are not aged out: the signature and the MessageId (deduplicated by the ledger) guard them.

SNS treats any 4xx answer as final and only retries 5xx and timeouts
(https://docs.aws.amazon.com/sns/latest/dg/sns-message-delivery-retries.html), so a
certificate or SubscribeURL we cannot reach *right now* is `Unavailable` (503, retried),
while a request that does not hold is `Refused` 401/403.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import re
import ssl
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from worker.core.settings import SettingsError
from worker.providers.model import Refused

DEFAULT_CERT_HOSTS = "sns.*.amazonaws.com"
FETCH_TIMEOUT_SECONDS = 5.0
CERT_CACHE_SIZE = 16  # SNS uses one certificate per region at a time; a few rotations fit
MAX_CERT_BYTES = 64 * 1024
MAX_CONFIRM_BYTES = 64 * 1024
# An SNS message is at most 256 KiB. In the envelope it is a JSON string: an SES record is
# JSON itself (no raw control characters), so escaping makes it at most three times longer
# (a two-byte character as \uXXXX), next to a few short fields. Bodies past that are 413
# before anything is parsed: parsing is what an unsigned request costs us.
MAX_MESSAGE_BYTES = 256 * 1024
MAX_ENVELOPE_BYTES = 3 * MAX_MESSAGE_BYTES + 64 * 1024


class MessageType(StrEnum):
    NOTIFICATION = "Notification"
    SUBSCRIPTION_CONFIRMATION = "SubscriptionConfirmation"
    UNSUBSCRIBE_CONFIRMATION = "UnsubscribeConfirmation"


# The string to sign: these names, in this (byte-sorted) order, each as "Name\nvalue\n";
# `Subject` only when the message has one (sns-verify-signature-of-message.html).
_CONFIRMATION_FIELDS = (
    "Message",
    "MessageId",
    "SubscribeURL",
    "Timestamp",
    "Token",
    "TopicArn",
    "Type",
)
_SIGNED_FIELDS: Mapping[MessageType, tuple[str, ...]] = {
    MessageType.NOTIFICATION: ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    MessageType.SUBSCRIPTION_CONFIRMATION: _CONFIRMATION_FIELDS,
    MessageType.UNSUBSCRIBE_CONFIRMATION: _CONFIRMATION_FIELDS,
}
_OPTIONAL_FIELDS = frozenset({"Subject"})
_HASHES: Mapping[str, type[hashes.SHA1] | type[hashes.SHA256]] = {
    "1": hashes.SHA1,
    "2": hashes.SHA256,
}


class SnsSettingsError(SettingsError, ValueError):
    """A malformed SNS_* setting: one line naming the setting, never a secret value. Both the
    project's `SettingsError` (the instance stops) and the `ValueError` adapters promise."""


class Unavailable(Refused):
    """The signing certificate or the SubscribeURL could not be fetched now (network, 5xx):
    503, so SNS retries. Nothing from the request is kept or logged."""

    def __init__(self, reason: str) -> None:
        super().__init__(503, reason)


@dataclass(frozen=True)
class SnsMessage:
    """A verified SNS message: only what its signature covers."""

    type: MessageType
    message_id: str
    topic_arn: str
    message: str
    timestamp: str
    subject: str | None = None
    subscribe_url: str | None = None


# --- settings ----------------------------------------------------------------------------

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_TOPIC_ARN = re.compile(r"arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]{1,256}(?:\.fifo)?")
# The path of every SNS signing certificate, e.g.
# /SimpleNotificationService-9c6465fa7f48f5cacd23014631ec1136.pem.
_CERT_PATH = re.compile(r"/SimpleNotificationService-[0-9a-fA-F]{1,128}\.pem")


@dataclass(frozen=True)
class HostPattern:
    """`sns.*.amazonaws.com` or `127.0.0.1:8443`: `*` stands for exactly one DNS label; with
    no port only the https default (443) is allowed."""

    labels: tuple[str, ...]
    port: int | None

    @classmethod
    def parse(cls, text: str, setting: str) -> HostPattern:
        host, colon, port_text = text.strip().lower().partition(":")
        labels = tuple(host.split("."))
        if not all(label == "*" or _LABEL.fullmatch(label) for label in labels):
            raise SnsSettingsError(
                f"{setting}: {text.strip()!r} is not a host pattern like sns.*.amazonaws.com"
            )
        port: int | None = None
        if colon:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise SnsSettingsError(f"{setting}: {text.strip()!r} has no valid port after ':'")
            port = int(port_text)
        return cls(labels, port)

    def matches(self, host: str, port: int | None) -> bool:
        if (port or 443) != (self.port or 443):
            return False
        labels = host.lower().split(".")
        return len(labels) == len(self.labels) and all(
            (want == "*" and _LABEL.fullmatch(got) is not None) or want == got
            for want, got in zip(self.labels, labels, strict=True)
        )


def parse_topic_arns(value: str, setting: str = "SNS_TOPIC_ARNS") -> frozenset[str]:
    arns = [arn.strip() for arn in value.split(",") if arn.strip()]
    if not arns:
        raise SnsSettingsError(f"{setting}: give at least one topic ARN (comma-separated)")
    for arn in arns:
        if not _TOPIC_ARN.fullmatch(arn):
            raise SnsSettingsError(
                f"{setting}: {arn!r} is not an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)"
            )
    return frozenset(arns)


def parse_host_patterns(value: str, setting: str = "SNS_CERT_HOSTS") -> tuple[HostPattern, ...]:
    patterns = tuple(HostPattern.parse(item, setting) for item in value.split(",") if item.strip())
    if not patterns:
        raise SnsSettingsError(f"{setting}: give at least one host pattern (comma-separated)")
    return patterns


# --- the string to sign --------------------------------------------------------------------


def string_to_sign(message_type: MessageType, fields: Mapping[str, str]) -> bytes:
    """The canonical "Name\\nvalue\\n" list SNS signs, for one message type."""
    parts: list[str] = []
    for name in _SIGNED_FIELDS[message_type]:
        value = fields.get(name)
        if value is None and name in _OPTIONAL_FIELDS:
            continue
        parts.append(f"{name}\n{value}\n")
    return "".join(parts).encode("utf-8")


def _envelope(body: bytes) -> tuple[MessageType, dict[str, str]]:
    """The envelope's string fields, or `Refused` (nothing about the values is kept)."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # also a huge integer, or nesting past the stack
        raise Refused(401, "not an SNS message") from None
    if not isinstance(document, dict):
        raise Refused(401, "not an SNS message")
    if not all(isinstance(document.get(name), str) for name in ("Signature", "SigningCertURL")):
        raise Refused(401, "SNS message without a signature")
    try:
        message_type = MessageType(str(document.get("Type")))
    except ValueError:
        raise Refused(403, "unknown SNS message type") from None
    fields = {name: value for name, value in document.items() if isinstance(value, str)}
    required = [*_SIGNED_FIELDS[message_type], "SignatureVersion"]
    if any(name not in fields for name in required if name not in _OPTIONAL_FIELDS):
        raise Refused(403, "SNS message missing a signed field")
    return message_type, fields


# --- fetching --------------------------------------------------------------------------------


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The system store plus the extra bundle (a path, or PEM text from Secret Manager)."""
    context = ssl.create_default_context()
    if ca_file:
        if ca_file.lstrip().startswith("-----BEGIN"):
            context.load_verify_locations(cadata=ca_file)
        else:
            context.load_verify_locations(cafile=ca_file)
    return context


@dataclass(frozen=True)
class _Fetched:
    status: int
    body: bytes


class SnsVerifier:
    """Built once per instance from settings; safe to share between request threads."""

    def __init__(
        self,
        topic_arns: frozenset[str],
        cert_hosts: tuple[HostPattern, ...],
        ca_file: str | None = None,
        *,
        timeout: float = FETCH_TIMEOUT_SECONDS,
        cache_size: int = CERT_CACHE_SIZE,
    ) -> None:
        self._topic_arns = topic_arns
        self._cert_hosts = cert_hosts
        self._ca_file = ca_file
        self._timeout = timeout
        self._cache_size = cache_size
        self._certificates: OrderedDict[str, x509.Certificate] = OrderedDict()
        self._lock = threading.Lock()
        self._context: ssl.SSLContext | None = None

    @classmethod
    def from_settings(
        cls, topic_arns: str, cert_hosts: str | None, ca_file: str | None
    ) -> SnsVerifier:
        """Raises `SnsSettingsError` naming the setting (never its value when it may be secret)."""
        pem_text = (ca_file or "").lstrip().startswith("-----BEGIN")
        if ca_file and not pem_text and not Path(ca_file).is_file():
            raise SnsSettingsError("SNS_CA_FILE: no such file")
        verifier = cls(
            parse_topic_arns(topic_arns),
            parse_host_patterns(cert_hosts or DEFAULT_CERT_HOSTS),
            ca_file or None,
        )
        if ca_file:
            try:
                verifier._tls()
            except (ssl.SSLError, OSError, ValueError):
                raise SnsSettingsError("SNS_CA_FILE: not a PEM bundle of CA certificates") from None
        return verifier

    # -- verification ---------------------------------------------------------------------

    def verify(self, body: bytes) -> SnsMessage:
        """The verified message, or `Refused` (401/403) / `Unavailable` (503)."""
        message_type, fields = _envelope(body)
        if fields["TopicArn"] not in self._topic_arns:
            raise Refused(403, "SNS topic not allowed")
        algorithm = _HASHES.get(fields["SignatureVersion"])
        if algorithm is None:
            raise Refused(403, "unsupported SNS SignatureVersion")
        try:
            signature = base64.b64decode(fields["Signature"], validate=True)
        except (binascii.Error, ValueError):
            raise Refused(403, "SNS signature is not base64") from None
        if message_type is MessageType.SUBSCRIPTION_CONFIRMATION:
            # Checked here, not only when visiting it: a confirmation that names a foreign
            # host is refused by `authenticate` already (docs/webhooks.md).
            self._allowed_url(fields["SubscribeURL"], "SubscribeURL")
        certificate = self._certificate(fields["SigningCertURL"])
        public_key = certificate.public_key()
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise Refused(403, "SNS signing certificate has no RSA key")
        try:
            public_key.verify(
                signature,
                string_to_sign(message_type, fields),
                padding.PKCS1v15(),
                algorithm(),
            )
        except InvalidSignature:
            raise Refused(403, "SNS signature does not verify") from None
        return SnsMessage(
            type=message_type,
            message_id=fields["MessageId"],
            topic_arn=fields["TopicArn"],
            message=fields["Message"],
            timestamp=fields["Timestamp"],
            subject=fields.get("Subject") if message_type is MessageType.NOTIFICATION else None,
            subscribe_url=fields.get("SubscribeURL"),
        )

    def confirm_subscription(self, message: SnsMessage) -> None:
        """Visit a verified SubscriptionConfirmation's SubscribeURL, once
        (https://docs.aws.amazon.com/sns/latest/dg/SendMessageToHttp.confirm.html)."""
        if message.type is not MessageType.SUBSCRIPTION_CONFIRMATION or not message.subscribe_url:
            raise ValueError("not a SubscriptionConfirmation")
        url = self._allowed_url(message.subscribe_url, "SubscribeURL")
        fetched = self._fetch(url, MAX_CONFIRM_BYTES, "SubscribeURL")
        if not 200 <= fetched.status < 300:
            # Expired or already used tokens answer 4xx; SNS resends the confirmation on 5xx.
            raise Unavailable("SNS did not accept the subscription confirmation")

    # -- certificates -----------------------------------------------------------------------

    def _certificate(self, cert_url: str) -> x509.Certificate:
        url = self._allowed_url(cert_url, "SigningCertURL")
        parts = urlsplit(url)
        # Checked before the cache and any fetch: a query, a fragment or another file name
        # would give each forged request a URL of its own to fetch.
        if "?" in url or "#" in url:  # also an empty one: the URL must be SNS's own
            raise Refused(403, "SNS SigningCertURL has a query or fragment")
        if not _CERT_PATH.fullmatch(parts.path):
            raise Refused(403, "SNS SigningCertURL is not an SNS certificate path")
        with self._lock:
            certificate = self._certificates.get(url)
            if certificate is not None:
                self._certificates.move_to_end(url)
        if certificate is None:
            certificate = self._load_certificate(url)
            with self._lock:
                self._certificates[url] = certificate
                while len(self._certificates) > self._cache_size:
                    self._certificates.popitem(last=False)
        now = datetime.now(UTC)
        # Checked on every use: a cached certificate expires too.
        if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
            raise Refused(403, "SNS signing certificate is not valid now")
        return certificate

    def _load_certificate(self, url: str) -> x509.Certificate:
        fetched = self._fetch(url, MAX_CERT_BYTES, "SigningCertURL")
        if fetched.status >= 500:
            raise Unavailable("SNS signing certificate unavailable")
        if fetched.status != 200:
            raise Refused(403, "SNS signing certificate not found")
        try:
            return x509.load_pem_x509_certificate(fetched.body)
        except ValueError:
            raise Refused(403, "SNS signing certificate is not a PEM certificate") from None

    def _allowed_url(self, url: str, name: str) -> str:
        """`url` if it is https on an allowed host without credentials, else `Refused`."""
        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port
        except ValueError:
            raise Refused(403, f"SNS {name} is not a URL") from None
        if parts.scheme != "https":
            raise Refused(403, f"SNS {name} is not https")
        if not host or parts.username is not None or parts.password is not None:
            raise Refused(403, f"SNS {name} host not allowed")
        if not any(pattern.matches(host, port) for pattern in self._cert_hosts):
            raise Refused(403, f"SNS {name} host not allowed")
        return url

    # -- the one place that talks to the network -------------------------------------------

    def _tls(self) -> ssl.SSLContext:
        if self._context is None:
            self._context = _tls_context(self._ca_file)
        return self._context

    def _fetch(self, url: str, limit: int, name: str) -> _Fetched:
        """GET over verified TLS, no redirects followed (a redirect could leave the allowed
        hosts), at most `limit` bytes. Transport failures are `Unavailable`; the URL itself
        (SubscribeURL carries a token) never goes into a message."""
        parts = urlsplit(url)
        target = parts.path or "/"
        if parts.query:
            target = f"{target}?{parts.query}"
        assert parts.hostname is not None
        connection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=self._timeout, context=self._tls()
        )
        try:
            connection.request("GET", target, headers={"User-Agent": "gcp-email-service"})
            response = connection.getresponse()
            body = response.read(limit + 1)
        except (OSError, http.client.HTTPException):
            raise Unavailable(f"SNS {name} could not be fetched") from None
        finally:
            connection.close()
        if len(body) > limit:
            raise Refused(403, f"SNS {name} answer too large")
        return _Fetched(response.status, body)
