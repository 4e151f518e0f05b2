"""A real SMTP server for tests: aiosmtpd in a thread on 127.0.0.1, with failure cues.

`smtp_server` is a plain server without AUTH; `make_smtp_server(tls=..., username=...,
password=...)` makes others (STARTTLS or implicit TLS with a throwaway CA whose bundle is
`server.ca_file`). `server.settings()` gives matching `SmtpSettings` for a client.
`make_smtp_server(smtputf8=True)` advertises SMTPUTF8 (RFC 6531) and takes UTF-8 envelopes;
without it the server answers non-ASCII commands `500 strict ASCII mode`, as a relay
without the extension would refuse them.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime as dt
import ipaddress
import shutil
import socket
import ssl
import tempfile
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from functools import cache
from pathlib import Path
from typing import Any, Literal

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from worker.delivery.config import SmtpSettings

HOST = "127.0.0.1"
Tls = Literal["none", "starttls", "ssl"]
Stage = Literal["mail", "rcpt", "data"]


@dataclass(frozen=True)
class ReceivedMessage:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    message: EmailMessage
    raw: bytes
    mail_options: tuple[str, ...] = ()  # the MAIL FROM parameters, e.g. SMTPUTF8


# --- certificates ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Certs:
    ca_file: str
    cert_file: str
    key_file: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        builder = builder.add_extension(usage, critical=True)
    else:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


@cache
def _certs() -> _Certs:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost, once per run."""
    directory = Path(tempfile.mkdtemp(prefix="smtp-harness-"))
    atexit.register(shutil.rmtree, directory, True)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("harness test CA", ca_key, "harness test CA", ca_key, ca=True)
    cert = _certificate("localhost", key, "harness test CA", ca_key, ca=False)
    paths = _Certs(
        str(directory / "ca.pem"), str(directory / "cert.pem"), str(directory / "key.pem")
    )
    Path(paths.ca_file).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    Path(paths.cert_file).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(paths.key_file).write_bytes(_pem_key(key))
    return paths


def _server_context() -> ssl.SSLContext:
    certs = _certs()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert_file, certs.key_file)
    return context


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


# --- the server ------------------------------------------------------------------------


class _Handler:
    """aiosmtpd hooks; all state lives in the SmtpTestServer (shared with the test thread)."""

    def __init__(self, owner: SmtpTestServer) -> None:
        self._owner = owner

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # what aiosmtpd does when no hook is given
        if self._owner.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self._owner._count_transaction()
        reply = self._owner._mail_reply()
        if reply is not None:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self._owner._rcpt_reply(address)
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        delay, drop, reply = self._owner._data_cues()
        if delay:
            await asyncio.sleep(delay)
        hold = self._owner._hold
        while hold is not None and not hold.is_set():
            await asyncio.sleep(0.01)  # until the test releases it
        if drop is not None:
            if drop == "accept":
                self._owner._record(envelope, ambiguous=True)
            # Close without a reply: the client sees the server disconnect mid-transaction.
            assert server.transport is not None
            server.transport.close()
            return "421 never sent"
        if reply is not None:
            return reply
        self._owner._record(envelope)
        return self._owner.accept_reply


class _Controller(Controller):
    """Counts TCP sessions (aiosmtpd makes one SMTP protocol per accepted connection)
    and keeps them so that `stop()` can close them like a crashing server would."""

    def __init__(self, owner: SmtpTestServer, **kwargs: Any) -> None:
        super().__init__(_Handler(owner), **kwargs)
        self._owner = owner
        self.sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()

    def factory(self) -> SMTP:
        protocol: SMTP = super().factory()  # type: ignore[no-untyped-call]
        self.sessions.add(protocol)
        self._owner._count_connection()
        return protocol

    def close_sessions(self) -> None:
        async def close_all() -> None:
            for protocol in list(self.sessions):
                if protocol.transport is not None:
                    protocol.transport.close()
            await asyncio.sleep(0.05)  # let the transports actually close their sockets

        asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(timeout=5)


