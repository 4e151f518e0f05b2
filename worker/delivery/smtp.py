"""SMTP delivery: message building, error classification, pooled connections, retries.

Nothing here logs message content or recipients; errors carry a sanitised `message`
that is safe to store in the ledger and to put on a dead-letter message.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import re
import smtplib
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime, formataddr, parseaddr
from enum import StrEnum
from typing import Protocol

import tenacity

from worker.core.redact import sanitise
from worker.core.rules import envelope_address
from worker.delivery.config import SmtpSettings
from worker.delivery.relay import relay_message_id

__all__ = [
    "SMTPUTF8_UNSUPPORTED",
    "OutgoingEmail",
    "Phase",
    "SendResult",
    "Sends",
    "SmtpError",
    "SmtpSender",
    "SmtpUtf8Unsupported",
    "build_message",
    "classify",
    "message_id_for",
    "send_with_retry",
]

# --- Message-ID ----------------------------------------------------------------------

# Characters of the delivery-id alphabet that are not atext (RFC 5322 3.2.3). `=` is not
# in the delivery-id alphabet, so `=XX` escapes can never be confused with id text and
# the mapping stays injective (one delivery id, one Message-ID, and back).
_ESCAPES = {"@": "=40", ":": "=3A"}


def message_id_for(delivery_id: str, domain: str) -> str:
    """`<id-left@domain>`, deterministic, so a resend of one delivery keeps its Message-ID."""
    out: list[str] = []
    last = len(delivery_id) - 1
    for index, char in enumerate(delivery_id):
        if char == "." and (index in (0, last) or delivery_id[index - 1] == "."):
            # dot-atom forbids leading, trailing and consecutive dots; other dots stay
            # literal so ordinary ids remain readable.
            out.append("=2E")
        else:
            out.append(_ESCAPES.get(char, char))
    return f"<{''.join(out)}@{domain}>"


@dataclass(frozen=True)
class OutgoingEmail:
    """One email as it goes on the wire: the envelope and the RFC 5322 bytes (CRLF lines)."""

    sender: str  # envelope MAIL FROM: the addr-spec of EMAIL_FROM
    recipients: tuple[str, ...]
    message_id: str
    data: bytes = field(repr=False)  # the body holds codes and links
    # A non-ASCII local part: the envelope and headers are UTF-8, and only a relay that
    # advertises SMTPUTF8 (RFC 6531) may take the message.
    smtputf8: bool = False

    def with_headers(self, headers: Sequence[tuple[str, str]]) -> OutgoingEmail:
        """The same email with `headers` (ASCII, one line each) added to its header block:
        what a provider echoes back in its webhooks (worker/delivery/relay.py)."""
        if not headers:
            return self
        lines = b"".join(f"{name}: {value}\r\n".encode("ascii") for name, value in headers)
        return OutgoingEmail(
            self.sender, self.recipients, self.message_id, lines + self.data, self.smtputf8
        )


@functools.lru_cache(maxsize=8)
def _sender_headers(sender: str, reply_to: str | None) -> tuple[str, bytes]:
    """The envelope sender and the From/Reply-To lines, encoded once per setting."""
    lines = f"From: {_address_header(sender)}\r\n"
    if reply_to:
        lines += f"Reply-To: {_address_header(reply_to)}\r\n"
    return parseaddr(sender)[1], lines.encode("ascii")


def _address_header(value: str) -> str:
    name, address = parseaddr(value)
    if not name or name.isascii():
        return formataddr((name, address))  # quotes the name where it needs it
    words = _encoded_words(name)  # RFC 2047 for a non-ASCII name
    last_line = len("Reply-To: ") + len(words.rsplit("\n", 1)[-1]) + len(address) + 3
    return f"{words}{' ' if last_line <= 78 else FOLD}<{address}>"


def _subject_header(subject: str) -> str:
    # A rendered subject must be one line; folding whitespace also defeats header injection.
    subject = " ".join(subject.split())
    if subject.isascii() and len(subject) <= 900:
        return subject
    return _encoded_words(subject)


# RFC 2047 section 2: an encoded-word is at most 75 characters. `=?utf-8?b?` + `?=` take 12,
# leaving 63 for base64, i.e. 45 bytes; 42 keeps `Subject: ` plus the first word within
# RFC 5322's 78-character line as well.
_WORD_BYTES = 42
FOLD = "\r\n "


def _encoded_words(text: str) -> str:
    """`text` as base64 encoded-words, each of whole UTF-8 characters (RFC 2047 section 5),
    folded one per line; readers join adjacent encoded-words without the folding space."""
    words: list[bytes] = []
    chunk = b""
    for char in text:
        encoded = char.encode("utf-8")
        if len(chunk) + len(encoded) > _WORD_BYTES:
            words.append(chunk)
            chunk = b""
        chunk += encoded
    words.append(chunk)
    return FOLD.join(f"=?utf-8?b?{base64.b64encode(w).decode('ascii')}?=" for w in words)


def _date_header() -> str:
    """Now, in UTC as `+0000`: RFC 5322 section 4.3 forbids generating the obsolete `GMT`."""
    return format_datetime(datetime.now(UTC))


def _quoted_printable(text: str) -> bytes:
    """UTF-8, quoted-printable, CRLF lines: 7-bit clean, so a relay without 8BITMIME
    accepts it, and no line can look like a MIME boundary (`=` is always escaped)."""
    crlf = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")
    return binascii.b2a_qp(crlf.encode("utf-8"), istext=True)


def build_message(
    settings: SmtpSettings,
    *,
    delivery_id: str,
    recipient: str,
    subject: str,
    text: str,
    html: str,
) -> OutgoingEmail:
    """A multipart/alternative (text, then HTML) UTF-8 email, written straight to bytes.

    The standard library's EmailMessage took about 2 ms per email to build and flatten,
    more than the SMTP exchange itself; the format here is fixed, so it is written directly
    (tests parse the result with the standard library's parser).

    `recipient` is the stored form (`rules.normalise_address`). An IDN domain goes out as
    A-labels in the envelope and `To`, so with an ASCII local part the message stays pure
    ASCII; a non-ASCII local part makes an SMTPUTF8 message whose `To` is UTF-8 (RFC 6532).
    """
    envelope_sender, sender_lines = _sender_headers(settings.sender, settings.reply_to)
    message_id = message_id_for(delivery_id, settings.message_id_domain)
    boundary = f"=_{uuid.uuid4().hex}"  # `=_` never occurs in quoted-printable text
    envelope_recipient, smtputf8 = envelope_address(recipient)
    head = (
        f"To: {recipient if smtputf8 else envelope_recipient}\r\n"
        f"Subject: {_subject_header(subject)}\r\n"
        f"Date: {_date_header()}\r\n"
        f"Message-ID: {message_id}\r\n"
        # RFC 3834: tells auto-responders (vacation replies) not to answer.
        "Auto-Submitted: auto-generated\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n'
        "\r\n"
    ).encode("utf-8" if smtputf8 else "ascii")
    parts = b"".join(
        f"--{boundary}\r\n"
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n".encode("ascii")
        + _quoted_printable(body)
        + b"\r\n"
        for subtype, body in (("plain", text), ("html", html))
    )
    data = sender_lines + head + parts + f"--{boundary}--\r\n".encode("ascii")
    return OutgoingEmail(envelope_sender, (envelope_recipient,), message_id, data, smtputf8)


# --- errors ----------------------------------------------------------------------------


class Phase(StrEnum):
    """How far one SMTP exchange got when it failed: what decides whether the relay may
    have the message (and so whether another relay may be given it)."""

    CONNECT = "connect"  # the TCP connection and the greeting
    TLS = "tls"  # STARTTLS
    AUTH = "auth"
    EHLO = "ehlo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"  # the DATA command, and the message until its final `.`
    REPLY = "reply"  # the whole message was sent; awaiting the relay's answer to it


# A 5xx in these phases is about the relay's own configuration (its greeting, our
# credentials, our sender), not the recipient or the message: another relay may take it.
_SESSION_PHASES = frozenset({Phase.CONNECT, Phase.TLS, Phase.AUTH, Phase.EHLO, Phase.MAIL})


class SmtpError(Exception):
    """A failed send: `code` like `SMTP_550` or `TIMEOUT`, a sanitised `message`,
    and whether retrying later can help (`transient`). `phase` is how far the exchange got
    and `reply_code` the relay's reply, if it gave one."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        transient: bool,
        reply_code: int | None = None,
        phase: Phase | None = None,
    ) -> None:
        self.code = code
        self.message = sanitise(message)
        self.transient = transient
        self.reply_code = reply_code
        self.phase = phase
        super().__init__(f"{code}: {self.message}")

    @property
    def fails_over(self) -> bool:
        """The relay does not have the message, for a reason of its own: another relay may
        be given it at once, and the failure counts towards this relay's circuit breaker.

        Yes: no connection, a reset or timeout before the end of DATA, TLS or AUTH failing, a
        4xx to any command or to the message, a 5xx to the greeting, EHLO, AUTH or MAIL FROM.
        No: a 5xx to RCPT, DATA or the message (about the recipient or the message: a
        permanent failure), and a connection lost after the whole message was sent (the relay
        may have it)."""
        if self.phase is None or (self.phase is Phase.REPLY and self.reply_code is None):
            return False
        if self.reply_code is None:
            return self.transient  # network; a non-transient one without a reply is a bug
        if 400 <= self.reply_code <= 499:
            return True
        if 500 <= self.reply_code <= 599:
            return self.phase in _SESSION_PHASES
        return self.transient

    @property
    def may_have_message(self) -> bool:
        """The connection was lost after the whole message was sent, before its reply: the
        relay may have queued it, so it must not be given to another relay now."""
        return self.phase is Phase.REPLY and self.reply_code is None


