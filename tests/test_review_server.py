"""Defects found reading the server as its next owner: each test failed before its fix."""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

from server import cli as server_cli
from server.registry import Client, Registry, open_registry
from server.trust import TrustWatcher
from server.unforeseen import Unforeseen
from tests import test_handover
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
from tests.test_handover import slow_listener

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
    """A registry whose next ``fail`` clients() calls fail as nothing foreseen does."""

    def __init__(self, registry: Registry) -> None:
        self.registry, self.fail = registry, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.registry, name)

    def clients(self) -> list[Client]:
        if self.fail:
            self.fail -= 1
            raise RuntimeError("unforeseen")
        return self.registry.clients()


def test_watcher_outlives_an_unforeseen_failure(
    devca: ServerFiles, registry: Path, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Any exception out of poll() ended the watcher's thread: no change reached the server
    again, revocations included, and nothing said so but one traceback."""
    caplog.set_level(logging.INFO, "pinrpc.trust")
    enroll(registry, make_client("alice").cert_path, "alice", ECHO_ALL)
    backend = open_registry(str(registry))
    hiccup = _Hiccup(backend)
    trust = TrustWatcher(cast(Registry, hiccup), devca.cert, devca.key, interval=0.05)
    dead: list[BaseException | None] = []
    threading.excepthook, hook = (lambda args: dead.append(args.exc_value)), threading.excepthook
    trust.start()
    try:
        hiccup.fail = 5  # a failure that lasts: five polls in a row
        revoke(registry, "alice")
        eventually(lambda: not hiccup.fail, 10)
        eventually(lambda: not trust.enrolled.by_digest, 10)
    finally:
        trust.stop()
        threading.excepthook = hook
        backend.close()
    assert not dead
    said = [r for r in caplog.records if r.name == "pinrpc.trust" and "trust reload" in r.message]
    assert [(r.levelname, r.exc_info is not None) for r in said] == [
        ("ERROR", True),
        ("INFO", False),
    ]


def test_an_unforeseen_failure_is_logged_once_while_it_lasts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Loops retry several times a second: a traceback per retry would bury the log."""
    guard = Unforeseen(logging.getLogger("pinrpc.test"), "the step")

    def fail(why: str) -> Callable[[], None]:
        def step() -> None:
            raise RuntimeError(why)

        return step

    with caplog.at_level(logging.INFO, "pinrpc.test"):
        outcomes = [guard.run(fail("a")) for _ in range(3)]
        outcomes += [guard.run(fail("b")), guard.run(lambda: None), guard.run(lambda: None)]
        outcomes.append(guard.run(fail("a")))
    assert outcomes == [False, False, False, False, True, True, False]
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("ERROR", "the step failed unexpectedly, retrying: RuntimeError: a"),
        ("ERROR", "the step failed unexpectedly, retrying: RuntimeError: b"),
        ("INFO", "the step works again"),
        ("ERROR", "the step failed unexpectedly, retrying: RuntimeError: a"),
    ]
    assert all(r.exc_info for r in caplog.records if r.levelname == "ERROR")


def test_handover_outlives_an_unforeseen_build_failure(
    devca: ServerFiles, registry: Path, make_client: MakeClient
) -> None:
    """An exception out of a handover build ended the handover thread: no enrollment reached
    TLS again (a revocation still did, through the per-call check)."""
    alice, bob, carol = make_client("alice"), make_client("bob"), make_client("carol")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    failed: list[str] = []

    def fail_once() -> None:
        if not failed:
            failed.append("once")
            raise RuntimeError("unforeseen")

    with slow_listener(devca, registry, interval=0.05, on_slow_build=fail_once) as built:
        served, trust, slow = built
        served.start("127.0.0.1:0")
        target = (f"127.0.0.1:{served.port}", devca.ca_path)
        slow.set()  # each build from here on calls fail_once (and takes 2 s)
        enroll(registry, bob.cert_path, "bob", ECHO_ALL)
        trust.poll()  # wakes the handover thread: its build fails
        eventually(lambda: bool(failed), 10)
        enroll(registry, carol.cert_path, "carol", ECHO_ALL)
        trust.poll()  # the next change is built: the thread lives
        eventually(lambda: test_handover.admitted(target, carol), 20)
        assert test_handover.admitted(target, bob)
