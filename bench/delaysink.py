"""A minimal asyncio SMTP sink that answers the end of DATA after a fixed delay.

smtp-sink's delays (`-w`, `-W`) are whole seconds; a relay's real cost per message is tens of
milliseconds, so the scale-out benchmark uses this instead:

    python -m bench.delaysink --port 2525 --delay-ms 20 --ids /tmp/ids

Every accepted message's Message-ID is appended to `--ids` (one per line, flushed at once), so
the benchmark counts duplicate emails by Message-ID. Speaks just enough ESMTP for smtplib:
EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT; no AUTH, no TLS. It offers PIPELINING, as
production relays do (RFC 2920): commands sent together are answered in order, in one write. Each
connection waits its own delay, so many connections are served at once, like a relay.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from typing import IO

_EHLO = (
    b"250-bench-delaysink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
    b"250 SIZE 33554432\r\n"
)
_REPLIES = {
    b"EHLO": _EHLO,
    b"HELO": b"250 bench-delaysink\r\n",
    b"MAIL": b"250 2.1.0 Ok\r\n",
    b"RCPT": b"250 2.1.5 Ok\r\n",
    b"RSET": b"250 2.0.0 Ok\r\n",
    b"NOOP": b"250 2.0.0 Ok\r\n",
}


def message_id(data: bytes) -> str:
    """The Message-ID header of a raw message (headers end at the first empty line)."""
    head = data.split(b"\r\n\r\n", 1)[0]
    unfolded = head.replace(b"\r\n ", b" ").replace(b"\r\n\t", b" ")
    for line in unfolded.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"message-id":
            return value.strip().decode("ascii", "replace")
    return "(none)"


class Sink:
    def __init__(self, delay: float, ids: IO[str]) -> None:
        self.delay = delay
        self.ids = ids
        self.accepted = 0

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._converse(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lines = _Lines(reader)
        replies = bytearray(b"220 bench-delaysink ESMTP\r\n")
        while True:
            # Replies to pipelined commands go out together, once every command that arrived
            # with them is answered, as Postfix's smtpd does (RFC 2920 section 3.2): one
            # segment, one wake-up for the client, instead of one per command.
            if not lines.has_command():
                writer.write(replies)
                replies.clear()
                await writer.drain()
            line = await lines.line()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"DATA":
                writer.write(replies + b"354 End data with <CR><LF>.<CR><LF>\r\n")
                replies.clear()
                await writer.drain()
                data = await lines.until(b"\r\n.\r\n")
                await asyncio.sleep(self.delay)
                self.ids.write(message_id(data) + "\n")
                self.ids.flush()
                self.accepted += 1
                replies += b"250 2.0.0 Ok: queued\r\n"
            elif verb == b"QUIT":
                writer.write(replies + b"221 2.0.0 Bye\r\n")
                await writer.drain()
                return
            else:
                replies += _REPLIES.get(verb, b"502 5.5.2 Error: command not recognized\r\n")


class _Lines:
    """What the client sent, read as it arrives: whole lines, or up to a marker."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.buffer = bytearray()

    def has_command(self) -> bool:
        """A whole command line has arrived and is waiting for its answer."""
        return b"\n" in self.buffer

    async def line(self) -> bytes:
        """The next line with its ending, or b"" when the client has gone."""
        return await self.until(b"\n")

    async def until(self, marker: bytes) -> bytes:
        while (end := self.buffer.find(marker)) < 0:
            chunk = await self.reader.read(1 << 16)
            if not chunk:
                return b""
            self.buffer += chunk
        end += len(marker)
        taken = bytes(self.buffer[:end])
        del self.buffer[:end]
        return taken


async def serve(port: int, delay: float, ids_path: str) -> None:
    with open(ids_path, "a", encoding="utf-8") as ids:
        sink = Sink(delay, ids)
        server = await asyncio.start_server(
            sink.session, "127.0.0.1", port, backlog=1000, limit=64 * 1024 * 1024
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        async with server:
            print(f"listening on 127.0.0.1:{port}, delay {delay * 1000:g} ms", flush=True)
            await stop.wait()
        print(f"accepted {sink.accepted} messages", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="an SMTP sink with a per-message delay")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=20.0)
    parser.add_argument("--ids", required=True, help="file to append accepted Message-IDs to")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.delay_ms / 1000, args.ids))


if __name__ == "__main__":
    main()