def _in_phase(error: SmtpError, phase: Phase) -> SmtpError:
    if error.phase is None:
        error.phase = phase
    return error


SMTPUTF8_UNSUPPORTED = "SMTPUTF8_UNSUPPORTED"


class SmtpUtf8Unsupported(SmtpError):
    """This relay's EHLO reply does not advertise SMTPUTF8, and the message needs it (a
    non-ASCII local part). Permanent for this relay: asking it again cannot help. Raised
    before MAIL FROM, so the relay has nothing of the message; a relay that does advertise
    SMTPUTF8 may still take it."""

    def __init__(self) -> None:
        super().__init__(
            SMTPUTF8_UNSUPPORTED,
            "the recipient's local part is not ASCII and the relay does not offer SMTPUTF8",
            transient=False,
            phase=Phase.EHLO,
        )


# Replies about our session rather than this email: missing, wrong or too weak
# credentials (RFC 4954) or TLS required. They are TRANSIENT on purpose: the message is
# fine and the relay configuration is not, so the delivery must be retried and end up in
# the dead-letter topic (retries_exhausted), from where it is replayed once the
# credentials are fixed. Classed as permanent they would fail every email for good.
_SESSION_CODES = frozenset({530, 534, 535, 538})
# Raised while opening the session (greeting, EHLO, AUTH): again about the relay, not
# the message, whatever the reply code.
_SESSION_ERRORS = (
    smtplib.SMTPConnectError,
    smtplib.SMTPHeloError,
    smtplib.SMTPAuthenticationError,
)


