"""The folder tree is the architecture: each package of `worker` imports only the packages
on the floors below it, no package holds more than 12 modules, and no import makes a circle.

    ops, console        (floor 4: the operators' CLI, the support console)
    delivery, providers (floor 3: the delivery function's wing, the provider webhooks)
    store               (floor 2: the one way to the database)
    core                (floor 1: settings, secrets, logging, rules, the instance holder)

Imports inside a function count too (a lazy import is still a dependency), and so do
`importlib.import_module("worker.…")` strings.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "worker"

FLOORS = {"core": 1, "store": 2, "delivery": 3, "providers": 3, "console": 4, "ops": 4}
# Packages on one floor stay apart: the delivery path never loads provider crypto, and the
# console never loads the CLI.
MAX_MODULES = 12


def modules() -> Iterator[Path]:
    yield from sorted(PACKAGE.rglob("*.py"))


def package_of(dotted: str) -> str | None:
    parts = dotted.split(".")
    if parts[0] != "worker" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in FLOORS else None


def imported(path: Path) -> Iterator[tuple[int, str]]:
    """(line, dotted module) for every import of the worker in one file."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.startswith("worker.")
            and " " not in node.value
        ):
            yield node.lineno, node.value


def crossings() -> list[str]:
    found = []
    for path in modules():
        home = package_of("worker." + path.relative_to(PACKAGE).parts[0])
        if home is None:
            continue  # worker/__main__.py, worker/__init__.py: the entry point
        for line, module in imported(path):
            target = package_of(module)
            if target is None or target == home:
                continue
            if FLOORS[target] >= FLOORS[home]:
                found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return sorted(set(found))


def test_no_package_imports_its_own_floor_or_above() -> None:
    assert crossings() == []


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_no_package_holds_more_than_twelve_modules(package: str) -> None:
    count = sum(1 for path in (PACKAGE / package).glob("*.py") if path.name != "__init__.py")
    assert 0 < count <= MAX_MODULES


def test_every_package_of_the_worker_has_a_floor() -> None:
    packages = {path.parent.name for path in PACKAGE.glob("*/__init__.py")}
    assert packages == set(FLOORS)


def test_an_import_running_back_up_is_seen(tmp_path: Path) -> None:
    # The check itself can fail: a store module importing the delivery wing is reported.
    stray = PACKAGE / "store" / "_layout_probe.py"
    stray.write_text("from worker.delivery import events\n")
    try:
        assert crossings() == [
            "worker/store/_layout_probe.py:1 imports worker.delivery",
            "worker/store/_layout_probe.py:1 imports worker.delivery.events",
        ]
    finally:
        stray.unlink()
