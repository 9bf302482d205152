"""The server's own certificate: served as a full chain, hot-reloaded, broken renewals refused."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import shutil
import socket
import ssl
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from pinrpc.errors import ServerCertError
from pinrpc.identity import KeyPairFiles, cert_to_pem, write_atomic
from pinrpc.v1 import echo_pb2_grpc
from server import trust
from server.app import start_server
from server.config import ServerConfig
from server.devca import Issued
from tests.certs import certbot_link
from tests.conftest import (
    SERVER_NAME,
    Connect,
    MakeClient,
    ServerFiles,
    enroll,
    eventually,
    revoke,
    whoami,
)

NAMES = [SERVER_NAME, "127.0.0.1"]


def served_chain(port: int, client: KeyPairFiles) -> list[x509.Certificate]:
    """The whole chain a new connection is shown, as openssl s_client -showcerts prints it."""
    argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", SERVER_NAME,
            "-alpn", "h2", "-showcerts", "-cert", str(client.cert_path),
            "-key", str(client.key_path)]  # fmt: skip
    done = subprocess.run(argv, input=b"", capture_output=True, timeout=10, check=False)
    return x509.load_pem_x509_certificates(done.stdout)


def served_serial(port: int, client: KeyPairFiles) -> int:
    """The leaf a new connection is shown, read with Python's ssl module (not grpcio)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # we only look at what is presented
    ctx.load_cert_chain(client.cert_path, client.key_path)
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def certbot_install(live: Path, issued: Issued, version: int) -> None:
    tmp = live.parent / f"new{version}"
    certbot_link(live, *issued.write(tmp), version)


def test_full_chain_is_served(connect: Connect, make_client: MakeClient) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    chain = served_chain(connect.server.port, alice)
    assert [c.issuer for c in chain] == [
        connect.devca.ca.intermediate.subject,
        connect.devca.ca.root.subject,
    ]


def test_certbot_renewal_is_picked_up_without_restart(
    devca: ServerFiles, registry: Path, make_client: MakeClient, tmp_path: Path
) -> None:
    live = tmp_path / "letsencrypt" / "live" / SERVER_NAME
    first = devca.ca.issue(NAMES)
    certbot_install(live, first, 1)
    config = ServerConfig(
        "127.0.0.1:0", live / "fullchain.pem", live / "privkey.pem", str(registry),
        poll_interval=0.2,
    )  # fmt: skip
    alice = make_client("alice")
    with start_server(config) as running:
        connect = Connect(running, devca)
        connect.enroll(alice, "alice")
        old_channel = connect.stub(alice.cert_path, alice.key_path)
        assert whoami(old_channel).name == "alice"
        assert served_serial(running.port, alice) == first.leaf.serial_number

        second = devca.ca.issue(NAMES)
        certbot_install(live, second, 2)
        eventually(lambda: served_serial(running.port, alice) == second.leaf.serial_number, 10)
        assert whoami(old_channel).name == "alice"  # open connections keep working
        assert whoami(connect.stub(alice.cert_path, alice.key_path)).name == "alice"


