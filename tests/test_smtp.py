"""worker.delivery.smtp against a real aiosmtpd server (tests/harness/smtp.py); no mocks."""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from email import message_from_bytes, policy
from email.header import decode_header, make_header
from email.message import EmailMessage
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.harness.smtp import SmtpTestServer, Stage
from worker.core.redact import sanitise
from worker.delivery.config import SmtpSettings
from worker.delivery.smtp import (
    OutgoingEmail,
    Phase,
    SendResult,
    SmtpError,
    SmtpSender,
    build_message,
    classify,
    message_id_for,
    send_with_retry,
)
from worker.delivery.smtp import _quoted as quoted_envelope_address

# aiosmtpd itself warns when a login succeeds; nothing to fix on our side.
pytestmark = pytest.mark.filterwarnings("ignore:Session.login_data is deprecated")

MakeServer = Callable[..., SmtpTestServer]
ATEXT_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
FAST_RETRY: dict[str, Any] = {"initial_backoff": 0.01, "max_backoff": 0.02}


def make_message(settings: SmtpSettings, delivery_id: str = "inv_2f6c9d1e") -> OutgoingEmail:
    return build_message(
        settings,
        delivery_id=delivery_id,
        recipient="ada@example.com",
        subject="Join Acme",
        text="Hello Ada, join Acme: https://app.example.com/i/abc — café",
        html="<p>Hello Ada, <a href='https://app.example.com/i/abc'>join</a> — café</p>",
    )


@pytest.fixture(params=[False, True], ids=["lockstep", "pipelining"])
def smtp_server(
    request: pytest.FixtureRequest, make_smtp_server: Callable[..., SmtpTestServer]
) -> SmtpTestServer:
    """A plain SMTP server without AUTH, once without and once with PIPELINING (RFC 2920):
    every test that uses it checks both ways of sending a transaction."""
    server: SmtpTestServer = make_smtp_server(pipelining=request.param)
    return server


@pytest.fixture
def sender(smtp_server: SmtpTestServer) -> Iterator[SmtpSender]:
    sender = SmtpSender(smtp_server.settings(timeout_seconds=2.0))
    yield sender
    sender.close()


def send_error(sender: SmtpSender, message: OutgoingEmail) -> SmtpError:
    with pytest.raises(SmtpError) as caught:
        sender.send(message)
    return caught.value


# --- message ---------------------------------------------------------------------------


def test_delivers_headers_and_both_parts(smtp_server: SmtpTestServer) -> None:
    settings = smtp_server.settings(reply_to="help@example.com")
    sender = SmtpSender(settings)
    sender.send(make_message(settings))
    sender.close()

    [received] = smtp_server.messages
    assert received.mail_from == "noreply@example.com"
    assert received.rcpt_tos == ("ada@example.com",)
    message = received.message
    assert message["From"] == "Example <noreply@example.com>"
    assert message["To"] == "ada@example.com"
    assert message["Subject"] == "Join Acme"
    assert message["Reply-To"] == "help@example.com"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["Message-ID"] == "<inv_2f6c9d1e@example.com>"
    assert message["Date"].datetime.tzinfo is not None
    assert message.get_content_type() == "multipart/alternative"
    plain, html = message.get_body(("plain",)), message.get_body(("html",))
    assert plain is not None and html is not None
    assert "café" in plain.get_content() and plain.get_content_charset() == "utf-8"
    assert "<a href=" in html.get_content()
    assert received.raw.isascii()  # quoted-printable: no 8BITMIME needed


def parsed(message: OutgoingEmail) -> EmailMessage:
    result = message_from_bytes(message.data, policy=policy.default)
    assert isinstance(result, EmailMessage)
    return result


def test_no_reply_to_unless_configured(smtp_server: SmtpTestServer) -> None:
    message = make_message(smtp_server.settings())
    assert "Reply-To" not in parsed(message)


