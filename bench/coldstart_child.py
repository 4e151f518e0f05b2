"""One cold start, run in a fresh interpreter by bench/coldstart.py:

    python -m bench.coldstart_child --variant lazy|eager --delivery-id ID --out FILE

functions_framework is imported first and untimed (the runtime has it loaded before it
imports the function's source). Timed: [eager imports], `import main`, the first event handed
to `main.handle_delivery` (pool connect, claim, templates, SMTP connect, send, record).
The worker's settings come from the environment. Results go to FILE as JSON.
"""

from __future__ import annotations

import sys
import time

_process_started = time.perf_counter()

import functions_framework  # noqa: E402,F401  (loaded by the runtime before main)

_framework_loaded = time.perf_counter()

import argparse  # noqa: E402
import base64  # noqa: E402
import json  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from cloudevents.http import CloudEvent  # noqa: E402

EAGER = (
    "google.cloud.pubsub_v1",
    "google.cloud.secretmanager",
    "grpc",
    "psycopg_pool",
    "jinja2",
    "tenacity",
)


def _event(delivery_id: str) -> Any:
    body = {
        "delivery_id": delivery_id,
        "workflow": "verification-code",
        "recipient": "cold@example.com",
        "data": {"code": "739154", "expires_in_minutes": 10},
        "metadata": {"tenant": "bench"},
        "locale": "en",
    }
    return CloudEvent(
        {
            "type": "google.cloud.pubsub.topic.v1.messagePublished",
            "source": "//pubsub.googleapis.com/projects/bench-project/topics/email-delivery",
            "id": f"cold-{delivery_id}",
        },
        {
            "message": {
                "data": base64.b64encode(json.dumps(body).encode()).decode(),
                "attributes": {},
                "messageId": f"cold-{delivery_id}",
                # Now: a code's validity runs from its publish time.
                "publishTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            "subscription": "projects/bench-project/subscriptions/eventarc-sub",
        },
    )


def _timed(owner: Any, name: str, into: dict[str, float]) -> None:
    original: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            into[name] = into.get(name, 0.0) + (time.perf_counter() - started) * 1000

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=("lazy", "eager"), required=True)
    parser.add_argument("--delivery-id", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    event = _event(args.delivery_id)
    modules_before = set(sys.modules)
    print("--- timed ---", file=sys.stderr, flush=True)

    t0, c0 = time.perf_counter(), time.process_time()
    if args.variant == "eager":
        import importlib

        for module in EAGER:
            importlib.import_module(module)
    t1 = time.perf_counter()
    import main as function_module

    t2 = time.perf_counter()
    steps: dict[str, float] = {}
    from worker.delivery import smtp
    from worker.store import ledger

    _timed(ledger.Ledger, "claim", steps)
    _timed(ledger.Ledger, "set_sent_if_claimed", steps)
    _timed(smtp.SmtpSender, "send", steps)
    t3 = time.perf_counter()
    function_module.handle_delivery(event)
    t4, c4 = time.perf_counter(), time.process_time()

    loaded = set(sys.modules) - modules_before
    result = {
        "variant": args.variant,
        "framework_import_ms": (_framework_loaded - _process_started) * 1000,
        "eager_imports_ms": (t1 - t0) * 1000,
        "import_main_ms": (t2 - t1) * 1000,
        "first_event_ms": (t4 - t3) * 1000,
        "total_ms": (t4 - t3 + t2 - t0) * 1000,
        # CPU this process used for the same span (all its threads): what a dedicated core
        # would spend, whatever else the machine is running.
        "total_cpu_ms": (c4 - c0) * 1000,
        "first_event_steps_ms": steps,
        "modules_loaded": len(loaded),
        "pubsub_loaded": "google.cloud.pubsub_v1" in sys.modules,
        "grpc_loaded": "grpc" in sys.modules,
        "secretmanager_loaded": "google.cloud.secretmanager" in sys.modules,
    }
    with open(args.out, "w", encoding="utf-8") as out:
        json.dump(result, out)


if __name__ == "__main__":
    main()
