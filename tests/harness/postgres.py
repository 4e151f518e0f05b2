"""A throwaway PostgreSQL 15 for the tests, the local stack and the benchmarks.

One server per test session (initdb into a temp dir, a free port, run as the `postgres` user
when we are root, because the server refuses to run as root), or the server named by
`DATABASE_URL` when that is set. The migrations are applied once into a template database;
every test gets its own copy, so tests never see each other's rows.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import conninfo
from psycopg_pool import ConnectionPool

from worker.core.settings import DatabaseSettings
from worker.store.db import connection_kwargs
from worker.store.ledger import Ledger
from worker.store.migrations import migrate_up

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
TEMPLATE = "email_template"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


class PostgresServer:
    """initdb + pg_ctl on 127.0.0.1; `stop()`/`start()` keep the data (restart tests)."""

    def __init__(self, base: Path | None = None, port: int | None = None) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="email-pg-", dir=base))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = port or free_port()
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
        subprocess.run(
            _as_postgres(
                [
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
        )
        settings = [
            "listen_addresses = '127.0.0.1'",
            f"port = {self.port}",
            "unix_socket_directories = ''",
            "max_connections = 300",
            # A test server: durability across an OS crash is not needed, speed is.
            "fsync = off",
            "full_page_writes = off",
            "shared_preload_libraries = 'pg_stat_statements'",
            "pg_stat_statements.track = all",
        ]
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n".join(settings) + "\n")

    def start(self) -> None:
        subprocess.run(
            _as_postgres(
                [
                    str(PG_BIN / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"]),
            check=False,
            capture_output=True,
        )

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)


class Databases:
    """Creates per-test databases as copies of the migrated template."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self._names = (f"email_test_{os.getpid()}_{n}" for n in itertools.count())

    def url(self, dbname: str) -> str:
        return conninfo.make_conninfo(self.admin_url, dbname=dbname)

    def prepare_template(self) -> None:
        self.drop(TEMPLATE)
        self._admin(f'CREATE DATABASE "{TEMPLATE}"')
        migrate_up(self.url(TEMPLATE), report=lambda _line: None)

    def create(self, template: str = TEMPLATE) -> str:
        name = next(self._names)
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return name

    def drop(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _admin(self, statement: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(statement)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer | None]:
    """The session's own server, or None when DATABASE_URL points at one."""
    if os.environ.get("DATABASE_URL"):
        yield None
        return
    server = PostgresServer()
    server.init()
    server.start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def databases(pg_server: PostgresServer | None) -> Databases:
    admin = pg_server.admin_url if pg_server else os.environ["DATABASE_URL"]
    dbs = Databases(admin)
    dbs.prepare_template()
    return dbs


@pytest.fixture
def database_url(databases: Databases, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh, migrated database of its own; also exported as DATABASE_URL."""
    name = databases.create()
    url = databases.url(name)
    monkeypatch.setenv("DATABASE_URL", url)
    yield url
    databases.drop(name)


@pytest.fixture
def empty_database_url(databases: Databases) -> Iterator[str]:
    """A fresh database with no migrations applied."""
    name = databases.create(template="template0")
    yield databases.url(name)
    databases.drop(name)


@pytest.fixture
def pool(database_url: str) -> Iterator[ConnectionPool]:
    settings = DatabaseSettings(url=database_url, pool_max_size=20, connect_timeout_seconds=5)
    with ConnectionPool(
        database_url, min_size=1, max_size=20, kwargs=connection_kwargs(settings), timeout=10
    ) as p:
        yield p


@pytest.fixture
def ledger(pool: ConnectionPool) -> Ledger:
    return Ledger(pool)


def wait_until(predicate: object, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Poll `predicate()` until true; fail the test with a clear message otherwise."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")