def test_wire_format_survives_awkward_text(smtp_server: SmtpTestServer) -> None:
    settings = smtp_server.settings(sender="Équipe Acme <noreply@example.com>")
    text = ".leading dot\nFrom the start\n--=_not-a-boundary\r\nlong " + "x" * 300 + "\n= sign"
    message = build_message(
        settings,
        delivery_id="awk",
        recipient="ada@example.com",
        subject="Votre code — " + "é" * 80,
        text=text,
        html="<p>" + text + "</p>",
    )
    assert message.data.isascii() and b"\n" not in message.data.replace(b"\r\n", b"")
    assert all(len(line) <= 998 for line in message.data.split(b"\r\n"))
    sender = SmtpSender(settings)
    sender.send(message)
    sender.close()
    received = smtp_server.messages[-1].message
    assert received["Subject"] == "Votre code — " + "é" * 80
    assert received["From"].addresses[0].display_name == "Équipe Acme"
    plain = received.get_body(("plain",))
    html = received.get_body(("html",))
    assert plain is not None and html is not None
    assert plain.get_content().replace("\r\n", "\n") == text.replace("\r\n", "\n")
    assert "--=_not-a-boundary" in html.get_content()


def test_subject_is_one_line(smtp_server: SmtpTestServer) -> None:
    settings = smtp_server.settings()
    message = build_message(
        settings,
        delivery_id="x",
        recipient="a@example.com",
        subject="a\r\nBcc: b",
        text="",
        html="",
    )
    assert parsed(message)["Subject"] == "a Bcc: b"


def _header_lines(message: OutgoingEmail, name: str) -> list[bytes]:
    """The raw lines of header `name`, its folded continuation lines included."""
    head = message.data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    start = next(i for i, line in enumerate(head) if line.startswith(name.encode() + b":"))
    end = start + 1
    while end < len(head) and head[end][:1] in (b" ", b"\t"):
        end += 1
    return head[start:end]


def test_date_is_utc_as_plus_0000_not_gmt(smtp_server: SmtpTestServer) -> None:
    [line] = _header_lines(make_message(smtp_server.settings()), "Date")
    # RFC 5322 section 4.3: `GMT` is obsolete syntax and must not be generated.
    assert re.fullmatch(
        rb"Date: [A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d \+0000", line
    )


ENCODED_WORD = re.compile(rb"=\?[^?]+\?[BbQq]\?[^?]*\?=")


SUBJECT_TEXT = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=300
)
# Display names as people write them (parseaddr has its own rules for specials).
NAME_TEXT = st.text(st.characters(whitelist_categories=("L", "N", "Zs")), max_size=80)


@settings(max_examples=100, deadline=None)
@given(
    SUBJECT_TEXT.map(lambda s: " ".join(s.split())).filter(lambda s: not s.isascii()),
    NAME_TEXT.map(lambda s: " ".join(s.split())).filter(lambda s: not s.isascii()),
)
def test_non_ascii_subjects_and_names_are_rfc_2047_encoded_words(subject: str, name: str) -> None:
    settings = SmtpSettings(host="x", sender=f"{name} <noreply@example.com>")
    message = build_message(
        settings, delivery_id="d", recipient="a@example.com", subject=subject, text="", html=""
    )
    for header in ("Subject", "From"):
        lines = _header_lines(message, header)
        words = [word for line in lines for word in ENCODED_WORD.findall(line)]
        assert words and all(len(word) <= 75 for word in words)  # RFC 2047 section 2
        assert all(len(line) <= 78 for line in lines)  # RFC 5322 section 2.1.1
    assert parsed(message)["Subject"] == subject
    # The standard library's address parser keeps the folding space between two encoded-words
    # of one display name (its own generator's output does not read back either); RFC 2047
    # section 6.2 says to drop it, as decode_header does.
    raw_from = b"".join(_header_lines(message, "From")).decode("ascii")
    display = raw_from.removeprefix("From: ").removesuffix("<noreply@example.com>").strip()
    assert str(make_header(decode_header(display))) == name