@dataclass
class _Cues:
    failures: deque[tuple[Stage, str]] = field(default_factory=deque)
    refused: dict[str, str] = field(default_factory=dict)
    drops: int = 0
    accept_drops: int = 0
    delay: float = 0.0


class SmtpTestServer:
    """In-process SMTP server; thread-safe counters, received messages and failure cues."""

    def __init__(
        self,
        *,
        tls: Tls = "none",
        username: str | None = None,
        password: str | None = None,
        port: int | None = None,
        pipelining: bool = False,
        smtputf8: bool = False,
    ) -> None:
        self.host = HOST
        # Advertise PIPELINING (RFC 2920), as production relays do; aiosmtpd serves
        # pipelined commands either way but does not offer the extension itself.
        self.pipelining = pipelining
        self.smtputf8 = smtputf8
        self.port = port or _free_port()
        self.tls: Tls = tls
        self.username = username
        self.password = password
        self.ca_file: str | None = _certs().ca_file if tls != "none" else None
        self._lock = threading.Lock()
        self._messages: list[ReceivedMessage] = []
        self._ambiguous: list[str] = []
        self._connections = 0
        self._transactions = 0
        self._cues = _Cues()
        self._hold: threading.Event | None = None
        self._controller: _Controller | None = None
        # The reply to an accepted DATA; a relay may name its own id for the message here
        # (`250 Ok: queued as <id>`).
        self.accept_reply = "250 OK"

    # lifecycle

    def start(self) -> SmtpTestServer:
        assert self._controller is None, "already running"
        controller = _Controller(self, **self._controller_options())
        controller.start()
        self._controller = controller
        with self._lock:
            self._connections -= 1  # start() probed the port once; that was not a client
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection (kept client connections die)."""
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.close_sessions()
            controller.stop()

    def restart(self) -> None:
        """Stop, then listen again on the same port; messages and counters are kept."""
        self.stop()
        self.start()

    def _controller_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "hostname": self.host,
            "port": self.port,
            "server_hostname": "localhost",  # avoids socket.getfqdn() per connection
            "ready_timeout": 10.0,
            # aiosmtpd refuses AUTH unless STARTTLS happened; with implicit TLS it cannot
            # tell, and in plain mode there is no TLS at all.
            "auth_require_tls": self.tls == "starttls",
            "enable_SMTPUTF8": self.smtputf8,
        }
        if self.tls == "starttls":
            options["tls_context"] = _server_context()
        elif self.tls == "ssl":
            options["ssl_context"] = _server_context()
        if self.username is not None:
            options["authenticator"] = self._authenticate
        return options

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = (
            isinstance(data, LoginPassword)
            and data.login.decode() == self.username
            and data.password.decode() == (self.password or "")
        )
        # handled=False makes aiosmtpd answer the failure itself (535 5.7.8).
        return AuthResult(success=ok, handled=ok)

    # what a client should use

    def settings(self, **overrides: Any) -> SmtpSettings:
        settings = SmtpSettings(
            host=self.host,
            port=self.port,
            security=self.tls,
            username=self.username,
            password=self.password,
            timeout_seconds=5.0,
            sender="Example <noreply@example.com>",
            message_id_domain="example.com",
            ca_file=self.ca_file,
        )
        return replace(settings, **overrides)

    # observations

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._lock:
            return list(self._messages)

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    @property
    def transactions(self) -> int:
        with self._lock:
            return self._transactions

    # cues

    def fail_next(self, n: int, code: int, text: str, *, at: Stage = "data") -> None:
        """Answer RCPT or DATA (`at`) of the next `n` transactions with `code text`."""
        with self._lock:
            self._cues.failures.extend([(at, f"{code} {text}")] * n)

    def fail_recipient(self, address: str, code: int, text: str) -> None:
        """Always answer RCPT for `address` with `code text`."""
        with self._lock:
            self._cues.refused[address.lower()] = f"{code} {text}"

    def drop_next(self, n: int) -> None:
        """Close the connection at the end of DATA, without a reply, `n` times."""
        with self._lock:
            self._cues.drops += n

    def accept_then_drop_next(self, n: int) -> None:
        """Accept the message (record it, as a relay that queued it), then close the connection
        before the 250 reply, `n` times. The client cannot tell this from `drop_next`: it is
        the window in which resending makes a duplicate. Their Message-IDs are in `ambiguous`."""
        with self._lock:
            self._cues.accept_drops += n

    def pending_cues(self) -> int:
        """Failures and drops cued but not yet used."""
        with self._lock:
            cues = self._cues
            return len(cues.failures) + cues.drops + cues.accept_drops

    @property
    def ambiguous(self) -> list[str]:
        with self._lock:
            return list(self._ambiguous)

    def delay(self, seconds: float) -> None:
        """Wait this long before answering every DATA (until `reset()`)."""
        with self._lock:
            self._cues.delay = seconds

    def hold_data(self) -> threading.Event:
        """Keep every message's final reply until the returned event is set: a send that
        stays in flight for as long as the test needs it to."""
        hold = threading.Event()
        self._hold = hold
        return hold

    def reset(self) -> None:
        """Forget cues, received messages and counters."""
        with self._lock:
            self._cues = _Cues()
            self._messages.clear()
            self._ambiguous.clear()
            self._connections = 0
            self._transactions = 0

    # called from the server thread

    def _count_connection(self) -> None:
        with self._lock:
            self._connections += 1

    def _count_transaction(self) -> None:
        with self._lock:
            self._transactions += 1

    def _mail_reply(self) -> str | None:
        with self._lock:
            cues = self._cues
            if cues.failures and cues.failures[0][0] == "mail":
                return cues.failures.popleft()[1]
            return None

    def _rcpt_reply(self, address: str) -> str | None:
        with self._lock:
            cues = self._cues
            if cues.failures and cues.failures[0][0] == "rcpt":
                return cues.failures.popleft()[1]
            return cues.refused.get(address.lower())

    def _data_cues(self) -> tuple[float, Literal["drop", "accept"] | None, str | None]:
        """(delay, drop: None, "drop" or "accept" then drop, a reply to answer instead)."""
        with self._lock:
            cues = self._cues
            drop: Literal["drop", "accept"] | None = None
            if cues.drops > 0:
                cues.drops -= 1
                drop = "drop"
            elif cues.accept_drops > 0:
                cues.accept_drops -= 1
                drop = "accept"
            reply = None
            if drop is None and cues.failures and cues.failures[0][0] == "data":
                reply = cues.failures.popleft()[1]
            return cues.delay, drop, reply

    def _record(self, envelope: Envelope, *, ambiguous: bool = False) -> None:
        raw = bytes(envelope.original_content or b"")
        parsed = BytesParser(policy=default_policy).parsebytes(raw)
        assert isinstance(parsed, EmailMessage)
        received = ReceivedMessage(
            str(envelope.mail_from),
            tuple(envelope.rcpt_tos),
            parsed,
            raw,
            tuple(envelope.mail_options),
        )
        with self._lock:
            self._messages.append(received)
            if ambiguous:
                self._ambiguous.append(str(parsed["Message-ID"]))


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture
def make_smtp_server() -> Iterator[Callable[..., SmtpTestServer]]:
    """`make_smtp_server(tls="starttls", username="u", password="p")`: started, stopped
    at the end of the test."""
    servers: list[SmtpTestServer] = []

    def make(**options: Any) -> SmtpTestServer:
        server = SmtpTestServer(**options).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def smtp_server(make_smtp_server: Callable[..., SmtpTestServer]) -> SmtpTestServer:
    """A plain SMTP server without AUTH."""
    return make_smtp_server()