def _decode(text: bytes | str) -> str:
    return text.decode("utf-8", "replace") if isinstance(text, bytes) else text


def _from_reply(code: int, text: bytes | str, *, session: bool = False) -> SmtpError:
    name = f"SMTP_{code}" if 200 <= code <= 599 else "SMTP_ERROR"
    # Only a definite 5xx about this message is permanent; unknown codes may pass.
    permanent = 500 <= code <= 599 and code not in _SESSION_CODES and not session
    reply_code = code if 200 <= code <= 599 else None
    return SmtpError(
        name, f"{code} {_decode(text)}", transient=not permanent, reply_code=reply_code
    )


def _from_os_error(exc: OSError, message: str) -> SmtpError:
    if isinstance(exc, TimeoutError):
        code = "TIMEOUT"
    elif isinstance(exc, ConnectionRefusedError):
        code = "CONN_REFUSED"
    elif isinstance(exc, ConnectionError):  # reset, aborted, broken pipe
        code = "CONN_RESET"
    elif isinstance(exc, ssl.SSLError):
        code = "TLS_ERROR"
    else:  # DNS failures, unreachable networks, ...
        code = "NETWORK_ERROR"
    return SmtpError(code, message or type(exc).__name__, transient=True)


def _from_disconnect(exc: smtplib.SMTPServerDisconnected) -> SmtpError:
    # smtplib turns socket errors (a read timeout too) into SMTPServerDisconnected
    # raised inside its `except OSError`; the socket error tells what really happened.
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, OSError):
        return _from_os_error(cause, str(exc))
    return SmtpError("DISCONNECTED", str(exc) or "server disconnected", transient=True)