@pytest.mark.parametrize(
    ("delivery_id", "expected"),
    [
        ("inv_2f6c9d1e", "<inv_2f6c9d1e@example.com>"),
        ("a.b-c_d", "<a.b-c_d@example.com>"),
        ("a@b:c..d", "<a=40b=3Ac.=2Ed@example.com>"),
        (".x.", "<=2Ex=2E@example.com>"),
        ("...", "<=2E=2E=2E@example.com>"),
    ],
)
def test_message_id_escapes_awkward_ids(
    smtp_server: SmtpTestServer, sender: SmtpSender, delivery_id: str, expected: str
) -> None:
    assert message_id_for(delivery_id, "example.com") == expected
    sender.send(make_message(smtp_server.settings(), delivery_id))
    assert smtp_server.messages[-1].message["Message-ID"] == expected


def _unescape(id_left: str) -> str:
    return re.sub(r"=([0-9A-F]{2})", lambda match: chr(int(match.group(1), 16)), id_left)


@settings(max_examples=300, deadline=None)
@given(st.from_regex(r"[A-Za-z0-9._:@-]{1,200}", fullmatch=True))
def test_message_id_is_a_valid_injective_dot_atom(delivery_id: str) -> None:
    message_id = message_id_for(delivery_id, "example.com")
    assert message_id == message_id_for(delivery_id, "example.com")
    id_left = message_id.removeprefix("<").removesuffix("@example.com>")
    assert ATEXT_DOT_ATOM.fullmatch(id_left)
    assert _unescape(id_left) == delivery_id  # decodable, hence injective


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.emails().map(str),
        st.text(alphabet=st.sampled_from('ab@.<>"() ,;:\\[]\t+-_'), max_size=20),
        st.text(max_size=20),
    )
)
@example("ann@example.com")
@example("Ann <ann@example.com>")
@example("a:b@c")
@example("a;b@c")
@example("a,b@c")
@example("a[b@c")
@example("a(b)@c")
@example("a@b c")
@example("a\tb@c")
@example('"a b"@c')
@example("a@b@c")
@example("")
def test_envelope_addresses_are_quoted_as_smtplib_quotes_them(address: str) -> None:
    # MAIL FROM and RCPT TO skip smtplib's RFC 5322 parser for plain addresses: the short
    # cut must give what the parser gives, for plain addresses and for anything else.
    assert quoted_envelope_address(address) == smtplib.quoteaddr(address)


# --- security and login ----------------------------------------------------------------


@pytest.mark.parametrize("tls", ["none", "starttls", "ssl"])
def test_security_modes_with_login(make_smtp_server: MakeServer, tls: str) -> None:
    server = make_smtp_server(tls=tls, username="mailer", password="s3cret")
    sender = SmtpSender(server.settings())
    sender.send(make_message(server.settings()))
    sender.close()
    assert len(server.messages) == 1


def test_wrong_password_is_transient_535(make_smtp_server: MakeServer) -> None:
    server = make_smtp_server(tls="starttls", username="mailer", password="s3cret")
    settings = server.settings(password="wrong")
    error = send_error(SmtpSender(settings), make_message(settings))
    assert error.code == "SMTP_535"
    assert error.transient  # configuration, not the email: retry, dead-letter, replay
    assert server.messages == []


def test_untrusted_certificate_is_tls_error(make_smtp_server: MakeServer) -> None:
    server = make_smtp_server(tls="starttls")
    settings = server.settings(ca_file=None)  # system store: does not know the test CA
    error = send_error(SmtpSender(settings), make_message(settings))
    assert (error.code, error.transient) == ("TLS_ERROR", True)


# --- classification against the server -------------------------------------------------


