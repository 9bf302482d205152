"""A real, throwaway PostgreSQL 15 cluster for tests: initdb in a temporary directory, serving
on 127.0.0.1 at a free port (and a unix socket in the same directory), stopped afterwards.

initdb refuses to run as root, so as root every PostgreSQL tool runs as the ``postgres`` user
in a directory that user owns. A missing PostgreSQL skips outside CI and fails under CI=true.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from tests import conftest
from tests.ports import free_port

PG_BIN = Path(os.environ.get("PINRPC_PG_BIN", "/usr/lib/postgresql/15/bin"))
USER = "pinrpc"


def require_tool(path: Path | None, what: str) -> Path:
    """The tool's path; skip (outside CI) or fail (CI=true) when it is missing."""
    conftest.require_tool(path is not None and path.exists(), what, ".ci/run installs it")
    assert path is not None
    return path


class Postgres:
    """One cluster; ``start``/``stop`` may be called repeatedly (same data, same port)."""

    def __init__(self) -> None:
        require_tool(PG_BIN / "initdb", "PostgreSQL 15 (Debian package postgresql-15)")
        self.root = Path(tempfile.mkdtemp(prefix="pinrpc-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as_root = os.geteuid() == 0
        try:
            if self._as_root:
                owner = pwd.getpwnam("postgres")
                os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", USER, "--no-sync")
        except BaseException:
            self.remove()  # nobody else holds the object: its directory would be left behind
            raise

    def _run(self, tool: str, *args: str) -> None:
        command = [str(PG_BIN / tool), *args]
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            log = self.root / "log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{tool} failed: {result.stderr.strip()} {tail}")

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root}"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-o", options,
                  "start")  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def running_postgres() -> Iterator[Postgres]:
    pg = Postgres()
    try:
        pg.start()
        try:
            yield pg
        finally:
            if (pg.data / "postmaster.pid").exists():
                pg.stop()
    finally:
        pg.remove()
