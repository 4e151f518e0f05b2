"""The real Pub/Sub emulator for the tests.

- `pubsub_emulator` (session): starts `gcloud beta emulators pubsub start` on a free port in
  its own process group (the gcloud wrapper forks java; the whole group is killed at the end)
  and sets `PUBSUB_EMULATOR_HOST` for the session. Yields an `Emulator` helper.
- `pubsub` (function): a per-test namespace, `PubSubNamespace`: fresh delivery and dead-letter
  topics, a pull subscription on each, `GOOGLE_CLOUD_PROJECT`/`DELIVERY_TOPIC`/
  `DEAD_LETTER_TOPIC` set through monkeypatch, `worker.core.pubsub.reset_client()` before and after.
- `dead_pubsub` (function): "the emulator is down" without stopping it: points
  `PUBSUB_EMULATOR_HOST` at a local port where nothing listens, sets a short
  `PUBLISH_TIMEOUT_SECONDS`, resets the cached publisher. Yields a `DeadPubSub`.

Project ids need 6+ characters and topic/subscription ids 3+ (the emulator checks).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from worker.core import pubsub as worker_pubsub
from worker.core.settings import PubSubSettings

GCLOUD = os.environ.get("GCLOUD", shutil.which("gcloud") or "/usr/bin/gcloud")
PROJECT = "test-project"
START_TIMEOUT_SECONDS = 60.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Emulator:
    """A running emulator and Publisher/Subscriber clients bound to it.

    Topic and subscription arguments take an id (in `project`) or a full path.
    """

    def __init__(self, host: str, project: str = PROJECT) -> None:
        from google.cloud.pubsub_v1 import PublisherClient

        self.host = host
        self.project = project
        self.start_seconds = 0.0  # how long the emulator took to answer (set by the fixture)
        # The clients read PUBSUB_EMULATOR_HOST when created; it is set to `host` right now,
        # so they keep talking to the emulator even when a test points the variable elsewhere.
        previous = os.environ.get("PUBSUB_EMULATOR_HOST")
        os.environ["PUBSUB_EMULATOR_HOST"] = host
        try:
            self.publisher = PublisherClient()
            # Receives any message Pub/Sub allows (the library's own emulator channel stops
            # at 4 MiB), as `replay` does.
            self.subscriber = worker_pubsub.subscriber_client()
        finally:
            if previous is None:
                del os.environ["PUBSUB_EMULATOR_HOST"]
            else:
                os.environ["PUBSUB_EMULATOR_HOST"] = previous

    # --- names -------------------------------------------------------------------------

    def topic_path(self, topic: str) -> str:
        return topic if topic.startswith("projects/") else f"projects/{self.project}/topics/{topic}"

    def subscription_path(self, subscription: str) -> str:
        if subscription.startswith("projects/"):
            return subscription
        return f"projects/{self.project}/subscriptions/{subscription}"

    # --- admin -------------------------------------------------------------------------

    def create_topic(self, name: str) -> str:
        path = self.topic_path(name)
        self.publisher.create_topic(name=path, timeout=10)
        return path

    def _create_subscription(
        self,
        topic: str,
        name: str,
        *,
        push_endpoint: str | None,
        dead_letter_topic: str | None,
        max_delivery_attempts: int | None,
        ack_deadline: int,
        minimum_backoff: float | None,
        maximum_backoff: float | None,
    ) -> str:
        path = self.subscription_path(name)
        request: dict[str, Any] = {
            "name": path,
            "topic": self.topic_path(topic),
            "ack_deadline_seconds": ack_deadline,
        }
        if push_endpoint is not None:
            request["push_config"] = {"push_endpoint": push_endpoint}
        if dead_letter_topic is not None:
            policy: dict[str, Any] = {"dead_letter_topic": self.topic_path(dead_letter_topic)}
            if max_delivery_attempts is not None:
                policy["max_delivery_attempts"] = max_delivery_attempts
            request["dead_letter_policy"] = policy
        elif max_delivery_attempts is not None:
            raise ValueError("max_delivery_attempts needs a dead_letter_topic")
        if minimum_backoff is not None or maximum_backoff is not None:
            request["retry_policy"] = {
                key: {"seconds": int(value), "nanos": int(value % 1 * 1e9)}
                for key, value in (
                    ("minimum_backoff", minimum_backoff),
                    ("maximum_backoff", maximum_backoff),
                )
                if value is not None
            }
        self.subscriber.create_subscription(request=request, timeout=10)
        return path

    def create_pull_subscription(
        self,
        topic: str,
        name: str,
        *,
        dead_letter_topic: str | None = None,
        max_delivery_attempts: int | None = None,
        ack_deadline: int = 10,
        minimum_backoff: float | None = None,
        maximum_backoff: float | None = None,
    ) -> str:
        return self._create_subscription(
            topic,
            name,
            push_endpoint=None,
            dead_letter_topic=dead_letter_topic,
            max_delivery_attempts=max_delivery_attempts,
            ack_deadline=ack_deadline,
            minimum_backoff=minimum_backoff,
            maximum_backoff=maximum_backoff,
        )

    def create_push_subscription(
        self,
        topic: str,
        name: str,
        endpoint: str,
        dead_letter_topic: str | None = None,
        max_delivery_attempts: int | None = None,
        ack_deadline: int = 10,
        *,
        minimum_backoff: float | None = None,
        maximum_backoff: float | None = None,
    ) -> str:
        """A push subscription (the emulator POSTs the standard push JSON to `endpoint`)."""
        return self._create_subscription(
            topic,
            name,
            push_endpoint=endpoint,
            dead_letter_topic=dead_letter_topic,
            max_delivery_attempts=max_delivery_attempts,
            ack_deadline=ack_deadline,
            minimum_backoff=minimum_backoff,
            maximum_backoff=maximum_backoff,
        )

    def delete_subscription(self, subscription: str) -> None:
        self.subscriber.delete_subscription(
            subscription=self.subscription_path(subscription), timeout=10
        )

    # --- data --------------------------------------------------------------------------

    def publish(self, topic: str, data: bytes, **attributes: str) -> str:
        """Publish one message and return its message id (waits for confirmation)."""
        future = self.publisher.publish(self.topic_path(topic), data, **attributes)
        return str(future.result(timeout=30))

    def pull(
        self,
        subscription: str,
        max_messages: int = 100,
        timeout: float = 10.0,
        quiet: float = 1.0,
    ) -> list[Any]:
        """Pull and ACK messages; a list of `google.pubsub_v1.types.ReceivedMessage`.

        Waits up to `timeout` seconds for the first message; after that returns once nothing
        new arrived for `quiet` seconds, or `max_messages` were received. Use a short
        `timeout` to assert that nothing arrives.
        """
        path = self.subscription_path(subscription)
        received: list[Any] = []
        deadline = time.monotonic() + timeout
        last_arrival: float | None = None
        while len(received) < max_messages:
            now = time.monotonic()
            if last_arrival is not None and now - last_arrival >= quiet:
                break
            if last_arrival is None and now >= deadline:
                break
            batch = self.pull_once(path, max_messages - len(received))
            if batch:
                self.acknowledge(path, [m.ack_id for m in batch])
                received.extend(batch)
                last_arrival = time.monotonic()
            else:
                time.sleep(0.1)
        return received

    def pull_once(self, subscription: str, max_messages: int = 100) -> list[Any]:
        """One pull that returns at once (possibly empty) and does not ack."""
        # return_immediately: a long poll cut short by a client deadline could take
        # messages the caller never sees (redelivered only after the ack deadline).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            response = self.subscriber.pull(
                request={
                    "subscription": self.subscription_path(subscription),
                    "max_messages": max_messages,
                    "return_immediately": True,
                },
                timeout=10,
            )
        return list(response.received_messages)

    def acknowledge(self, subscription: str, ack_ids: list[str]) -> None:
        self.subscriber.acknowledge(
            request={"subscription": self.subscription_path(subscription), "ack_ids": ack_ids},
            timeout=10,
        )

    def nack(self, subscription: str, ack_ids: list[str]) -> None:
        """Hand messages back for redelivery now (ack deadline 0)."""
        self.subscriber.modify_ack_deadline(
            request={
                "subscription": self.subscription_path(subscription),
                "ack_ids": ack_ids,
                "ack_deadline_seconds": 0,
            },
            timeout=10,
        )

    def close(self) -> None:
        for close in (self.publisher.stop, self.publisher.transport.close, self.subscriber.close):
            with contextlib.suppress(Exception):  # best effort at session end
                close()


class EmulatorProcess:
    """`gcloud beta emulators pubsub start` in its own process group."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.data_dir = Path(tempfile.mkdtemp(prefix="email-pubsub-"))
        self.log_path = self.data_dir / "emulator.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0

    def start(self) -> None:
        started = time.monotonic()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    GCLOUD,
                    "beta",
                    "emulators",
                    "pubsub",
                    "start",
                    f"--host-port={self.host}",
                    f"--data-dir={self.data_dir}",
                    "--quiet",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = started + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(
                    f"Pub/Sub emulator exited with {self.process.returncode}: {self._log_tail()}"
                )
            if self._answers():
                self.start_seconds = time.monotonic() - started
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"Pub/Sub emulator did not answer on {self.host} within "
            f"{START_TIMEOUT_SECONDS:g} s: {self._log_tail()}"
        )

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-5:])

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if process is not None:
            # java may outlive the wrapper: take the rest of the group down too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        shutil.rmtree(self.data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pubsub_emulator() -> Iterator[Emulator]:
    process = EmulatorProcess()
    process.start()
    previous = os.environ.get("PUBSUB_EMULATOR_HOST")
    os.environ["PUBSUB_EMULATOR_HOST"] = process.host
    worker_pubsub.reset_client()
    emulator = Emulator(process.host)
    emulator.start_seconds = process.start_seconds
    try:
        yield emulator
    finally:
        emulator.close()
        process.stop()
        if previous is None:
            os.environ.pop("PUBSUB_EMULATOR_HOST", None)
        else:
            os.environ["PUBSUB_EMULATOR_HOST"] = previous
        worker_pubsub.reset_client()