@pytest.mark.parametrize("at", ["mail", "rcpt", "data"])
@pytest.mark.parametrize(
    ("code", "transient"), [(421, True), (451, True), (550, False), (554, False)]
)
def test_reply_codes(
    smtp_server: SmtpTestServer, sender: SmtpSender, at: Stage, code: int, transient: bool
) -> None:
    smtp_server.fail_next(1, code, "4.3.0 try again" if transient else "5.7.1 rejected", at=at)
    error = send_error(sender, make_message(smtp_server.settings()))
    assert (error.code, error.transient) == (f"SMTP_{code}", transient)
    assert error.message.startswith(str(code))
    assert smtp_server.messages == []


def test_refused_recipient_is_permanent_and_masked(
    smtp_server: SmtpTestServer, sender: SmtpSender
) -> None:
    smtp_server.fail_recipient("ada@example.com", 550, "5.1.1 <ada@example.com>: unknown user")
    error = send_error(sender, make_message(smtp_server.settings()))
    assert (error.code, error.transient) == ("SMTP_550", False)
    assert "a***@example.com" in error.message and "ada@" not in error.message


def test_closed_port_is_conn_refused(smtp_server: SmtpTestServer) -> None:
    smtp_server.stop()
    settings = smtp_server.settings()
    error = send_error(SmtpSender(settings), make_message(settings))
    assert (error.code, error.transient) == ("CONN_REFUSED", True)


def test_slow_data_reply_is_timeout(smtp_server: SmtpTestServer) -> None:
    settings = smtp_server.settings(timeout_seconds=0.3)
    smtp_server.delay(1.0)
    error = send_error(SmtpSender(settings), make_message(settings))
    assert (error.code, error.transient) == ("TIMEOUT", True)


def test_dropped_connection_is_transient(smtp_server: SmtpTestServer, sender: SmtpSender) -> None:
    smtp_server.drop_next(1)
    error = send_error(sender, make_message(smtp_server.settings()))
    assert (error.code, error.transient) == ("DISCONNECTED", True)


def test_drop_after_data_on_kept_connection_is_not_resent(
    smtp_server: SmtpTestServer, sender: SmtpSender
) -> None:
    """The server may have accepted the message: resending silently could duplicate it."""
    sender.send(make_message(smtp_server.settings()))
    smtp_server.drop_next(1)
    error = send_error(sender, make_message(smtp_server.settings()))
    assert error.transient
    assert smtp_server.transactions == 2


# --- connections -----------------------------------------------------------------------


def test_connection_is_reused(smtp_server: SmtpTestServer, sender: SmtpSender) -> None:
    for _ in range(3):
        sender.send(make_message(smtp_server.settings()))
    assert (smtp_server.connections, len(smtp_server.messages)) == (1, 3)


def test_error_discards_the_connection(smtp_server: SmtpTestServer, sender: SmtpSender) -> None:
    smtp_server.fail_next(1, 451, "later")
    send_error(sender, make_message(smtp_server.settings()))
    sender.send(make_message(smtp_server.settings()))
    assert smtp_server.connections == 2


def test_reconnects_transparently_after_server_restart(
    smtp_server: SmtpTestServer, sender: SmtpSender
) -> None:
    sender.send(make_message(smtp_server.settings()))
    smtp_server.restart()  # the kept connection dies with the old server
    sender.send(make_message(smtp_server.settings()))
    assert len(smtp_server.messages) == 2
    assert smtp_server.connections == 2


def test_long_idle_connections_are_not_reused(smtp_server: SmtpTestServer) -> None:
    sender = SmtpSender(smtp_server.settings(), max_idle_seconds=0.0)
    sender.send(make_message(smtp_server.settings()))
    sender.send(make_message(smtp_server.settings()))
    sender.close()
    assert smtp_server.connections == 2


def test_close_then_send_opens_a_new_connection(
    smtp_server: SmtpTestServer, sender: SmtpSender
) -> None:
    sender.send(make_message(smtp_server.settings()))
    sender.close()
    sender.send(make_message(smtp_server.settings()))
    assert smtp_server.connections == 2


