"""Pub/Sub publishers, each creating its client on first use.

A `Publisher` is held by whatever needs one: the function's worker holds its dead-letter
publisher (worker/delivery/deadletter.py), and the commands share the module's default one through
`publish()`. `google.cloud.pubsub_v1` is imported only when a client is made, so importing
this module (and `main`) stays cheap; only paths that actually publish pay for the library.
The emulator is honoured by the library itself through `PUBSUB_EMULATOR_HOST`, read when the
client is made: call `reset_client()` (or `Publisher.close()`) after changing it.

`subscriber_client()` makes the synchronous-pull client `replay` uses, with one message-size
bound on both paths: the library gives the channel it makes for the emulator gRPC's default
4 MiB receive limit (a 5 MB dead letter could not be pulled), and its production channel no
limit at all; both get `MAX_GRPC_MESSAGE_BYTES`, twice the largest message Pub/Sub accepts.

`publish()` waits for the server's message id and is bounded by `timeout`: the library's
default publish retry keeps trying an unreachable server for 600 seconds, so every call
passes its own retry (total deadline = `timeout`) and per-attempt RPC timeout, and the
caller also stops waiting on the future after `timeout` seconds.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Mapping
from typing import Any

__all__ = [
    "MAX_GRPC_MESSAGE_BYTES",
    "PublishError",
    "Publisher",
    "publish",
    "reset_client",
    "subscriber_client",
]

# Extra time the caller waits on the future beyond the retry deadline, so the library's own
# (more specific) error wins over a bare "timed out" when both are due.
_RESULT_GRACE_SECONDS = 1.0


# Pub/Sub accepts messages of up to 10 MB; a pull response carries whole messages, so twice
# that always lets one message (with its attributes) through.
MAX_GRPC_MESSAGE_BYTES = 20 * 1024 * 1024


def channel_options(max_bytes: int = MAX_GRPC_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]


def subscriber_client(max_bytes: int = MAX_GRPC_MESSAGE_BYTES) -> Any:
    """A `SubscriberClient` whose channel sends and receives messages of up to `max_bytes`,
    against the emulator (`PUBSUB_EMULATOR_HOST`) and in production alike."""
    from google.cloud.pubsub_v1 import SubscriberClient  # deferred: cold start
    from google.pubsub_v1.services.subscriber.transports.grpc import SubscriberGrpcTransport

    options = channel_options(max_bytes)
    emulator = os.environ.get("PUBSUB_EMULATOR_HOST")
    if emulator:
        import grpc

        # The library would make this channel itself, without options (4 MiB receive).
        channel = grpc.insecure_channel(emulator, options=options)
        return SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))

    class SizedTransport(SubscriberGrpcTransport):
        """The library's transport, host and credentials, with our size bounds."""

        @classmethod
        def create_channel(cls, *args: Any, **kwargs: Any) -> Any:
            kept = [(k, v) for k, v in kwargs.pop("options", None) or () if k not in dict(options)]
            return super().create_channel(*args, options=kept + options, **kwargs)

    return SubscriberClient(transport=SizedTransport)


class PublishError(Exception):
    """A message could not be confirmed as published. `str(error)` is one line."""


class Publisher:
    """One lazily made `PublisherClient`, reused for every publish until `close()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: Any = None  # google.cloud.pubsub_v1.PublisherClient

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                from google.cloud.pubsub_v1 import PublisherClient  # deferred: cold start

                self._client = PublisherClient()
            return self._client

    def close(self) -> None:
        """Drop the client; the next publish makes a new one."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            # stop() is non-blocking and flushes anything still batched; if it fails (already
            # stopped, a broken client) the client is dropped all the same.
            with contextlib.suppress(Exception):
                client.stop()

    def publish(
        self, topic_path: str, data: bytes, attributes: Mapping[str, str], *, timeout: float
    ) -> str:
        """Publish one message and return the server's message id once it is confirmed.

        Raises `PublishError` (one line, naming the topic) for any failure: server
        unreachable, topic not found, rejected message, or no confirmation within `timeout`
        seconds.
        """
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        try:
            future = self.client().publish(
                topic_path,
                data,
                retry=_retry(timeout),
                # The RPC timeout: api_core gives each attempt what is left of it.
                timeout=timeout,
                **dict(attributes),
            )
        except Exception as error:
            raise PublishError(f"publish to {topic_path} failed: {_one_line(error)}") from error
        try:
            message_id = future.result(timeout=timeout + _RESULT_GRACE_SECONDS)
        except TimeoutError:
            future.cancel()
            raise PublishError(
                f"publish to {topic_path} not confirmed within {timeout:g} seconds"
            ) from None
        except Exception as error:
            raise PublishError(f"publish to {topic_path} failed: {_one_line(error)}") from error
        return str(message_id)


# The commands' publisher (python -m worker publish/replay, the local stack).
_default = Publisher()


def _client() -> Any:
    return _default.client()


def reset_client() -> None:
    """Drop the default publisher's client; the next `publish()` makes a new one.

    Used by tests and the CLI, e.g. after changing `PUBSUB_EMULATOR_HOST`.
    """
    _default.close()


def _retry(timeout: float) -> Any:
    """The library's default publish retry, with its total deadline cut to `timeout`."""
    from google.api_core import exceptions, retry

    return retry.Retry(
        initial=0.1,
        maximum=min(60.0, max(timeout / 4, 0.1)),
        multiplier=1.3,
        predicate=retry.if_exception_type(
            exceptions.Aborted,
            exceptions.Cancelled,
            exceptions.DeadlineExceeded,
            exceptions.InternalServerError,
            exceptions.ResourceExhausted,
            exceptions.ServiceUnavailable,
            exceptions.Unknown,
        ),
        timeout=timeout,
    )


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def publish(topic_path: str, data: bytes, attributes: Mapping[str, str], *, timeout: float) -> str:
    """`Publisher.publish` with the default publisher."""
    return _default.publish(topic_path, data, attributes, timeout=timeout)
