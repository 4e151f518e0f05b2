"""Checks that requirements.txt (the deploy's lock) still matches requirements.in, offline.

`scripts/lock.sh` writes the lock with uv: every package pinned (`name==version`), each with
its `--hash=sha256:` lines and a `# via` comment naming what needs it (`-r requirements.in`
for the direct ones). Without a resolver or the network this can still catch what goes wrong
in practice:

- a pin in requirements.in that the lock does not have, has at another version, or has only
  as somebody else's dependency (added to requirements.in without re-locking);
- a direct dependency the lock still has although requirements.in dropped it;
- a line without a hash (pip would refuse the whole file in hash-checking mode) or added by
  hand (no `# via`, or a `# via` naming a package that is not in the lock).

    python scripts/check_lock.py [requirements.in [requirements.txt]]

Exit 0 and one line when they match; exit 1 and one line per problem otherwise.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIRECT = "-r requirements.in"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)")
_HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def normalise(name: str) -> str:
    """PEP 503: `Jinja2`, `jinja2` and `jinja_2` are the same project."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class Locked:
    version: str
    hashes: int = 0
    via: list[str] = field(default_factory=list)


def read_in(path: Path) -> tuple[dict[str, str], list[str]]:
    """The direct pins of requirements.in by normalised name, and lines that are not pins."""
    pins: dict[str, str] = {}
    problems: list[str] = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _PIN.match(line)
        if match is None:
            problems.append(f"{path.name}:{number}: not a `name==version` pin: {line!r}")
            continue
        pins[normalise(match.group(1))] = match.group(3)
    return pins, problems


def read_lock(path: Path) -> tuple[dict[str, Locked], list[str]]:
    """The lock's packages, with their hash count and `# via` entries."""
    locked: dict[str, Locked] = {}
    problems: list[str] = []
    current: Locked | None = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if not raw.startswith((" ", "#")):
            match = _PIN.match(line)
            if match is None:
                problems.append(f"{path.name}:{number}: not a `name==version` pin: {line!r}")
                current = None
                continue
            current = Locked(match.group(3))
            locked[normalise(match.group(1))] = current
        elif current is not None and line.startswith("--hash="):
            current.hashes += len(_HASH.findall(line))
        elif current is not None and line.startswith("#"):
            via = line.lstrip("#").strip()
            via = via.removeprefix("via").strip()
            if via:
                current.via.append(via)
    return locked, problems


def check(requirements_in: Path, lock: Path) -> list[str]:
    pins, problems = read_in(requirements_in)
    locked, lock_problems = read_lock(lock)
    problems += lock_problems
    for name, version in sorted(pins.items()):
        entry = locked.get(name)
        if entry is None:
            problems.append(f"{name}=={version} is in {requirements_in.name} but not in the lock")
        elif entry.version != version:
            problems.append(
                f"{name}: {requirements_in.name} pins {version}, the lock has {entry.version}"
            )
        elif DIRECT not in entry.via:
            problems.append(
                f"{name} is in {requirements_in.name} but the lock has it only as a "
                "dependency of others"
            )
    for name, entry in sorted(locked.items()):
        if entry.hashes == 0:
            problems.append(f"{name}=={entry.version} has no --hash in the lock")
        if not entry.via:
            problems.append(f"{name}=={entry.version} has no `# via` (added by hand?)")
        for via in entry.via:
            if via == DIRECT:
                if name not in pins:
                    problems.append(
                        f"{name} is a direct dependency in the lock but not in "
                        f"{requirements_in.name}"
                    )
            elif normalise(via) not in locked:
                problems.append(f"{name} is needed by {via}, which the lock does not have")
    return problems


def main(argv: list[str]) -> int:
    requirements_in = Path(argv[0]) if argv else ROOT / "requirements.in"
    lock = Path(argv[1]) if len(argv) > 1 else ROOT / "requirements.txt"
    problems = check(requirements_in, lock)
    if problems:
        for problem in problems:
            print(f"check_lock: {problem}", file=sys.stderr)
        print("check_lock: run `bash scripts/lock.sh` and commit requirements.txt", file=sys.stderr)
        return 1
    print(f"check_lock: {lock.name} matches {requirements_in.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
