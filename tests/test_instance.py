"""The per-instance holder every target uses (worker/core/instance.py): settings parsed once,
what they describe built once however many request threads ask at the same time."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping

import pytest

from worker.core.instance import Instance, Lazy
from worker.core.settings import SettingsError


def test_lazy_builds_once_for_many_threads_at_once() -> None:
    builds: list[int] = []

    def build() -> object:
        builds.append(1)
        time.sleep(0.05)  # long enough for every thread to arrive while the first builds
        return object()

    lazy: Lazy[object] = Lazy(build)
    start = threading.Barrier(16)
    got: list[object] = []

    def ask() -> None:
        start.wait()
        got.append(lazy.get())

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert len({id(value) for value in got}) == 1
    assert lazy.value is got[0]


def test_lazy_shows_nothing_before_it_is_built_and_forgets_on_reset() -> None:
    lazy = Lazy(lambda: [1])
    assert lazy.value is None
    first = lazy.get()
    lazy.reset()
    assert lazy.value is None
    assert lazy.get() is not first


def test_an_instance_parses_its_env_once_and_builds_from_that() -> None:
    parsed: list[Mapping[str, str]] = []

    def parse(env: Mapping[str, str]) -> str:
        parsed.append(env)
        return env["NAME"]

    instance: Instance[str, str] = Instance(parse, lambda name: f"built from {name}")
    assert instance.configure({"NAME": "a"}) == "a"
    # A later call, with another env, keeps the instance's settings: they were parsed at start.
    assert instance.configure({"NAME": "b"}) == "a"
    assert instance.built is None  # configuring builds nothing
    assert instance.get() == "built from a"
    assert instance.built == "built from a"
    assert len(parsed) == 1


def test_a_settings_error_leaves_nothing_half_configured() -> None:
    def parse(env: Mapping[str, str]) -> str:
        if "NAME" not in env:
            raise SettingsError("NAME is required but not set")
        return env["NAME"]

    instance: Instance[str, str] = Instance(parse, str.upper)
    with pytest.raises(SettingsError):
        instance.configure({})
    assert instance.configure({"NAME": "ok"}) == "ok"
    instance.reset()
    assert instance.built is None