def test_concurrent_sends_from_threads(smtp_server: SmtpTestServer, sender: SmtpSender) -> None:
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for n in range(3):
                sender.send(make_message(smtp_server.settings(), f"t{worker}.{n}"))
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert errors == []
    ids = {received.message["Message-ID"] for received in smtp_server.messages}
    assert ids == {f"<t{w}.{n}@example.com>" for w in range(8) for n in range(3)}
    assert smtp_server.connections <= 8


# --- retry policy ----------------------------------------------------------------------


def test_retry_succeeds_after_two_transient_failures(
    smtp_server: SmtpTestServer, sender: SmtpSender
) -> None:
    smtp_server.fail_next(2, 451, "4.3.0 busy")
    calls: list[tuple[str, int]] = []
    result = send_with_retry(
        sender,
        make_message(smtp_server.settings()),
        tries=3,
        on_retry=lambda error, attempt: calls.append((error.code, attempt)),
        **FAST_RETRY,
    )
    assert result == SendResult(attempts=3, error=None) and result.ok
    assert calls == [("SMTP_451", 1), ("SMTP_451", 2)]
    assert (smtp_server.transactions, len(smtp_server.messages)) == (3, 1)


def test_retry_stops_at_once_on_permanent_error(
    smtp_server: SmtpTestServer, sender: SmtpSender
) -> None:
    smtp_server.fail_next(1, 550, "5.1.1 no such user")
    calls: list[int] = []
    result = send_with_retry(
        sender,
        make_message(smtp_server.settings()),
        tries=5,
        on_retry=lambda error, attempt: calls.append(attempt),
        **FAST_RETRY,
    )
    assert result.attempts == 1 and not result.ok
    assert result.error is not None and result.error.code == "SMTP_550"
    assert calls == [] and smtp_server.transactions == 1


def test_retry_gives_up_after_tries(smtp_server: SmtpTestServer, sender: SmtpSender) -> None:
    smtp_server.fail_next(10, 421, "4.7.0 slow down")
    result = send_with_retry(sender, make_message(smtp_server.settings()), tries=3, **FAST_RETRY)
    assert result.attempts == 3
    assert result.error is not None
    assert (result.error.code, result.error.transient) == ("SMTP_421", True)
    assert smtp_server.messages == []


def test_retry_respects_deadline(smtp_server: SmtpTestServer, sender: SmtpSender) -> None:
    smtp_server.fail_next(10, 451, "busy")
    message = make_message(smtp_server.settings())
    result = send_with_retry(sender, message, tries=5, deadline=0.0, **FAST_RETRY)
    assert result.attempts == 1 and result.error is not None


def test_retry_needs_at_least_one_try(sender: SmtpSender, smtp_server: SmtpTestServer) -> None:
    with pytest.raises(ValueError):
        send_with_retry(sender, make_message(smtp_server.settings()), tries=0, **FAST_RETRY)


# --- sanitising and classify -----------------------------------------------------------


def test_server_text_is_sanitised(smtp_server: SmtpTestServer, sender: SmtpSender) -> None:
    text = "5.7.1 <ada@example.com> blocked, see https://mx.example/help?t=secret " + "x" * 700
    smtp_server.fail_next(1, 554, text)
    error = send_error(sender, make_message(smtp_server.settings()))
    assert len(error.message) <= 500
    assert "a***@example.com" in error.message and "[url]" in error.message
    assert "ada@" not in error.message and "secret" not in error.message


def test_sanitise_collapses_control_characters() -> None:
    assert sanitise("one\r\ntwo\x00\tthree  four") == "one two three four"
    assert sanitise("Bob.Smith+tag@mail.example.org said hi") == "B***@mail.example.org said hi"
    assert len(sanitise("y" * 2000)) == 500