def classify(exc: BaseException) -> SmtpError:
    """Map an smtplib/socket exception to an `SmtpError` (4xx and network: transient;
    5xx: permanent, except session/authentication replies, see `_SESSION_CODES`)."""
    if isinstance(exc, SmtpError):
        return exc
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        code, text = next(iter(exc.recipients.values()), (-1, b"recipient refused"))
        return _from_reply(code, text)
    if isinstance(exc, smtplib.SMTPResponseException):  # sender/data refused, auth, ...
        return _from_reply(exc.smtp_code, exc.smtp_error, session=isinstance(exc, _SESSION_ERRORS))
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return _from_disconnect(exc)
    if isinstance(exc, smtplib.SMTPException):  # e.g. STARTTLS not offered; an OSError too
        return SmtpError("SMTP_ERROR", str(exc), transient=True)
    if isinstance(exc, OSError):
        return _from_os_error(exc, str(exc))
    # Not a delivery problem but a bug (e.g. a malformed message): retrying cannot help.
    return SmtpError("UNEXPECTED", f"{type(exc).__name__}: {exc}", transient=False)


# --- connections -----------------------------------------------------------------------


_LEADING_DOT = re.compile(rb"(?m)^\.")


class _Connection(smtplib.SMTP):
    """Notes how far the current transaction got (`phase`), and whether the server accepted
    MAIL FROM in it: until it has, nothing of this message was delivered and resending it
    cannot duplicate it."""

    mail_accepted = False
    phase = Phase.EHLO
    # The text of the last DATA reply: the relay may name its own id for the message there.
    data_reply = b""

    def offers_smtputf8(self) -> bool:
        """Whether this relay's EHLO reply advertises SMTPUTF8: asked of each connection, so
        each relay answers for itself (no table of which relay can)."""
        self.ehlo_or_helo_if_needed()
        return self.does_esmtp and self.has_extn("smtputf8")

    def send_bytes(
        self, sender: str, recipients: Sequence[str], data: bytes, *, smtputf8: bool = False
    ) -> None:
        """One transaction, raising smtplib's exceptions like `sendmail`. Where the relay
        offers PIPELINING (RFC 2920; Postfix, SES, SendGrid, Gmail do) MAIL, RCPT and DATA go
        in one write and their replies are read in order: one round trip instead of three,
        and on a busy instance every round trip is a wake-up that queues for a core. Without
        it each command waits for its reply. `phase` follows the replies either way.

        `smtputf8`: the envelope or headers are UTF-8; raises `SmtpUtf8Unsupported` before
        any command when the relay does not advertise SMTPUTF8."""
        self.phase = Phase.EHLO
        self.ehlo_or_helo_if_needed()
        mail_options = self._mail_options(smtputf8)
        if self.does_esmtp and self.has_extn("size"):
            mail_options.append(f"SIZE={len(data)}")
        options = "".join(f" {option}" for option in mail_options)
        encoding = "utf-8" if smtputf8 else "ascii"
        pipelined = self.does_esmtp and self.has_extn("pipelining")
        commands = [f"MAIL FROM:{_quoted(sender)}{options}"]
        commands += [f"RCPT TO:{_quoted(address)}" for address in recipients]
        commands.append("DATA")
        if pipelined:
            self.send("".join(command + "\r\n" for command in commands).encode(encoding))

        def reply_to(command: str) -> tuple[int, bytes]:
            if not pipelined:
                self.send(f"{command}\r\n".encode(encoding))
            return self.getreply()

        # Any error below leaves replies unread: the caller closes the connection, and the
        # relay drops a transaction whose DATA never ended.
        self.phase = Phase.MAIL
        code, text = reply_to(commands[0])
        if code != 250:
            raise smtplib.SMTPSenderRefused(code, text, sender)
        self.mail_accepted = True
        self.phase = Phase.RCPT
        refused = {}
        for address, command in zip(recipients, commands[1:-1], strict=True):
            code, text = reply_to(command)
            if code not in (250, 251):
                refused[address] = (code, text)
        if not pipelined and len(refused) == len(recipients):
            raise smtplib.SMTPRecipientsRefused(refused)  # DATA is never sent
        self.phase = Phase.DATA
        code, text = reply_to(commands[-1])
        if len(refused) == len(recipients):
            self.phase = Phase.RCPT
            raise smtplib.SMTPRecipientsRefused(refused)
        if code != 354:
            raise smtplib.SMTPDataError(code, text)
        body = _LEADING_DOT.sub(b"..", data)  # dot-stuffing, as smtplib.SMTP.data does
        if body[-2:] != b"\r\n":
            body += b"\r\n"
        self.send(body + b".\r\n")
        self.phase = Phase.REPLY
        code, text = self.getreply()
        self.data_reply = text
        if code != 250:
            raise smtplib.SMTPDataError(code, text)

    def _mail_options(self, smtputf8: bool) -> list[str]:
        if not smtputf8:
            return []
        if not self.offers_smtputf8():
            raise SmtpUtf8Unsupported
        # As smtplib's send_message does for an international message: RFC 6531 servers
        # offer 8BITMIME, and the UTF-8 header block is 8-bit data.
        return ["SMTPUTF8", "BODY=8BITMIME"] if self.has_extn("8bitmime") else ["SMTPUTF8"]


