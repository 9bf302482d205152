"""SQLite registry faults while the server runs: deleted, replaced by an old copy, corrupted,
locked by another writer, read-only. The server keeps the last good enrolled set, logs the
fault once, the CLI refuses changes with one line, and revoked clients never get back in."""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pinrpc.errors import RegistryError
from pinrpc.identity import KeyPairFiles
from server import cli as server_cli
from server.enrollment import check_certificate
from server.registry import SqliteRegistry
from tests.conftest import Connect, MakeClient, admitted, require_tool

UNREADABLE = "registry unreadable, keeping the last good enrolled set"


def admits(connect: Connect, files: KeyPairFiles) -> bool:
    return admitted(connect.stub(files.cert_path, files.key_path))


def polls(connect: Connect, n: int = 5) -> None:
    for _ in range(n):
        connect.server.trust.poll()


def copy_of(registry: Path, to: Path) -> Path:
    """A consistent copy (what a backup tool makes), WAL contents included."""
    src, dst = sqlite3.connect(registry), sqlite3.connect(to)
    with dst:
        src.backup(dst)
    src.close()
    dst.close()
    return to


def enroll_cli(registry: Path, files: KeyPairFiles, name: str) -> int:
    cert = str(files.cert_path)
    return server_cli.main(["enroll", cert, "--name", name, "--registry", str(registry)])


def logged_once(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return sum(text in r.getMessage() for r in caplog.records) == 1


def test_deleted_registry_keeps_serving_then_follows_the_new_file(
    connect: Connect, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    connect.enroll(alice, "alice")
    registry = connect.server_registry
    for suffix in ("", "-wal", "-shm"):
        Path(f"{registry}{suffix}").unlink(missing_ok=True)
    with caplog.at_level(logging.ERROR):
        polls(connect)
    assert logged_once(caplog, UNREADABLE)
    assert "is gone (deleted or moved)" in caplog.text
    assert admits(connect, alice)
    assert not admits(connect, bob)
    # An operator starts over: the new file is the registry now, and alice is not in it.
    assert enroll_cli(registry, bob, "bob") == 0
    polls(connect, 1)
    assert admits(connect, bob)
    assert not admits(connect, alice)


@pytest.mark.parametrize("how", ["sqlite3 .restore", "file replaced"])
def test_old_copy_cannot_bring_a_revoked_client_back(
    how: str,
    connect: Connect,
    make_client: MakeClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    connect.enroll(alice, "alice")
    connect.enroll(bob, "bob")
    registry = connect.server_registry
    old = copy_of(registry, tmp_path / "backup.db")  # bob is active in this copy
    assert server_cli.main(["revoke", "bob", "--registry", str(registry)]) == 0
    polls(connect, 1)
    assert not admits(connect, bob)
    if how == "file replaced":
        os.replace(old, registry)
        for suffix in ("-wal", "-shm"):  # else SQLite would replay the live WAL onto the copy
            Path(f"{registry}{suffix}").unlink(missing_ok=True)
    else:
        copy_of(old, registry)  # what `sqlite3 registry.db ".restore backup.db"` does
    with caplog.at_level(logging.WARNING):
        polls(connect)
    assert "stays revoked" in caplog.text
    assert admits(connect, alice)
    assert not admits(connect, bob)


def test_corrupted_registry_keeps_serving_and_refuses_changes(
    connect: Connect,
    make_client: MakeClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    connect.enroll(alice, "alice")
    registry = connect.server_registry
    good = copy_of(registry, tmp_path / "good.db")
    with registry.open("r+b") as f:  # in place: same inode, garbage contents
        f.write(os.urandom(registry.stat().st_size))
    Path(f"{registry}-wal").unlink(missing_ok=True)
    polls(connect)
    assert admits(connect, alice)
    assert not admits(connect, bob)
    capsys.readouterr()
    assert enroll_cli(registry, bob, "bob") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "file is not a database" in err
    # Restored from the good copy: changes work again and reach the server.
    shutil.copy(good, tmp_path / "restore.db")
    os.replace(tmp_path / "restore.db", registry)
    Path(f"{registry}-shm").unlink(missing_ok=True)
    assert enroll_cli(registry, bob, "bob") == 0
    polls(connect, 1)
    assert admits(connect, bob)
    assert admits(connect, alice)


def test_writer_lock_does_not_block_the_server_and_changes_time_out(
    connect: Connect, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    connect.enroll(alice, "alice")
    registry = connect.server_registry
    other = sqlite3.connect(registry, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
    try:
        with caplog.at_level(logging.ERROR):
            polls(connect)
        assert UNREADABLE not in caplog.text  # WAL readers are not blocked by a writer
        assert admits(connect, alice)
        admin = SqliteRegistry(registry, busy_timeout=0.2)
        try:
            candidate = check_certificate(bob.cert_path.read_bytes(), str(bob.cert_path))
            with pytest.raises(RegistryError, match=r"database is locked \(another process is "
                               r"writing to it; gave up after 0.2 s"):  # fmt: skip
                admin.enroll(candidate, "bob", [])
        finally:
            admin.close()
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert enroll_cli(registry, bob, "bob") == 0
    polls(connect, 1)
    assert admits(connect, bob)


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make a file unwritable even for root (immutable flag), or by mode for anyone else."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        try:
            yield
        finally:
            path.chmod(0o644)
        return
    chattr = shutil.which("chattr")
    require_tool(chattr is not None, "chattr", "apt-get install -y e2fsprogs")
    result = subprocess.run([str(chattr), "+i", str(path)], capture_output=True, check=False)
    require_tool(
        result.returncode == 0,
        f"a filesystem with the immutable flag (chattr +i said {result.stderr!r})",
        "run the tests on ext4, xfs or btrfs",
    )
    try:
        yield
    finally:
        subprocess.run([str(chattr), "-i", str(path)], check=True)


def test_read_only_registry_refuses_changes_with_one_line(
    connect: Connect, make_client: MakeClient
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    connect.enroll(alice, "alice")
    registry = connect.server_registry
    # Everything in the main file (no WAL left behind), as a file copied read-only would be.
    checkpoint = SqliteRegistry(registry)
    checkpoint._read(lambda q: q("PRAGMA wal_checkpoint(TRUNCATE)", ()))
    checkpoint.close()
    with read_only(registry):
        # In its own process, as an operator runs it: inside this one SQLite may reuse a
        # descriptor the server opened for writing before the file became read-only.
        argv = ["enroll", str(bob.cert_path), "--name", "bob", "--registry", str(registry)]
        done = subprocess.run(
            [sys.executable, "-m", "server.cli", *argv], capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 1, done.stdout
        assert done.stderr.count("\n") == 1
        assert "readonly" in done.stderr
        polls(connect)
        assert admits(connect, alice)
        assert not admits(connect, bob)
    assert enroll_cli(registry, bob, "bob") == 0
    polls(connect, 1)
    assert admits(connect, bob)
