"""What one function instance keeps for its life, held the same way by every target.

A Cloud Functions instance serves one target. At import it parses that target's settings
(`configure`: a missing or bad one stops the instance with one line before any request), and
on the first request it builds what the settings describe (`get`: pools, clients), once,
whichever of the instance's request threads asks first. Nothing here opens a connection at
import, so cold start pays only for parsing.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

C = TypeVar("C")
T = TypeVar("T")

Env = Mapping[str, str]


class Instance(Generic[C, T]):
    """One target's settings (`configure`) and what is built from them on first use (`get`)."""

    def __init__(self, parse: Callable[[Env], C], build: Callable[[C], T]) -> None:
        self._parse = parse
        self._build = build
        self._config: C | None = None
        self._built: T | None = None
        self._lock = threading.Lock()

    def configure(self, env: Env = os.environ) -> C:
        """The settings, parsed on the first call (raises `SettingsError`); opens nothing."""
        if self._config is None:
            with self._lock:
                if self._config is None:
                    self._config = self._parse(env)
        return self._config

    def get(self) -> T:
        """What the settings describe, built on the first call and shared by every thread."""
        built = self._built
        if built is None:
            config = self.configure()
            with self._lock:
                if self._built is None:
                    self._built = self._build(config)
                built = self._built
        return built

    @property
    def built(self) -> T | None:
        """What `get` built, or None before the first request (nothing is built to look)."""
        return self._built

    def reset(self) -> None:
        """Forget both (tests, and a process that changes its environment)."""
        with self._lock:
            self._config = None
            self._built = None