# Characters that a bare addr-spec (what the worker sends to: `rules.normalise_address`,
# EMAIL_FROM's address) never holds: anything else goes through smtplib's parser.
_NOT_BARE = frozenset('<>"() ,;:\\[]\t\r\n')


def _quoted(address: str) -> str:
    """`<address>`, as `smtplib.quoteaddr` makes it, without its RFC 5322 parser (a tenth of
    the whole send) for the plain addresses every email has."""
    if address and address.count("@") == 1 and _NOT_BARE.isdisjoint(address):
        return f"<{address}>"
    return smtplib.quoteaddr(address)


class _SslConnection(_Connection, smtplib.SMTP_SSL):
    pass


class _StaleConnection(Exception):
    """A kept connection was closed by the server while idle; nothing was accepted."""


def _close_quietly(connection: smtplib.SMTP) -> None:
    with contextlib.suppress(OSError):
        connection.close()


def _is_stale(connection: _Connection, exc: Exception) -> bool:
    if connection.mail_accepted:
        return False
    if isinstance(exc, smtplib.SMTPSenderRefused):
        # Servers often queue "421 timeout, closing" on an idle connection, which we then
        # read as the reply to MAIL.
        return exc.smtp_code == 421
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        # A read timeout is a slow server, not a dead connection: do not double the wait.
        return not isinstance(exc.__cause__ or exc.__context__, TimeoutError)
    return isinstance(exc, ConnectionError)


@dataclass
class _Idle:
    connection: _Connection
    since: float


