"""`main.py` served by a real functions-framework process, as Cloud Functions runs it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FunctionServer:
    """`functions-framework --target handle_delivery --signature-type cloudevent` on 127.0.0.1
    (or another target: `handle_provider_event` with `signature_type="http"`).

    Its stdout and stderr (the worker's JSON log lines) go to `log_path`; without one, to a
    temporary directory of its own, deleted by `stop()` (`logs()` still answers after that).
    """

    def __init__(
        self,
        env: Mapping[str, str],
        port: int | None = None,
        log_path: Path | None = None,
        target: str = "handle_delivery",
        signature_type: str = "cloudevent",
    ) -> None:
        self.target = target
        self.signature_type = signature_type
        self.port = port or _free_port()
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self._own_dir = None if log_path else Path(tempfile.mkdtemp(prefix="email-function-"))
        self.log_path = log_path or (self._own_dir or Path()) / "function.log"
        self._stopped_log = ""  # what the log held when its own directory was deleted
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def push_endpoint(self, project: str, topic: str) -> str:
        """Where a push subscription delivers (functions-framework reads the topic from it)."""
        return f"{self.url}/projects/{project}/topics/{topic}"

    def start(self, timeout: float = 30.0) -> FunctionServer:
        executable = Path(sys.executable).parent / "functions-framework"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(executable),
                    "--target",
                    self.target,
                    "--signature-type",
                    self.signature_type,
                    "--source",
                    str(ROOT / "main.py"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()  # nothing to stop, but its directory to delete
                raise RuntimeError(f"functions-framework exited: {self.logs()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"functions-framework did not listen within {timeout}s")

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after 10 s) and delete its own log directory."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=5)
        if self._own_dir is not None and self._own_dir.exists():
            self._stopped_log = self.logs()
            shutil.rmtree(self._own_dir, ignore_errors=True)

    def logs(self) -> str:
        if self.log_path.exists():
            return self.log_path.read_text(errors="replace")
        return self._stopped_log