@dataclass(frozen=True)
class PubSubNamespace:
    """One test's topics and subscriptions (ids and full paths)."""

    emulator: Emulator
    project: str
    delivery_topic: str
    dead_letter_topic: str
    delivery_topic_path: str
    dead_letter_topic_path: str
    delivery_subscription: str  # pull subscription on the delivery topic (path)
    dead_letter_subscription: str  # pull subscription on the dead-letter topic (path)
    settings: PubSubSettings

    def dead_letters(self, max_messages: int = 100, timeout: float = 10.0) -> list[Any]:
        return self.emulator.pull(self.dead_letter_subscription, max_messages, timeout)

    def deliveries(self, max_messages: int = 100, timeout: float = 10.0) -> list[Any]:
        return self.emulator.pull(self.delivery_subscription, max_messages, timeout)


@pytest.fixture
def pubsub(pubsub_emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[PubSubNamespace]:
    emulator = pubsub_emulator
    delivery = _unique("delivery")
    dead_letter = _unique("dead-letter")
    delivery_path = emulator.create_topic(delivery)
    dead_letter_path = emulator.create_topic(dead_letter)
    namespace = PubSubNamespace(
        emulator=emulator,
        project=emulator.project,
        delivery_topic=delivery,
        dead_letter_topic=dead_letter,
        delivery_topic_path=delivery_path,
        dead_letter_topic_path=dead_letter_path,
        delivery_subscription=emulator.create_pull_subscription(delivery, f"{delivery}-pull"),
        dead_letter_subscription=emulator.create_pull_subscription(
            dead_letter, f"{dead_letter}-pull"
        ),
        settings=PubSubSettings(
            project=emulator.project,
            delivery_topic=delivery,
            dead_letter_topic=dead_letter,
            publish_timeout_seconds=10.0,
        ),
    )
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator.host)
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", emulator.project)
    monkeypatch.setenv("DELIVERY_TOPIC", delivery)
    monkeypatch.setenv("DEAD_LETTER_TOPIC", dead_letter)
    worker_pubsub.reset_client()
    try:
        yield namespace
    finally:
        worker_pubsub.reset_client()


