"""What one function instance keeps for its life, held the same way by every target.

A Cloud Functions instance serves one target. At import it parses that target's settings
(`Instance.configure`: a missing or bad one stops the instance with one line before any
request), and on the first request it builds what the settings describe (`Instance.get`:
pools, clients), once, whichever of the instance's request threads asks first. Nothing here
opens a connection at import, so cold start pays only for parsing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

C = TypeVar("C")
T = TypeVar("T")

Env = Mapping[str, str]


class Lazy(Generic[T]):
    """One value, built on first use by whichever thread asks first, then shared."""

    def __init__(self, build: Callable[[], T]) -> None:
        self._build = build
        self._value: T | None = None
        self._lock = threading.Lock()

    def get(self) -> T:
        value = self._value
        if value is None:
            with self._lock:
                if self._value is None:
                    self._value = self._build()
                value = self._value
        return value

    @property
    def value(self) -> T | None:
        """The value if it was built, else None (looking builds nothing)."""
        return self._value

    def reset(self) -> None:
        with self._lock:
            self._value = None


class Instance(Generic[C, T]):
    """One target's settings (`configure`) and what is built from them on first use (`get`)."""

    def __init__(self, parse: Callable[[Env], C], build: Callable[[C], T]) -> None:
        self._env: Env = os.environ
        self._config: Lazy[C] = Lazy(lambda: parse(self._env))
        self._built: Lazy[T] = Lazy(lambda: build(self._config.get()))

    def configure(self, env: Env = os.environ) -> C:
        """The settings, parsed from `env` on the first call (raises `SettingsError`)."""
        if self._config.value is None:
            self._env = env
        return self._config.get()

    def get(self) -> T:
        """What the settings describe, built on the first call and shared by every thread."""
        return self._built.get()

    @property
    def built(self) -> T | None:
        """What `get` built, or None before the first request."""
        return self._built.value

    def reset(self) -> None:
        """Forget both (tests, and a process that changes its environment)."""
        self._built.reset()
        self._config.reset()
        self._env = os.environ
