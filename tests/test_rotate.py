"""`pinrpc rotate` when things go wrong: nothing the server may trust is ever lost."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from client import cli, keyfiles
from client.keyfiles import old
from pinrpc.cli import Exit
from pinrpc.identity import Fingerprint, KeyPairFiles, create_identity, load_certificate
from server.registry_model import Client
from server.registry_sqlite import SqliteRegistry
from tests.certs import make_cert, p256, write_pair
from tests.conftest import Connect, MakeClient, registry_dump
from tests.security.attacker import BIN
from tests.test_client_cli import run


@contextmanager
def registry_write_locked(registry: Path, until: Callable[[], bool]) -> Iterator[threading.Thread]:
    """Hold the server's SQLite registry write-locked (as another writer would) until ``until()``
    holds, at most 5 s; the server's Rotate waits for it meanwhile."""
    locked = threading.Event()

    def hold() -> None:
        db = sqlite3.connect(registry, isolation_level=None)
        try:
            db.execute("BEGIN EXCLUSIVE")
            locked.set()
            deadline = time.monotonic() + 5
            while not until() and time.monotonic() < deadline:
                time.sleep(0.02)
            db.execute("COMMIT")
        finally:
            db.close()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert locked.wait(5)
        yield holder
    finally:
        holder.join()


def new(path: Path) -> Path:
    return path.with_name(path.name + ".new")


def pair_bytes(files: KeyPairFiles) -> tuple[bytes, bytes]:
    return files.cert_path.read_bytes(), files.key_path.read_bytes()


def staged_flags(connect: Connect, files: KeyPairFiles) -> list[str]:
    flags = connect.cli_flags(files)
    flags[flags.index("--cert") + 1] = str(new(files.cert_path))
    flags[flags.index("--key") + 1] = str(new(files.key_path))
    return flags


