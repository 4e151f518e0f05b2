"""PgBouncer in transaction mode in front of the test PostgreSQL (Debian's pgbouncer 1.18).

Transaction pooling hands each transaction to whichever server connection is free, so a client
that relies on session state (server-side prepared statements, session advisory locks, `SET`)
breaks behind it. Supabase's pooler and most managed PgBouncers run this mode; the worker
promises to work there (README, "The ledger"), and these fixtures are how the tests hold it to
that. The pool is deliberately tiny (2 server connections) so that every test's clients share
server connections.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo

from tests.harness.postgres import Databases, free_port, wait_until

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
SERVER_CONNECTIONS = 2


class PgBouncer:
    """One pgbouncer process, `pool_mode = transaction`, any database of one server."""

    def __init__(self, server_url: str) -> None:
        server = conninfo.conninfo_to_dict(server_url)
        self.base = Path(tempfile.mkdtemp(prefix="email-pgbouncer-"))
        self.port = free_port()
        self.user = str(server.get("user") or "postgres")
        ini = self.base / "pgbouncer.ini"
        users = self.base / "users.txt"
        users.write_text(f'"{self.user}" ""\n')
        ini.write_text(
            "\n".join(
                [
                    "[databases]",
                    f"* = host={server.get('host', '127.0.0.1')} port={server.get('port', 5432)}",
                    "[pgbouncer]",
                    "listen_addr = 127.0.0.1",
                    f"listen_port = {self.port}",
                    "unix_socket_dir =",
                    "auth_type = trust",
                    f"admin_users = {self.user}",
                    f"auth_file = {users}",
                    "pool_mode = transaction",
                    f"default_pool_size = {SERVER_CONNECTIONS}",
                    "max_client_conn = 200",
                    # Test databases are dropped WITH (FORCE) after each test; don't hold
                    # server connections to them longer than needed.
                    "server_idle_timeout = 1",
                    f"logfile = {self.base / 'pgbouncer.log'}",
                    "",
                ]
            )
        )
        if os.geteuid() == 0:
            # PgBouncer refuses to run as root.
            shutil.chown(self.base, "postgres", "postgres")
            for path in (ini, users):
                shutil.chown(path, "postgres", "postgres")
        command = [PGBOUNCER, str(ini)]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        wait_until(self._accepts, timeout=15)

    def url(self, dbname: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def _accepts(self) -> bool:
        if self.process.poll() is not None:
            errors = self.process.stderr.read() if self.process.stderr else ""
            raise RuntimeError(f"pgbouncer exited: {errors}")
        try:
            with psycopg.connect(self.url("pgbouncer"), autocommit=True, connect_timeout=1) as conn:
                conn.execute("SHOW VERSION")
            return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def pgbouncer(databases: Databases) -> Iterator[PgBouncer]:
    bouncer = PgBouncer(databases.admin_url)
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def pooled_database_url(pgbouncer: PgBouncer, database_url: str) -> str:
    """The test's migrated database, reached through PgBouncer in transaction mode."""
    return pgbouncer.url(str(conninfo.conninfo_to_dict(database_url)["dbname"]))


@pytest.fixture
def pooled_empty_database_url(pgbouncer: PgBouncer, empty_database_url: str) -> str:
    """A database with no migrations applied, through PgBouncer."""
    return pgbouncer.url(str(conninfo.conninfo_to_dict(empty_database_url)["dbname"]))
