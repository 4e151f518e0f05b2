"""The deploy's lock (requirements.txt) against requirements.in, and what gets uploaded.

`scripts/check_lock.py` runs offline in scripts/test.sh; these tests run it on the real files
and on copies broken the ways a lock goes stale. The upload test asks the installed gcloud
which files `gcloud functions deploy` would upload (`gcloud meta list-files-for-upload`),
from a copy of the checkout with the clutter a developer's or CI's checkout has.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "scripts" / "check_lock.py"


def run_check(requirements_in: Path, lock: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(CHECK), str(requirements_in), str(lock)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_committed_lock_matches_requirements_in() -> None:
    result = run_check(ROOT / "requirements.in", ROOT / "requirements.txt")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "check_lock: requirements.txt matches requirements.in"


def test_every_locked_package_is_pinned_with_hashes() -> None:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    pins = [line for line in lines if line and not line.startswith((" ", "#"))]
    assert len(pins) > 30  # the transitive closure, not only the 7 direct pins
    assert all("==" in pin and pin.endswith(" \\") for pin in pins), pins
    for name in ("grpcio", "protobuf", "flask", "werkzeug", "gunicorn"):
        assert any(pin.startswith(f"{name}==") for pin in pins), name


@pytest.mark.parametrize(
    ("change_in", "change_lock", "expected"),
    [
        (("tenacity==9.2.1", "tenacity==9.3.0"), None, "tenacity: requirements.in pins"),
        (None, None, "tomli-w==1.2.0 is in requirements.in but not in the lock"),
        (("tenacity==9.2.1\n", ""), None, "tenacity is a direct dependency in the lock"),
        (None, ("    # via starlette", ""), "has no `# via`"),
        (("Jinja2==3.1.6", "Jinja2==3.1.6\nrequests==2.34.2"), None, "only as a dependency"),
        (None, ("    # via flask\n", "    # via flasks\n"), "which the lock does not have"),
    ],
    ids=[
        "bumped-pin",
        "new-pin",
        "dropped-pin",
        "hand-added-line",
        "transitive-pin",
        "unknown-via",
    ],
)
def test_a_stale_lock_is_refused(
    tmp_path: Path,
    change_in: tuple[str, str] | None,
    change_lock: tuple[str, str] | None,
    expected: str,
) -> None:
    requirements_in = (ROOT / "requirements.in").read_text()
    lock = (ROOT / "requirements.txt").read_text()
    if change_in is not None:
        assert change_in[0] in requirements_in
        requirements_in = requirements_in.replace(change_in[0], change_in[1], 1)
    elif change_lock is None:
        requirements_in += "tomli-w==1.2.0\n"
    if change_lock is not None:
        assert change_lock[0] in lock
        lock = lock.replace(change_lock[0], change_lock[1], 1)
    (tmp_path / "requirements.in").write_text(requirements_in)
    (tmp_path / "requirements.txt").write_text(lock)
    result = run_check(tmp_path / "requirements.in", tmp_path / "requirements.txt")
    assert result.returncode == 1
    assert expected in result.stderr
    assert "scripts/lock.sh" in result.stderr


def test_a_line_without_hashes_is_refused(tmp_path: Path) -> None:
    lock = (ROOT / "requirements.txt").read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lock) if line.startswith("tenacity=="))
    kept = [lock[start].replace(" \\", "")] + [
        line for line in lock[start + 1 :] if not line.lstrip().startswith("--hash")
    ]
    (tmp_path / "requirements.txt").write_text("".join(lock[:start] + kept))
    shutil.copy(ROOT / "requirements.in", tmp_path / "requirements.in")
    result = run_check(tmp_path / "requirements.in", tmp_path / "requirements.txt")
    assert result.returncode == 1
    assert "tenacity==9.2.1 has no --hash" in result.stderr


# --- what `gcloud functions deploy` uploads ---------------------------------------------------

CLUTTER = [
    ".venv/bin/python",
    ".venv-py312/lib/python3.12/site-packages/flask/__init__.py",
    ".venv-anything/pyvenv.cfg",
    "run/reliability.json",
    "bench/results/latest.json",
    "worker/__pycache__/settings.cpython-312.pyc",
    ".mypy_cache/3.11/main.data.json",
    ".ruff_cache/CACHEDIR.TAG",
    ".pytest_cache/README.md",
    ".hypothesis/examples/x",
    "local-stack-output/deliveries.eml",
    "notes.log",
]


def tracked_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (ROOT / name).is_file()]


def test_the_upload_is_the_function_and_nothing_else(tmp_path: Path) -> None:
    gcloud = shutil.which("gcloud")
    assert gcloud is not None, "gcloud is required (scripts/require-services.sh installs it)"
    source = tmp_path / "source"
    for name in tracked_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    for name in CLUTTER:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text("clutter\n")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud-config"),
        "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
        "LC_ALL": "C.UTF-8",
    }
    result = subprocess.run(
        [gcloud, "meta", "list-files-for-upload", str(source)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    uploaded = sorted(line.strip() for line in result.stdout.splitlines() if line.strip())
    tops = {name.split("/", 1)[0] for name in uploaded}
    assert tops == {"main.py", "requirements.txt", "sql", "worker"}, uploaded
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in uploaded)
    # Everything the function needs at run time is there.
    for needed in ("main.py", "requirements.txt", "sql/queries.sql", "worker/delivery/pipeline.py"):
        assert needed in uploaded
    assert any(name.startswith("sql/migrations/") for name in uploaded)
    assert any(name.startswith("worker/delivery/templates/") for name in uploaded)