BREAKAGES = [
    "mismatched key", "truncated chain", "garbage key", "half-written intermediate",
    "expired", "not yet valid", "intermediate first", "cert missing",
]  # fmt: skip


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_broken_renewal_keeps_the_previous_certificate(
    breakage: str,
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = devca.ca.issue(NAMES)
    cert, key = first.write(tmp_path / "srv")
    config = ServerConfig("127.0.0.1:0", cert, key, str(registry), poll_interval=0.1)
    alice = make_client("alice")
    with caplog.at_level(logging.INFO), start_server(config) as running:
        Connect(running, devca).enroll(alice, "alice")
        other = devca.ca.issue(NAMES)
        # Each breakage in one rename(2): write_bytes showed a poll an empty file first, a
        # reason of its own, logged in place of (or besides) the breakage's.
        if breakage == "mismatched key":
            other.write(tmp_path / "other")
            write_atomic(key, (tmp_path / "other" / "privkey.pem").read_bytes(), 0o600)
        elif breakage == "truncated chain":
            write_atomic(cert, other.fullchain_pem[:200], 0o644)
        elif breakage == "garbage key":
            write_atomic(key, b"-----BEGIN PRIVATE KEY-----\nnot a key\n", 0o600)
        elif breakage == "cert missing":
            cert.rename(tmp_path / "moved-away.pem")
        else:  # a certificate for the same key: only the chain or its dates are wrong
            write_atomic(cert, _same_key_chain(devca, first, breakage), 0o644)
        eventually(lambda: "not reloaded" in caplog.text, 10)
        # Counted at once, a line at every poll read as one: let 5 more polls (0.1 s) run.
        time.sleep(0.5)
        assert caplog.text.count("not reloaded") == 1  # logged once, not per poll
        assert served_serial(running.port, alice) == first.leaf.serial_number
        assert [c.serial_number for c in served_chain(running.port, alice)] == [
            first.leaf.serial_number, devca.ca.intermediate.serial_number
        ]  # fmt: skip
        stub = Connect(running, devca).stub(alice.cert_path, alice.key_path)
        assert whoami(stub).name == "alice"

        # Finishing the renewal properly is picked up.
        third = devca.ca.issue(NAMES)
        third.write(tmp_path / "srv")
        eventually(lambda: served_serial(running.port, alice) == third.leaf.serial_number, 10)


@pytest.mark.parametrize("swapped", ["cert", "key"])
def test_a_fifo_in_place_of_a_file_stops_neither_reloads_nor_revocations(
    swapped: str,
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cert, key = devca.ca.issue(NAMES).write(tmp_path / "srv")
    fifo = cert if swapped == "cert" else key
    config = ServerConfig("127.0.0.1:0", cert, key, str(registry), poll_interval=0.1)
    alice = make_client("alice")
    with caplog.at_level(logging.INFO), start_server(config) as running:
        connect = Connect(running, devca)
        connect.enroll(alice, "alice")
        stub = connect.stub(alice.cert_path, alice.key_path)
        assert whoami(stub).name == "alice"
        fifo.unlink()
        os.mkfifo(fifo)
        try:
            eventually(lambda: "not a regular file" in caplog.text, 2.0)
            # The poll thread is not stuck in open(): a revocation still takes effect.
            revoke(registry, "alice")
            eventually(lambda: _refused(stub), 2.0)
        finally:
            _unblock(fifo)  # old code waits in open(): let it go, so that the server can stop


def _unsupported_curve(tmp: Path, what: str) -> bytes:
    """A key on secp112r1 (which cryptography cannot use) or a certificate for one, from
    openssl: cryptography raises UnsupportedAlgorithm for it, no ValueError."""
    key = tmp / "secp112r1.key"
    argv = ["openssl", "ecparam", "-name", "secp112r1", "-genkey", "-noout", "-out", str(key)]
    subprocess.run(argv, check=True, capture_output=True, timeout=10)
    if what == "key":
        return key.read_bytes()
    argv = ["openssl", "req", "-x509", "-key", str(key), "-subj", "/CN=x", "-days", "1"]
    return subprocess.run(argv, check=True, capture_output=True, timeout=10).stdout


@pytest.mark.parametrize("swapped", ["cert", "key"])
def test_an_unsupported_key_type_stops_neither_reloads_nor_revocations(
    swapped: str,
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It escaped the poll as UnsupportedAlgorithm and ended the poll thread: no revocation
    took effect any more, and no later renewal."""
    cert, key = devca.ca.issue(NAMES).write(tmp_path / "srv")
    config = ServerConfig("127.0.0.1:0", cert, key, str(registry), poll_interval=0.05)
    alice = make_client("alice")
    with caplog.at_level(logging.INFO), start_server(config) as running:
        connect = Connect(running, devca)
        connect.enroll(alice, "alice")
        stub = connect.stub(alice.cert_path, alice.key_path)
        assert whoami(stub).name == "alice"
        (cert if swapped == "cert" else key).write_bytes(_unsupported_curve(tmp_path, swapped))
        eventually(lambda: "not reloaded" in caplog.text, 2.0)
        revoke(registry, "alice")
        eventually(lambda: _refused(stub), 2.0)
        third = devca.ca.issue(NAMES)
        third.write(tmp_path / "srv")
        eventually(lambda: "reloaded server certificate" in caplog.text, 2.0)
        assert running.trust.server_cert.leaf == third.leaf


def test_server_refuses_to_start_with_a_fifo(
    devca: ServerFiles, registry: Path, tmp_path: Path
) -> None:
    cert, key = devca.ca.issue(NAMES).write(tmp_path)
    cert.unlink()
    os.mkfifo(cert)
    # Old code waits in open() for a writer: one comes after 3 s, so that it fails, not hangs.
    timer = threading.Timer(3.0, lambda: _unblock(cert))
    timer.start()
    config = ServerConfig("127.0.0.1:0", cert, key, str(registry))
    try:
        with pytest.raises(ServerCertError, match="not a regular file"), start_server(config):
            pass
    finally:
        timer.cancel()


def _unblock(fifo: Path) -> None:
    """Let a reader waiting in open() on ``fifo`` go on (to end of file)."""
    with contextlib.suppress(OSError):  # no reader waiting
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def _refused(stub: echo_pb2_grpc.EchoStub) -> bool:
    try:
        whoami(stub)
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.PERMISSION_DENIED
    return False


def _same_key_chain(devca: ServerFiles, first: Issued, breakage: str) -> bytes:
    """A chain for first's key whose dates or layout are wrong, as ``breakage`` says."""
    now, day = dt.datetime.now(dt.UTC), dt.timedelta(days=1)
    if breakage == "expired":
        return devca.ca.issue(NAMES, key=first.key, not_before=now - 3 * day, days=1).fullchain_pem
    if breakage == "not yet valid":
        return devca.ca.issue(NAMES, key=first.key, not_before=now + day).fullchain_pem
    issued = devca.ca.issue(NAMES, key=first.key)
    leaf, intermediate = cert_to_pem(issued.leaf), cert_to_pem(issued.chain[0])
    if breakage == "intermediate first":
        return intermediate + leaf
    assert breakage == "half-written intermediate"
    return leaf + intermediate[:100]


def test_server_refuses_to_start_with_a_broken_pair(
    devca: ServerFiles, registry: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from server import cli

    a = devca.ca.issue(NAMES).write(tmp_path / "a")
    b = devca.ca.issue(NAMES).write(tmp_path / "b")
    argv = ["serve", "--listen", "127.0.0.1:0", "--cert", str(a[0]), "--key", str(b[1]),
            "--registry", str(registry)]  # fmt: skip
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "does not match" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("breakage", "fragment"),
    [
        ("expired", "is valid only from .* UTC; renew it"),
        ("not yet valid", "is valid only from .* UTC; check this machine's clock"),
        ("intermediate first", "must come first"),
        ("half-written intermediate", "incomplete certificate chain"),
    ],
)
def test_server_refuses_to_start_with_a_bad_chain(
    devca: ServerFiles, registry: Path, tmp_path: Path, breakage: str, fragment: str
) -> None:
    first = devca.ca.issue(NAMES)
    cert, key = first.write(tmp_path)
    cert.write_bytes(_same_key_chain(devca, first, breakage))
    config = ServerConfig("127.0.0.1:0", cert, key, str(registry))
    with pytest.raises(ServerCertError, match=fragment), start_server(config):
        pass


def test_expiry_warning(
    devca: ServerFiles, registry: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = devca.ca.issue(NAMES, days=3).write(tmp_path)
    config = ServerConfig("127.0.0.1:0", cert, key, str(registry), cert_warn_days=5)
    with caplog.at_level(logging.INFO), start_server(config):
        pass
    assert "server certificate expires in 3.0 days" in caplog.text
    assert f"names [{SERVER_NAME}, 127.0.0.1]" in caplog.text
    caplog.clear()
    config = ServerConfig("127.0.0.1:0", cert, key, str(registry), cert_warn_days=2)
    with caplog.at_level(logging.INFO), start_server(config):
        pass
    assert "expires in" not in caplog.text


def test_expiry_is_rechecked_while_running(
    devca: ServerFiles,
    registry: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Outside the one-day window at start, inside it two seconds later.
    monkeypatch.setattr(trust, "EXPIRY_SCAN_SECONDS", 0.1)
    not_after = dt.datetime.now(dt.UTC) + dt.timedelta(days=1, seconds=2)
    cert, key = devca.ca.issue(NAMES, not_after=not_after).write(tmp_path)
    config = ServerConfig("127.0.0.1:0", cert, key, str(registry), poll_interval=0.05,
                          cert_warn_days=1)  # fmt: skip
    with caplog.at_level(logging.INFO), start_server(config):
        assert "expires in" not in caplog.text
        eventually(lambda: "server certificate expires in 1.0 days" in caplog.text, 5.0)
        time.sleep(0.5)  # many checks: still one warning a day
    assert caplog.text.count("expires in") == 1


def test_expiry_while_running_is_logged_once_and_unhealthy(
    devca: ServerFiles, registry: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # No faster checks needed: the moment of expiry is always checked.
    not_after = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
    cert, key = devca.ca.issue(NAMES, not_after=not_after).write(tmp_path)
    config = ServerConfig("127.0.0.1:0", cert, key, str(registry), poll_interval=0.05,
                          cert_warn_days=0)  # fmt: skip
    with caplog.at_level(logging.INFO), start_server(config) as running:
        assert running.trust.healthy
        eventually(lambda: "server certificate expired at" in caplog.text, 5.0)
        assert not running.trust.healthy
        time.sleep(0.5)
    assert caplog.text.count("expired at") == 1
    assert "expires in" not in caplog.text


@pytest.mark.parametrize("breakage", ["key replaced by a directory", "key deleted"])
def test_a_refused_file_is_logged_once_per_state_and_its_recovery_too(
    breakage: str,
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(trust, "EXPIRY_SCAN_SECONDS", 0.1)  # the hourly retry, every 0.1 s
    first = devca.ca.issue(NAMES)
    cert, key = first.write(tmp_path / "srv")
    key_pem = key.read_bytes()
    config = ServerConfig("127.0.0.1:0", cert, key, str(registry), poll_interval=0.05)
    alice = make_client("alice")
    with caplog.at_level(logging.INFO), start_server(config) as running:
        Connect(running, devca).enroll(alice, "alice")

        def refusals() -> list[str]:
            return [r.getMessage() for r in caplog.records if "not reloaded" in r.getMessage()]

        # Between a file and a directory (either way) there is a moment with no key at all, a
        # state of its own that a poll may see: that one may be logged too, once.
        to_dir = breakage == "key replaced by a directory"
        expected, passing = (
            ("not a regular file", ["No such file"]) if to_dir else ("No such file", [])
        )
        key.unlink()
        if to_dir:
            key.mkdir()
        eventually(lambda: any(expected in line for line in refusals()), 2.0)
        time.sleep(1.0)  # 20 polls and 10 retries
        broken = refusals()
        assert str(key.absolute()) in broken[-1] and expected in broken[-1]
        assert all(any(p in line for p in passing) for line in broken[:-1]), broken
        assert len(broken) == len(set(broken)) <= 1 + len(passing), broken  # not once per poll
        assert served_serial(running.port, alice) == first.leaf.serial_number  # still serving

        if to_dir:
            key.rmdir()
        staged = key.with_name(key.name + ".new")  # in place at once: never empty, never loose
        staged.write_bytes(key_pem)
        staged.chmod(0o600)
        staged.replace(key)
        eventually(lambda: "usable again" in caplog.text, 2.0)
        time.sleep(0.5)
        assert caplog.text.count("usable again") == 1
        recovering = refusals()[len(broken) :]
        assert all(any(p in line for p in passing) for line in recovering), recovering
        assert len(recovering) <= len(passing), recovering
        assert f"usable again: {cert.absolute()}, {key.absolute()}" in caplog.text
        assert served_serial(running.port, alice) == first.leaf.serial_number


NOBODY = 65534


@contextlib.contextmanager
def _served_as_nobody(
    devca: ServerFiles, alice: KeyPairFiles, first: Issued
) -> Iterator[tuple[Path, int, list[str]]]:
    """A real `pinrpc-server serve` as nobody (root reads any file anyway) with first's
    files, alice enrolled; yields the key's path, the port and the stderr lines so far."""
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="pinrpc-nobody-") as tmp:
        srv = Path(tmp)
        srv.chmod(0o755)  # pytest's own directories are root's only
        cert, key = first.write(srv)
        registry = srv / "registry.db"
        enroll(registry, alice.cert_path, "alice")
        for path in srv.iterdir():
            os.chown(path, NOBODY, NOBODY)
        os.chown(srv, NOBODY, NOBODY)
        argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                sys.executable, "-m", "server.cli", "serve", "--listen", "127.0.0.1:0",
                "--cert", str(cert), "--key", str(key), "--registry", str(registry)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
        server = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(server.stderr or []), daemon=True)
        reader.start()
        try:
            eventually(lambda: any("(port " in line for line in lines), 20.0)
            (listening,) = [line for line in lines if "(port " in line]
            yield key, int(listening.rpartition("(port ")[2].rstrip(")\n")), lines
        finally:
            server.terminate()
            server.wait(timeout=30)
            reader.join(timeout=5)
            if server.stderr is not None:
                server.stderr.close()


def test_a_key_made_unreadable_while_serving_is_logged_and_so_is_its_repair(
    devca: ServerFiles, make_client: MakeClient
) -> None:
    """chmod 000 on the key of a server that runs as a non-root user: unnoticed until the
    next restart, which then failed."""
    first = devca.ca.issue(NAMES)
    alice = make_client("alice")
    with _served_as_nobody(devca, alice, first) as (key, port, lines):
        key.chmod(0)
        eventually(lambda: any("not reloaded" in line for line in lines), 5.0)
        time.sleep(1.0)  # five more polls
        (refused,) = [line for line in lines if "not reloaded" in line]
        assert f"{key}: Permission denied" in refused
        assert served_serial(port, alice) == first.leaf.serial_number  # still serving

        key.chmod(0o600)
        eventually(lambda: any("usable again" in line for line in lines), 5.0)
        assert served_serial(port, alice) == first.leaf.serial_number
    assert [line for line in lines if "not reloaded" in line] == [refused]


def _acl(path: Path, *, nobody_reads: bool) -> None:
    """setfacl -m u:nobody:r (or -x) as raw POSIX ACL bytes (no acl package needed): the
    mode stays 0640 either way, the mask being r."""
    anyone = 0xFFFFFFFF
    entries = [(0x01, 6, anyone), (0x04, 4, anyone)]  # owner rw, owning group r
    entries += [(0x02, 4, NOBODY)] if nobody_reads else []  # user nobody r
    entries += [(0x10, 4, anyone), (0x20, 0, anyone)]  # mask r, others none
    entries.sort(key=lambda e: (e[0], e[2]))
    packed = b"".join(struct.pack("<HHI", *e) for e in entries)
    os.setxattr(path, "system.posix_acl_access", struct.pack("<I", 2) + packed)


def test_a_key_whose_acl_no_longer_lets_the_server_read_it_is_logged(
    devca: ServerFiles, make_client: MakeClient
) -> None:
    """The server reads the key through an ACL entry. Removing it leaves mode, owner and
    group as they were: the signature missed it (the restart would fail), and so did it
    the repair (until the hourly retry)."""
    first = devca.ca.issue(NAMES)
    alice = make_client("alice")
    with _served_as_nobody(devca, alice, first) as (key, port, lines):
        # Root's, read through the ACL: set up on a copy and renamed into place, since a poll
        # between the steps logs each state (unreadable after chown, readable again after it).
        staged = key.with_name("privkey.pem.new")
        shutil.copy2(key, staged)
        os.chown(staged, 0, 0)
        _acl(staged, nobody_reads=True)
        os.replace(staged, key)
        _acl(key, nobody_reads=False)
        assert stat.S_IMODE(key.stat().st_mode) == 0o640
        eventually(lambda: any("not reloaded" in line for line in lines), 5.0)
        (refused,) = [line for line in lines if "not reloaded" in line]
        assert f"{key}: Permission denied" in refused

        _acl(key, nobody_reads=True)
        eventually(lambda: any("usable again" in line for line in lines), 5.0)
        assert served_serial(port, alice) == first.leaf.serial_number
        assert not any("reloaded server certificate" in line for line in lines)


def test_a_chmod_that_leaves_the_files_readable_changes_nothing(
    devca: ServerFiles, registry: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Mode and owner are watched now, but the same certificate is not handed over again
    (with --tls-reload handover that would build a new listener)."""
    cert, key = devca.ca.issue(NAMES).write(tmp_path)
    config = ServerConfig("127.0.0.1:0", cert, key, str(registry))
    with caplog.at_level(logging.INFO), start_server(config) as running:
        served = running.trust.server_cert
        key.chmod(0o640)
        running.trust.poll()
        key.chmod(0o600)
        running.trust.poll()
        assert running.trust.server_cert is served
    assert "reloaded" not in caplog.text
