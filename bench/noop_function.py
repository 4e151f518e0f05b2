"""CloudEvent functions that do no work: the HTTP + functions-framework floor.

`noop` returns at once: served by the http benchmark next to main.py to show what the
framework alone costs per request (`functions-framework --source bench/noop_function.py
--target noop`). `wait` only waits NOOP_WAIT_MS (a relay's time per message): the concurrency
benchmark's ceiling for a function that spends that long on the relay and nothing else.
"""

from __future__ import annotations

import os
import time
from typing import Any

import functions_framework


@functions_framework.cloud_event
def noop(cloud_event: Any) -> None:
    """Returns at once (ack)."""


_WAIT_SECONDS = float(os.environ.get("NOOP_WAIT_MS", "0")) / 1000


@functions_framework.cloud_event
def wait(cloud_event: Any) -> None:
    """Waits NOOP_WAIT_MS, then returns (ack)."""
    time.sleep(_WAIT_SECONDS)
