"""A CloudEvent function that does nothing: the HTTP + functions-framework floor.

Served by the http benchmark next to main.py to show what the framework alone costs per
request (`functions-framework --source bench/noop_function.py --target noop`).
"""

from __future__ import annotations

from typing import Any

import functions_framework


@functions_framework.cloud_event
def noop(cloud_event: Any) -> None:
    """Returns at once (ack)."""
