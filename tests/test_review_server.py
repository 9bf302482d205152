"""Defects found reading the server as its next owner: each test failed before its fix."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import cast

import pytest

from server import cli as server_cli
from server.registry import Client, Registry, open_registry
from server.trust import TrustWatcher
from tests.conftest import (
    ECHO_ALL,
    Connect,
    MakeClient,
    ServerFiles,
    admitted,
    enroll,
    eventually,
    revoke,
)

# SQLite's own clock, as an operator editing the file by hand writes it: UTC without an offset.
SQLITE_NOW_PLUS_A_DAY = "datetime('now', '+1 day')"


def _set_by_hand(registry: Path, name: str, column: str, value_sql: str) -> None:
    """An operator's edit with the sqlite3 shell (generation bumped, as any change does)."""
    with sqlite3.connect(registry) as db:
        db.execute(f"UPDATE clients SET {column} = {value_sql} WHERE name = ?", (name,))  # noqa: S608
        db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
    db.close()


@pytest.mark.parametrize("column", ["not_after", "retire_at"])
def test_list_reads_times_sqlite_wrote_itself(
    column: str, registry: Path, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """datetime('now') has no offset: `list` failed with a TypeError traceback (naive and aware
    datetimes compared) instead of reading it as the UTC it is."""
    enroll(registry, make_client("alice").cert_path, "alice", ECHO_ALL)
    _set_by_hand(registry, "alice", column, SQLITE_NOW_PLUS_A_DAY)
    capsys.readouterr()
    assert server_cli.main(["list", "--registry", str(registry)]) == 0
    out = capsys.readouterr().out
    assert "alice" in out
    assert ("retiring" in out) == (column == "retire_at")


def test_watcher_survives_a_time_sqlite_wrote_itself(
    connect: Connect, make_client: MakeClient
) -> None:
    """A naive time in a row ended the trust watcher's thread (TypeError out of poll()), and
    with it every later revocation: a revoked client kept calling on its open connection."""
    alice, bob = make_client("alice"), make_client("bob")
    connect.enroll(alice, "alice", ECHO_ALL)
    connect.enroll(bob, "bob", ECHO_ALL)
    stub = connect.stub(bob.cert_path, bob.key_path)
    assert admitted(stub)
    _set_by_hand(connect.server_registry, "alice", "retire_at", SQLITE_NOW_PLUS_A_DAY)
    dead: list[BaseException | None] = []
    threading.excepthook, hook = (lambda args: dead.append(args.exc_value)), threading.excepthook
    try:
        eventually(lambda: _edit_read(connect), 10)
        revoke(connect.server_registry, "bob")
        eventually(lambda: not admitted(stub), 10)
    finally:
        threading.excepthook = hook
    assert not dead


def _edit_read(connect: Connect) -> bool:
    """The watcher took in the registry as it is now, or its thread has ended trying."""
    thread = connect.server.trust._thread
    if thread is None or not thread.is_alive():
        return True
    with sqlite3.connect(connect.server_registry) as db:
        (stored,) = db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
    db.close()
    return bool(connect.server.trust._generation == stored)  # the same registry: no epoch


class _Hiccup:
    """A registry whose next clients() fails as nothing foreseen does."""

    def __init__(self, registry: Registry) -> None:
        self.registry, self.fail = registry, False

    def __getattr__(self, name: str) -> object:
        return getattr(self.registry, name)

    def clients(self) -> list[Client]:
        if self.fail:
            self.fail = False
            raise RuntimeError("unforeseen")
        return self.registry.clients()


def test_watcher_outlives_an_unforeseen_failure(
    devca: ServerFiles, registry: Path, make_client: MakeClient
) -> None:
    """Any exception out of poll() ended the watcher's thread: no change reached the server
    again, revocations included, and nothing said so but one traceback."""
    enroll(registry, make_client("alice").cert_path, "alice", ECHO_ALL)
    backend = open_registry(str(registry))
    hiccup = _Hiccup(backend)
    trust = TrustWatcher(cast(Registry, hiccup), devca.cert, devca.key, interval=0.05)
    dead: list[BaseException | None] = []
    threading.excepthook, hook = (lambda args: dead.append(args.exc_value)), threading.excepthook
    trust.start()
    try:
        hiccup.fail = True
        revoke(registry, "alice")
        eventually(lambda: not hiccup.fail, 10)
        eventually(lambda: not trust.enrolled.by_digest, 10)
    finally:
        trust.stop()
        threading.excepthook = hook
        backend.close()
    assert not dead