@pytest.mark.parametrize(
    ("exc", "code", "transient"),
    [
        (smtplib.SMTPServerDisconnected("gone"), "DISCONNECTED", True),
        (ConnectionResetError(104, "reset"), "CONN_RESET", True),
        (BrokenPipeError(32, "broken pipe"), "CONN_RESET", True),
        (ConnectionRefusedError(111, "refused"), "CONN_REFUSED", True),
        (TimeoutError("timed out"), "TIMEOUT", True),
        (ssl.SSLError(1, "bad handshake"), "TLS_ERROR", True),
        (socket.gaierror(-2, "Name or service not known"), "NETWORK_ERROR", True),
        (smtplib.SMTPSenderRefused(553, b"5.7.1 sender", "a@example.com"), "SMTP_553", False),
        (smtplib.SMTPDataError(452, b"4.3.1 full"), "SMTP_452", True),
        (smtplib.SMTPRecipientsRefused({"a@example.com": (550, b"no")}), "SMTP_550", False),
        (smtplib.SMTPAuthenticationError(535, b"5.7.8 bad credentials"), "SMTP_535", True),
        (smtplib.SMTPSenderRefused(530, b"5.7.0 auth required", "a@example.com"), "SMTP_530", True),
        (smtplib.SMTPConnectError(554, b"no service"), "SMTP_554", True),
        (smtplib.SMTPNotSupportedError("STARTTLS extension not supported"), "SMTP_ERROR", True),
        (ValueError("bad header"), "UNEXPECTED", False),
    ],
)
def test_classify(exc: BaseException, code: str, transient: bool) -> None:
    error = classify(exc)
    assert (error.code, error.transient) == (code, transient)
    assert error.message
    assert classify(error) is error


# --- how far a failed exchange got: what decides a failover (worker/delivery/relays.py) --------


@pytest.mark.parametrize(
    ("cue", "phase", "fails_over", "may_have_it"),
    [
        (("mail", 451), Phase.MAIL, True, False),
        (("mail", 550), Phase.MAIL, True, False),  # the relay's own sender policy
        (("rcpt", 452), Phase.RCPT, True, False),
        (("rcpt", 550), Phase.RCPT, False, False),  # about the recipient
        (("data", 451), Phase.REPLY, True, False),  # a 4xx to the message: it does not have it
        (("data", 554), Phase.REPLY, False, False),  # about the message
        (("drop", 0), Phase.REPLY, False, True),  # lost after the final `.`: it may have it
    ],
    ids=lambda value: "-".join(map(str, value)) if isinstance(value, tuple) else None,
)
def test_each_failure_knows_its_phase_and_whether_another_relay_may_take_it(
    smtp_server: SmtpTestServer,
    cue: tuple[str, int],
    phase: Phase,
    fails_over: bool,
    may_have_it: bool,
) -> None:
    stage, code = cue
    if stage == "drop":
        smtp_server.drop_next(1)
    else:
        smtp_server.fail_next(1, code, "scripted", at=stage)  # type: ignore[arg-type]
    sender = SmtpSender(smtp_server.settings())
    try:
        with pytest.raises(SmtpError) as caught:
            sender.send(make_message(sender.settings))
    finally:
        sender.close()
    error = caught.value
    assert (error.phase, error.fails_over, error.may_have_message) == (
        phase,
        fails_over,
        may_have_it,
    )


def test_a_refused_connection_and_a_failed_login_fail_over(
    make_smtp_server: Callable[..., SmtpTestServer],
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    refused = SmtpSender(
        SmtpSettings(host="127.0.0.1", port=port, security="none", timeout_seconds=2)
    )
    with pytest.raises(SmtpError) as caught:
        refused.send(make_message(refused.settings))
    assert (caught.value.code, caught.value.phase, caught.value.fails_over) == (
        "CONN_REFUSED",
        Phase.CONNECT,
        True,
    )
    server = make_smtp_server(username="u", password="right")
    login = SmtpSender(server.settings(password="wrong"))
    with pytest.raises(SmtpError) as caught:
        login.send(make_message(login.settings))
    assert (caught.value.code, caught.value.phase, caught.value.fails_over) == (
        "SMTP_535",
        Phase.AUTH,
        True,
    )
    assert caught.value.transient  # as before: the credentials, not the message
