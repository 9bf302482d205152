"""--warm-start FILE: what is read at start and what is saved (server/warm.py)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pinrpc.identity import KeyPairFiles
from server.app import start_server
from server.warm import FIRST_MAX, MAX_BYTES, MAX_CLIENTS, WarmSet, load
from tests.conftest import ECHO_ALL, Connect, MakeClient, ServerFiles, enroll, revoke, whoami
from tests.test_handover import handover_config, settle


def unblock_after(fifo: Path, seconds: float) -> threading.Timer:
    """Open ``fifo`` for writing after ``seconds``: a start-up blocked on reading it then
    goes on, so a regression fails the test instead of hanging the suite."""

    def open_writer() -> None:
        with contextlib.suppress(OSError):  # ENXIO: no reader waiting, nothing to unblock
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    timer = threading.Timer(seconds, open_writer)
    timer.start()
    return timer


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink"])
def test_a_warm_path_that_is_not_a_regular_file_is_ignored_and_left_alone(
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    alice = make_client("alice")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    warm_path = tmp_path / "warm"
    secret = tmp_path / "shadow"  # say, planted by another user in a shared directory
    secret.write_text("root:$y$secret-hash:19000::::::\n")
    if kind == "symlink":
        warm_path.symlink_to(secret)
    else:
        os.mkfifo(warm_path) if kind == "fifo" else warm_path.mkdir()
    config = replace(handover_config(registry, devca.cert, devca.key), warm_start=warm_path)
    timer = unblock_after(warm_path, 5.0)
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING), start_server(config) as running:
            assert time.monotonic() - started < 5.0
            assert whoami(Connect(running, devca).stub(alice.cert_path, alice.key_path))
    finally:
        timer.cancel()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"ignoring the warm-start file {warm_path}: not a regular file" in warnings
    # alice was seen, so stopping tried to save: the path must stay what it was.
    assert f"could not save the warm-start file {warm_path}: not a regular file" in warnings
    assert not any("secret-hash" in w for w in warnings)  # never read through a link
    if kind == "symlink":
        assert warm_path.readlink() == secret and "secret-hash" in secret.read_text()
    else:
        assert warm_path.is_fifo() if kind == "fifo" else warm_path.is_dir()


def test_the_warm_file_keeps_only_active_clients_most_recent_last(
    devca: ServerFiles, registry: Path, make_client: MakeClient, tmp_path: Path
) -> None:
    """A revoked client and a re-keyed client's old certificate leave the file; an enrolled
    client that did not connect this time stays."""
    alice, bob, carol, alice2 = (make_client(n) for n in ("alice", "bob", "carol", "alice2"))
    for files, name in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
        enroll(registry, files.cert_path, name, ECHO_ALL)
    warm_file = tmp_path / "warm"
    config = replace(handover_config(registry, devca.cert, devca.key), warm_start=warm_file)

    def run(*clients: KeyPairFiles) -> list[bytes]:
        with start_server(config) as running:
            connect = Connect(running, devca)
            settle(connect)  # clients outside the warm file get in after the handover
            for files in clients:
                assert whoami(connect.stub(files.cert_path, files.key_path))
        return list(load(warm_file))

    assert sorted(run(alice, bob, carol)) == sorted(
        f.fingerprint.digest for f in (alice, bob, carol)
    )
    revoke(registry, "bob")
    enroll(registry, alice2.cert_path, "alice", replace=True)
    assert run(alice2) == [carol.fingerprint.digest, alice2.fingerprint.digest]


def test_the_warm_file_stays_under_its_cap_keeping_the_most_recent(tmp_path: Path) -> None:
    """A file at the cap that gains clients drops the least recently seen, so the next start
    still reads it (a file over MAX_BYTES is ignored whole)."""
    digests = [hashlib.sha256(b"%d" % i).digest() for i in range(MAX_CLIENTS + 100)]
    warm_file = tmp_path / "warm"
    warm_file.write_text("".join(f"{d.hex()}\n" for d in digests[:MAX_CLIENTS]))
    warm = WarmSet(warm_file)
    first, named = warm.first(frozenset(digests))
    assert named == MAX_CLIENTS and first == frozenset(
        digests[MAX_CLIENTS - FIRST_MAX : MAX_CLIENTS]
    )
    for digest in digests[MAX_CLIENTS:]:  # 100 new clients (say, rotated keys) connect
        warm.seen(digest)
    warm.save(frozenset(digests))
    assert warm_file.stat().st_size <= MAX_BYTES
    assert list(load(warm_file)) == digests[100:]
