"""A local SMTP server for the local stack: saves every accepted email as a `.eml` file.

aiosmtpd in a thread on 127.0.0.1 (no TLS, no AUTH: the function runs with
`SMTP_SECURITY=none`). Each accepted message is written, as received, to
`<directory>/<UTC time>_<Message-ID>.eml` (written to a temp name, then renamed, so a reader
never sees half a file). Addresses in `refused` are answered at RCPT with the given reply,
e.g. `550 5.1.1 no such user`, so the permanent-failure path can be seen end to end.
"""

from __future__ import annotations

import datetime as dt
import re
import secrets
import socket
import threading
from collections.abc import Mapping
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

HOST = "127.0.0.1"
_UNSAFE = re.compile(r"[^A-Za-z0-9._@=+-]+")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def eml_name(received_at: dt.datetime, message_id: str | None) -> str:
    """`20261122T001530.123Z_demo-invite@example.com.eml`: sorts by time, says which email."""
    stamp = received_at.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%S.%f")[:-3] + "Z"
    ident = _UNSAFE.sub("_", (message_id or "").strip().strip("<>")).strip("._") or "no-message-id"
    return f"{stamp}_{ident[:150]}.eml"


class _Handler:
    def __init__(self, sink: EmlSink) -> None:
        self._sink = sink

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self._sink.refused.get(address.lower())
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = bytes(envelope.original_content or b"")
        self._sink.save(raw)
        # Like Postfix (and SendGrid, Postmark): the reply names the relay's own id, which
        # the worker records as relay_message_id and provider events may refer to.
        return f"250 2.0.0 Ok: queued as {secrets.token_hex(6).upper()}"


class EmlSink:
    """`EmlSink(dir, refused={"bounce@example.com": "550 5.1.1 no such user"}).start()`."""

    def __init__(
        self,
        directory: Path,
        *,
        refused: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.directory = directory
        self.refused = {address.lower(): reply for address, reply in (refused or {}).items()}
        self.host = HOST
        self.port = port or _free_port()
        self._lock = threading.Lock()
        self._saved: list[Path] = []
        self._controller: Controller | None = None

    def start(self) -> EmlSink:
        self.directory.mkdir(parents=True, exist_ok=True)
        controller = Controller(
            _Handler(self),
            hostname=self.host,
            port=self.port,
            server_hostname="localhost",  # avoids socket.getfqdn() per connection
            ready_timeout=10.0,
        )
        controller.start()
        self._controller = controller
        return self

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    @property
    def saved(self) -> list[Path]:
        """The files written so far, in the order they arrived."""
        with self._lock:
            return list(self._saved)

    def save(self, raw: bytes) -> Path:
        headers = BytesParser(policy=default_policy).parsebytes(raw, headersonly=True)
        message_id = headers.get("Message-ID")
        with self._lock:
            name = eml_name(dt.datetime.now(dt.UTC), str(message_id) if message_id else None)
            path = self.directory / name
            counter = 1
            while path.exists():  # the same Message-ID twice in one millisecond: keep both
                counter += 1
                path = self.directory / f"{name[:-4]}.{counter}.eml"
            partial = path.with_name(path.name + ".partial")
            partial.write_bytes(raw)
            partial.rename(path)
            self._saved.append(path)
        return path


__all__ = ["EmlSink", "eml_name"]