@dataclass(frozen=True)
class DeadPubSub:
    """Pub/Sub that is down: `host` has nothing listening."""

    host: str
    settings: PubSubSettings


DEAD_PUBLISH_TIMEOUT_SECONDS = 2.0


@pytest.fixture
def dead_pubsub(monkeypatch: pytest.MonkeyPatch) -> Iterator[DeadPubSub]:
    host = f"127.0.0.1:{_free_port()}"  # bound and released: nothing listens there now
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", host)
    monkeypatch.setenv("PUBLISH_TIMEOUT_SECONDS", str(DEAD_PUBLISH_TIMEOUT_SECONDS))
    for name, value in (
        ("GOOGLE_CLOUD_PROJECT", PROJECT),
        ("DELIVERY_TOPIC", "email-delivery"),
        ("DEAD_LETTER_TOPIC", "email-dead-letter"),
    ):
        if not os.environ.get(name):
            monkeypatch.setenv(name, value)
    settings = PubSubSettings(
        project=os.environ["GOOGLE_CLOUD_PROJECT"],
        delivery_topic=os.environ["DELIVERY_TOPIC"],
        dead_letter_topic=os.environ["DEAD_LETTER_TOPIC"],
        publish_timeout_seconds=DEAD_PUBLISH_TIMEOUT_SECONDS,
    )
    worker_pubsub.reset_client()
    try:
        yield DeadPubSub(host=host, settings=settings)
    finally:
        worker_pubsub.reset_client()


__all__ = [
    "DeadPubSub",
    "Emulator",
    "EmulatorProcess",
    "PubSubNamespace",
    "dead_pubsub",
    "pubsub",
    "pubsub_emulator",
]