def test_unknown_outcome_keeps_the_new_pair_and_the_next_rotate_settles_it(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    before = pair_bytes(alice)
    timed_out = threading.Event()
    with registry_write_locked(connect.server_registry, timed_out.is_set):
        code, _, err = run(["rotate", *connect.cli_flags(alice), "--timeout", "1"], capsys)
        assert pair_bytes(alice) == before  # the current pair is untouched
        assert new(alice.key_path).stat().st_mode & 0o777 == 0o600
        assert code == Exit.CONNECT
        assert "no answer from" in err and "may or may not have been processed" in err
        assert "outcome is unknown" in err and "asks the server" in err
        # The server is still deciding (its registry busy): it refuses the staged pair for
        # now, which must not remove it, or what it enrolls next would be lost.
        staged = new(alice.cert_path).read_bytes()
        code, _, err = run(["rotate", *connect.cli_flags(alice)], capsys)
        assert code == Exit.ERROR and err.count("\n") == 1 and "may still be deciding" in err
        assert new(alice.cert_path).read_bytes() == staged
        timed_out.set()
    # The server went on to enroll it once the registry was free: the next rotate asks it
    # and swaps the kept pair in, without rotating again.
    connect.server.trust.poll()
    code, out, _ = run(["whoami", *staged_flags(connect, alice)], capsys)
    assert code == Exit.OK and "name         alice" in out
    listed = registry_dump(connect.server_registry, capsys)
    code, out, err = run(["rotate", *connect.cli_flags(alice)], capsys)
    assert code == Exit.OK and err.count("\n") == 1 and "settled" in err and out == ""
    assert registry_dump(connect.server_registry, capsys) == listed
    assert alice.cert_path.read_bytes() == staged and old(alice.cert_path).read_bytes() == before[0]
    assert not new(alice.cert_path).exists() and not new(alice.key_path).exists()


def test_interrupted_rotation_keeps_the_new_pair_and_says_how_to_finish(
    connect: Connect, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the server decides leaves the outcome as unknown as a timeout does."""
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    before = pair_bytes(alice)
    released, deciding = threading.Event(), threading.Event()
    real_rotate = SqliteRegistry.rotate

    def spied_rotate(self: SqliteRegistry, *args: Any) -> list[Client]:
        deciding.set()  # the server has the call: the real rotate now waits for the lock
        return real_rotate(self, *args)

    monkeypatch.setattr(SqliteRegistry, "rotate", spied_rotate)
    with registry_write_locked(connect.server_registry, released.is_set):
        argv = [str(BIN / "pinrpc"), "rotate", *connect.cli_flags(alice), "--timeout", "20"]
        rotate = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        try:
            # Not 0.3 s after staging: a client slower to send the call got SIGINT before it.
            assert deciding.wait(15), "the server never received the Rotate call"
            rotate.send_signal(signal.SIGINT)
            _, err = rotate.communicate(timeout=15)
        finally:
            released.set()
            if rotate.poll() is None:
                rotate.kill()
    assert rotate.returncode == 130
    assert "outcome is unknown" in err and "Traceback" not in err
    assert pair_bytes(alice) == before
    assert new(alice.cert_path).exists() and new(alice.key_path).exists()


def test_a_key_shared_with_its_group_stays_shared(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """alice's key is readable by a service's group: the rotated key is too (it was 0600 and
    the service lost its key at the swap); bob's private key stays private."""
    alice, bob = make_client("alice"), make_client("bob")
    # Any group but the user's own: root may pick nogroup; others one they belong to.
    others = [g for g in os.getgroups() if g != os.getgid()]
    shared_group = 65534 if os.geteuid() == 0 else (others or [os.getgid()])[0]
    os.chown(alice.key_path, -1, shared_group)
    alice.key_path.chmod(0o640)
    for client in (alice, bob):
        connect.enroll(client, client.cert_path.stem)
        flags = [*connect.cli_flags(client), "--insecure-key-permissions"]
        code, _, err = run(["rotate", *flags], capsys)
        assert code == Exit.OK, err
    assert alice.key_path.stat().st_mode & 0o777 == 0o640
    assert alice.key_path.stat().st_gid == shared_group
    assert bob.key_path.stat().st_mode & 0o777 == 0o600
    assert bob.key_path.stat().st_gid == os.getgid()


def test_a_group_the_user_may_not_give_fails_before_the_server_is_asked(
    connect: Connect, registry: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """nobody's key is shared with root's group (as root set it up): the new key cannot get
    that group. The error named neither the group nor the file (a bare EPERM)."""
    nobody = 65534
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="pinrpc-nobody-") as tmp:
        keys = Path(tmp)
        alice = create_identity("alice", keys)
        shutil.copy(connect.devca.ca_path, keys / "ca.pem")
        for path in [keys, *keys.iterdir()]:
            os.chown(path, nobody, nobody)
        os.chown(alice.key_path, -1, 0)
        alice.key_path.chmod(0o640)
        connect.enroll(alice, "alice")
        before = registry_dump(registry, capsys)
        flags = [*connect.cli_flags(alice), "--ca", str(keys / "ca.pem")]
        argv = ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups",
                sys.executable, "-m", "client.cli", "rotate", *flags,
                "--insecure-key-permissions"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
        assert done.returncode == Exit.ERROR, done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
        assert f"next to {alice.cert_path}: cannot give it group 0" in done.stderr
        assert sorted(p.name for p in keys.iterdir()) == ["alice.crt", "alice.key", "ca.pem"]
        assert registry_dump(registry, capsys) == before


def test_definite_refusal_removes_the_new_pair(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    code, _, err = run(["rotate", *connect.cli_flags(alice)], capsys)
    assert code == Exit.OK, err
    # The retired pair still gets in during the overlap, but may not rotate again.
    retired = KeyPairFiles(old(alice.key_path), old(alice.cert_path), alice.fingerprint)
    code, _, err = run(["rotate", *connect.cli_flags(retired)], capsys)
    assert code == Exit.ERROR
    assert "the server refused" in err and "outcome is unknown" not in err
    assert not new(retired.cert_path).exists() and not new(retired.key_path).exists()


def test_unreachable_server_stages_nothing(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    mallory = make_client("mallory")  # never enrolled: the WhoAmI before staging fails
    code, _, err = run(["rotate", *connect.cli_flags(mallory)], capsys)
    assert code == Exit.CONNECT and "closed the connection during the TLS handshake" in err
    assert sorted(p.name for p in mallory.cert_path.parent.iterdir() if "mallory" in p.name) == [
        "mallory.crt",
        "mallory.key",
    ]


@pytest.mark.parametrize(
    "obstacle", ["alice.crt.old", "alice.key.old", "alice.crt.old-until", "alice.crt.old-until.new"]
)
def test_swap_obstacle_is_refused_before_asking_the_server(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str], obstacle: str
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    (alice.cert_path.parent / obstacle / "x").mkdir(parents=True)
    listed = registry_dump(connect.server_registry, capsys)
    before = pair_bytes(alice)
    code, _, err = run(["rotate", *connect.cli_flags(alice)], capsys)
    assert code == Exit.ERROR and err.count("\n") == 1
    assert f"{obstacle} is in the way of the rotation" in err
    assert registry_dump(connect.server_registry, capsys) == listed
    assert pair_bytes(alice) == before and not new(alice.key_path).exists()


def test_swap_failure_after_the_server_said_yes_rolls_back_and_keeps_the_new_pair(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    before = pair_bytes(alice)
    in_the_way = old(alice.cert_path) / "x"

    def staged_then_block() -> bool:
        # Once the pair is staged (the checks are done), put a directory where the swap
        # moves the old certificate, then let the server answer.
        if new(alice.cert_path).exists():
            in_the_way.mkdir(parents=True, exist_ok=True)
            return True
        return False

    with registry_write_locked(connect.server_registry, staged_then_block):
        code, out, err = run(["rotate", *connect.cli_flags(alice), "--timeout", "10"], capsys)
    assert code == Exit.ERROR
    assert str(Fingerprint.of(load_certificate(new(alice.cert_path)))) in err
    assert "the server enrolled the new pair, but cannot swap the key pair" in err
    assert f"mv {new(alice.key_path)} {alice.key_path}" in err
    assert pair_bytes(alice) == before  # rolled back: still a matching pair
    assert not old(alice.key_path).exists()
    # The pair the server now trusts is kept, and works.
    connect.server.trust.poll()
    code, out, _ = run(["whoami", *staged_flags(connect, alice)], capsys)
    assert code == Exit.OK and "name         alice" in out


def test_a_closed_stdout_does_not_stop_the_swap(connect: Connect, make_client: MakeClient) -> None:
    """`pinrpc rotate | true` in the Docker image (PYTHONUNBUFFERED=1): the first print fails
    with EPIPE. The server has rotated by then, so the files must be swapped all the same."""
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    before = pair_bytes(alice)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is printed
    try:
        done = subprocess.run(
            [str(BIN / "pinrpc"), "rotate", *connect.cli_flags(alice)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    finally:
        os.close(write_end)
    assert done.returncode == Exit.OK and "Traceback" not in done.stderr
    assert not new(alice.cert_path).exists() and not new(alice.key_path).exists()
    assert (old(alice.cert_path).read_bytes(), old(alice.key_path).read_bytes()) == before
    connect.server.trust.poll()
    code = cli.main(["whoami", *connect.cli_flags(alice)])
    assert code == Exit.OK  # the swapped-in pair is the one the server now names


@pytest.mark.parametrize("overlap", ["-1", "4294967296", "5000000000", "x"])
def test_bad_overlap_is_a_usage_error_and_writes_nothing(
    make_client: MakeClient, capsys: pytest.CaptureFixture[str], overlap: str
) -> None:
    alice = make_client("alice")
    argv = ["rotate", "--server", "127.0.0.1:1", "--cert", str(alice.cert_path),
            "--key", str(alice.key_path), "--overlap", overlap]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        run(argv, capsys)
    assert info.value.code == Exit.USAGE
    assert "--overlap" in capsys.readouterr().err
    assert sorted(p.name for p in alice.cert_path.parent.iterdir()) == ["alice.crt", "alice.key"]


def test_marker_without_timezone_is_read_as_utc(make_client: MakeClient) -> None:
    alice = make_client("alice")
    marker = alice.cert_path.with_name("alice.crt.old-until")
    for path in (old(alice.cert_path), old(alice.key_path)):
        path.write_bytes(b"retired")
    marker.write_text((dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M"))
    assert not keyfiles.remove_expired_old_pair(alice.cert_path, alice.key_path)
    assert old(alice.key_path).exists()
    marker.write_text("2020-01-01T00:00:00")
    assert keyfiles.remove_expired_old_pair(alice.cert_path, alice.key_path)
    assert not old(alice.key_path).exists() and not marker.exists()


def common_name(cert: Path) -> str:
    return str(load_certificate(cert).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_the_new_certificate_carries_the_servers_name_not_the_old_cn(
    connect: Connect, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Made by another tool (openssl, a CA's portal): enrollment accepts any CN, and this one
    # is no valid client name.
    key = p256()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Alice Smith")])
    cert_path, key_path = write_pair(
        tmp_path / "keys", "alice", key, make_cert(key, subject, key_cert_sign=False)
    )
    alice = KeyPairFiles(key_path, cert_path, Fingerprint.of(load_certificate(cert_path)))
    connect.enroll(alice, "alice")
    code, out, err = run(["rotate", *connect.cli_flags(alice)], capsys)
    assert code == Exit.OK, err
    assert common_name(cert_path) == "alice" and common_name(old(cert_path)) == "Alice Smith"
    connect.server.trust.poll()
    code, out, _ = run(["whoami", *connect.cli_flags(alice)], capsys)
    assert code == Exit.OK and "name         alice" in out