class SmtpSender:
    """Sends messages over kept-open SMTP connections.

    A warm Cloud Functions instance reuses the connections across invocations; the idle
    pool (a list under a lock) lets concurrent invocations in one instance each use their
    own connection. A connection goes back only after a successful send.
    """

    def __init__(
        self,
        settings: SmtpSettings,
        *,
        max_idle: int | None = None,
        max_idle_seconds: float = 60.0,
    ) -> None:
        self.settings = settings
        # Sized from CONCURRENCY (settings.max_idle_connections) unless given.
        self._max_idle = settings.max_idle_connections if max_idle is None else max_idle
        # Idle connections may be dropped silently by NAT/firewalls (no FIN), which would
        # only show as a TIMEOUT on the next use; retire them well before that.
        self._max_idle_seconds = max_idle_seconds
        self._context: ssl.SSLContext | None = None
        if settings.security != "none":
            self._context = ssl.create_default_context(cafile=settings.ca_file)
        self._idle: list[_Idle] = []
        self._lock = threading.Lock()

    def send(self, message: OutgoingEmail) -> str | None:
        """Deliver one message or raise `SmtpError`; returns the relay's own id for it when
        its `250` reply names one (`relay_message_id`, docs/reference.md)."""
        connection = self._take_idle()
        if connection is not None:
            try:
                return self._deliver(connection, message, reused=True)
            except _StaleConnection:
                pass  # reopen below and resend at once: not a failed attempt
        return self._deliver(self._open(), message, reused=False)

    def close(self) -> None:
        """Close every idle connection (connections in use are closed on return)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for entry in idle:
            try:
                entry.connection.quit()
            except (smtplib.SMTPException, OSError):
                _close_quietly(entry.connection)

    def _deliver(
        self, connection: _Connection, message: OutgoingEmail, *, reused: bool
    ) -> str | None:
        connection.mail_accepted = False
        connection.data_reply = b""
        connection.phase = Phase.EHLO
        try:
            connection.send_bytes(
                message.sender, message.recipients, message.data, smtputf8=message.smtputf8
            )
        except SmtpUtf8Unsupported:
            self._put_back(connection)  # refused before MAIL FROM: the session is clean
            raise
        except (smtplib.SMTPException, OSError) as exc:
            _close_quietly(connection)  # its state is unknown after an error
            if reused and _is_stale(connection, exc):
                raise _StaleConnection from exc
            raise _in_phase(classify(exc), connection.phase) from exc
        relay_id = relay_message_id(connection.data_reply)
        self._put_back(connection)
        return relay_id

    def _open(self) -> _Connection:
        settings = self.settings
        connection: _Connection | None = None
        phase = Phase.CONNECT
        try:
            if settings.security == "ssl":
                connection = _SslConnection(
                    settings.host,
                    settings.port,
                    timeout=settings.timeout_seconds,
                    context=self._context,
                )
            else:
                connection = _Connection(
                    settings.host, settings.port, timeout=settings.timeout_seconds
                )
            if settings.security == "starttls":
                phase = Phase.TLS
                connection.starttls(context=self._context)
            if settings.username:
                phase = Phase.AUTH
                connection.login(settings.username, settings.password or "")
        except (smtplib.SMTPException, OSError) as exc:
            if connection is not None:
                _close_quietly(connection)
            raise _in_phase(classify(exc), phase) from exc
        return connection

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        expired: list[_Idle] = []
        taken: _Connection | None = None
        with self._lock:
            while self._idle and taken is None:
                entry = self._idle.pop()  # most recently used first: most likely alive
                if now - entry.since > self._max_idle_seconds:
                    expired.append(entry)
                else:
                    taken = entry.connection
        for entry in expired:
            _close_quietly(entry.connection)
        return taken

    def _put_back(self, connection: _Connection) -> None:
        with self._lock:
            if len(self._idle) < self._max_idle:
                self._idle.append(_Idle(connection, time.monotonic()))
                return
        _close_quietly(connection)


# --- retry policy ----------------------------------------------------------------------


@dataclass(frozen=True)
class SendResult:
    attempts: int
    error: SmtpError | None
    relay_message_id: str | None = None  # what the relay's 250 reply named, if anything

    @property
    def ok(self) -> bool:
        return self.error is None


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, SmtpError) and exc.transient


class Sends(Protocol):
    """What `send_with_retry` sends through: one relay (`SmtpSender`) or several
    (worker/delivery/relays.py)."""

    def send(self, message: OutgoingEmail) -> str | None: ...


def send_with_retry(
    sender: Sends,
    message: OutgoingEmail,
    *,
    tries: int,
    initial_backoff: float,
    max_backoff: float,
    on_retry: Callable[[SmtpError, int], None] | None = None,
    deadline: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> SendResult:
    """Send, retrying transient `SmtpError`s within this invocation.

    At most `tries` attempts; a permanent error stops at once. Waits grow exponentially
    from `initial_backoff` up to `max_backoff` with "equal jitter" (half fixed, half
    random): the fixed half respects a relay that asked us to slow down (421/451), the
    random half keeps instances that failed together from retrying together.

    No retry starts if it would begin after `deadline` seconds: the pipeline passes the
    lease rule's window (`settings.send_window`), so a pathologically slow relay cannot
    push an attempt past the claim's lease; Pub/Sub redelivery takes over from there.
    Without a deadline only `tries` bounds it.

    `on_retry(error, attempt_number)` runs before each wait, `sleep(seconds)` waits.
    Never raises `SmtpError`.
    """
    if tries < 1:
        raise ValueError("tries must be at least 1")
    # The first attempt runs bare: building and entering a tenacity `Retrying` costs about as
    # much as writing the message, on every email, for a failure that is rare.
    started = time.monotonic()
    try:
        return SendResult(1, None, sender.send(message))
    except SmtpError as error:
        if tries == 1 or not _is_transient(error):
            return SendResult(1, error)
        first_error = error
    if deadline is not None:
        deadline -= time.monotonic() - started
    half, half_max = initial_backoff / 2, max_backoff / 2
    attempts = 0

    def before_sleep(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        if on_retry is not None and isinstance(error, SmtpError):
            on_retry(error, state.attempt_number)

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(tries)
        | tenacity.stop_before_delay(float("inf") if deadline is None else deadline),
        wait=tenacity.wait_exponential(multiplier=half, max=half_max)
        + tenacity.wait_random_exponential(multiplier=half, max=half_max),
        retry=tenacity.retry_if_exception(_is_transient),
        before_sleep=before_sleep,
        sleep=sleep,
        reraise=True,
    )
    relay_id: str | None = None
    try:
        for attempt in retrying:
            with attempt:
                attempts += 1
                if attempts == 1:
                    # tenacity's first attempt is the one made above: its failure, replayed,
                    # so waits, the deadline and `on_retry`'s numbers run as for any other.
                    raise first_error
                relay_id = sender.send(message)
    except SmtpError as error:
        return SendResult(attempts, error)
    return SendResult(attempts, None, relay_id)
