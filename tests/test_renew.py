"""The server certificate's life under production faults: renewals killed, CAs down, odd
certificates written into place, all against a real pebble and a real server."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from pinrpc.channel import secure_channel
from pinrpc.errors import ServerCertError
from pinrpc.identity import (
    KeyPairFiles,
    PrivateKey,
    cert_to_pem,
    key_to_pem,
    load_private_key,
    same_public_key,
    write_all,
    write_atomic,
)
from pinrpc.v1 import echo_pb2_grpc
from server.acme import LOCK_NAME, obtain_certificate
from server.acme import main as acme_main
from server.app import start_server
from server.config import ServerConfig
from server.devca import DevCA, Issued
from tests.certs import make_cert, name, p256, rsa_key
from tests.conftest import (
    SERVER_NAME,
    Connect,
    MakeClient,
    ServerFiles,
    admitted,
    enroll,
    eventually,
    require_pebble,
    revoke,
    whoami,
)
from tests.pebble import Pebble, start_pebble
from tests.ports import free_port
from tests.test_server_cert import served_chain, served_serial

LEAF_ONLY = "holds no intermediate"
NAME = SERVER_NAME
NAMES = [SERVER_NAME, "127.0.0.1"]
ROOT = Path(__file__).parent.parent


def _warned_leaf_only(
    cert: x509.Certificate, key: PrivateKey, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> bool:
    """Whether a real server started on this lone certificate warns that it lacks a chain."""
    cert_path, key_path = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    write_all([(key_path, key_to_pem(key), 0o600), (cert_path, cert_to_pem(cert), 0o644)],
              overwrite=True)  # fmt: skip
    config = ServerConfig("127.0.0.1:0", cert_path, key_path, str(tmp_path / "registry.db"))
    with caplog.at_level(logging.INFO, logger="pinrpc.trust"), start_server(config):
        assert "serving server certificate" in caplog.text
    return LEAF_ONLY in caplog.text


@pytest.mark.parametrize("make_key", [p256, lambda: rsa_key(2048)], ids=["ecdsa", "rsa"])
@pytest.mark.parametrize("spelling", ["case", "string type"])
def test_a_self_signed_certificate_named_differently_by_its_issuer_gets_no_warning(
    make_key: object, spelling: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Self-signed (its own key made the signature), although its issuer field reads
    'Server.Test' where the subject says 'server.test', or in another ASN.1 string type."""
    key = make_key()  # type: ignore[operator]
    if spelling == "case":
        issuer = name("Server.Test")
    else:
        printable = x509.NameAttribute(
            NameOID.COMMON_NAME, "server.test", x509.name._ASN1Type.PrintableString
        )
        issuer = x509.Name([printable])
    cert = make_cert(key, "server.test", issuer=issuer)
    assert _warned_leaf_only(cert, key, tmp_path, caplog) is False


def test_a_ca_issued_leaf_under_its_own_name_alone_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issued by a CA whose name equals the leaf's: without the CA's certificate clients
    cannot verify it, whatever the names say."""
    key, ca_key = p256(), p256()
    cert = make_cert(key, "server.test", issuer=name("server.test"), signer=ca_key)
    assert _warned_leaf_only(cert, key, tmp_path, caplog) is True


# -- a renewal killed while it writes its files -------------------------------------------


def _stub(port: int, client: KeyPairFiles, pebble: Pebble) -> echo_pb2_grpc.EchoStub:
    target = f"127.0.0.1:{port}"
    channel = secure_channel(target, client.cert_path, client.key_path, pebble.root_path, NAME)
    return echo_pb2_grpc.EchoStub(channel)


def _obtain_cert_argv(pebble: Pebble, out: Path) -> list[str]:
    """obtain-cert as a cron job runs it, in a process of its own."""
    argv = [sys.executable, "-m", "server.acme", "--directory", pebble.directory_url]
    argv += ["--domain", NAME, "--out", str(out), "--http-port", str(free_port())]
    return [*argv, "--ca-bundle", str(pebble.acme_ca_bundle)]


# Python raises the audit event "os.rename" as os.replace is about to call rename(2): the
# process SIGKILLs itself there, as the OOM killer or a reboot would.
_KILL_AT_RENAME = """
import os, signal, sys
count, renames = int(sys.argv.pop(1)), []
def hook(event, args):
    if event == "os.rename":
        renames.append(args)
        if len(renames) == count:
            os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
from server.acme import main
sys.exit(main(sys.argv[1:]))
"""


def _killed_at_rename(count: int, pebble: Pebble, out: Path) -> None:
    argv = _obtain_cert_argv(pebble, out)
    killed = _run([sys.executable, "-c", _KILL_AT_RENAME, str(count), *argv[3:]])
    assert killed.returncode == -signal.SIGKILL, killed.stderr


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)


def _pair_matches(out: Path) -> bool:
    key = load_private_key(out / "privkey.pem")
    return same_public_key(key, x509.load_pem_x509_certificates(_chain(out))[0])


def _chain(out: Path) -> bytes:
    return (out / "fullchain.pem").read_bytes()


def _hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME)


def _obtained(
    pebble: Pebble, registry: Path, make_client: MakeClient, out: Path
) -> tuple[KeyPairFiles, ServerConfig]:
    """A certificate obtained into ``out``, alice enrolled, and a server serving ``out``."""
    assert _run(_obtain_cert_argv(pebble, out)).returncode == 0
    alice = make_client("alice")
    enroll(registry, alice.cert_path, "alice")
    config = ServerConfig("127.0.0.1:0", out / "fullchain.pem", out / "privkey.pem",
                          str(registry), poll_interval=0.05)  # fmt: skip
    return alice, config


@pytest.mark.parametrize("rename", [1, 2, 3, 4])
def test_a_renewal_killed_at_each_rename_never_breaks_the_server_and_the_next_one_cleans_up(
    pebble: Pebble, registry: Path, make_client: MakeClient, tmp_path: Path, rename: int
) -> None:
    """SIGKILL as the run enters its Nth rename(2) leaves at most the
    last rename undone: privkey.pem and fullchain.pem still match unless it stopped right
    between them. The running server keeps a matching pair throughout; the next run writes
    a full set and deletes the killed run's temporary files and key backups."""
    out = tmp_path / "tls"
    alice, config = _obtained(pebble, registry, make_client, out)
    with start_server(config) as running:
        first = running.trust.server_cert.leaf.serial_number
        _killed_at_rename(rename, pebble, out)
        assert _hidden(out), "the kill left no temporary file: it hit no rename"
        assert _pair_matches(out) is (rename != 4)
        time.sleep(0.3)  # several polls over the killed run's files
        running.trust.poll()
        # A handshake proves the served pair matches; a call proves the server still serves.
        assert served_serial(running.port, alice) == first
        assert admitted(_stub(running.port, alice, pebble))

        renewed = _run(_obtain_cert_argv(pebble, out))
        assert renewed.returncode == 0, renewed.stderr
        assert _pair_matches(out)
        assert _hidden(out) == []
        assert stat.S_IMODE((out / "privkey.pem").stat().st_mode) == 0o600
        second = x509.load_pem_x509_certificates(_chain(out))[0].serial_number
        eventually(lambda: served_serial(running.port, alice) == second, timeout=5)


def test_a_renewal_killed_between_key_and_chain_is_completed_even_when_the_ca_is_down(
    pebble: Pebble, registry: Path, make_client: MakeClient, tmp_path: Path
) -> None:
    """Killed as it renames fullchain.pem, after privkey.pem: the next run puts the chain
    together from cert.pem and chain.pem before it needs the CA, so a restart meanwhile
    would work and the running server moves on to the renewed pair."""
    out = tmp_path / "tls"
    alice, config = _obtained(pebble, registry, make_client, out)
    with start_server(config) as running:
        _killed_at_rename(4, pebble, out)
        assert not _pair_matches(out)
        renewed = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes()).serial_number
        down = _obtain_cert_argv(pebble, out)
        down[down.index("--directory") + 1] = f"https://127.0.0.1:{free_port()}/dir"
        failed = _run(down)
        assert failed.returncode == 1 and "cannot reach the ACME server" in failed.stderr
        assert _pair_matches(out)
        eventually(lambda: served_serial(running.port, alice) == renewed, timeout=5)
        assert admitted(_stub(running.port, alice, pebble))


# -- a chain rewritten in place ------------------------------------------------------------


def test_a_chain_caught_between_its_leaf_and_its_intermediate_is_not_served(
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A deploy hook's `cat cert.pem chain.pem > fullchain.pem` writes the leaf, then the
    intermediate: a poll between the two reads a whole certificate that matches the key, but
    clients that verify with ordinary roots cannot verify it without its intermediate."""
    first = devca.ca.issue(NAMES)
    cert, key = first.write(tmp_path / "srv")
    config = ServerConfig("127.0.0.1:0", cert, key, str(registry), poll_interval=60)
    alice = make_client("alice")
    with caplog.at_level(logging.INFO, logger="pinrpc.trust"), start_server(config) as running:
        Connect(running, devca).enroll(alice, "alice")
        second = devca.ca.issue(NAMES)
        write_atomic(key, key_to_pem(second.key), 0o600)
        with cert.open("wb") as chain:  # truncated, as the shell's > does
            chain.write(cert_to_pem(second.leaf))
            chain.flush()
            running.trust.poll()
            assert "not reloaded" in caplog.text and "without the intermediate" in caplog.text
            assert [c.serial_number for c in served_chain(running.port, alice)] == [
                first.leaf.serial_number, devca.ca.intermediate.serial_number
            ]  # fmt: skip
            chain.write(cert_to_pem(devca.ca.intermediate))
        running.trust.poll()
        assert [c.serial_number for c in served_chain(running.port, alice)] == [
            second.leaf.serial_number, devca.ca.intermediate.serial_number
        ]  # fmt: skip
        stub = Connect(running, devca).stub(alice.cert_path, alice.key_path)
        assert whoami(stub).name == "alice"
        assert LEAF_ONLY not in caplog.text


def test_a_leaf_alone_after_a_self_signed_certificate_is_served_with_the_warning(
    devca: ServerFiles, registry: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Only a chain that loses an intermediate is held back: a self-signed certificate has
    none, so its CA-issued successor loads (warned about, as at start)."""
    own = p256()
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    write_all([(key, key_to_pem(own), 0o600), (cert, cert_to_pem(make_cert(own, NAME)), 0o644)],
              overwrite=True)  # fmt: skip
    config = ServerConfig("127.0.0.1:0", cert, key, str(registry), poll_interval=60)
    with caplog.at_level(logging.INFO, logger="pinrpc.trust"), start_server(config) as running:
        issued = devca.ca.issue(NAMES)
        write_all([(key, key_to_pem(issued.key), 0o600), (cert, cert_to_pem(issued.leaf), 0o644)],
                  overwrite=True)  # fmt: skip
        running.trust.poll()
        assert running.trust.server_cert.leaf == issued.leaf
        assert LEAF_ONLY in caplog.text and "not reloaded" not in caplog.text


# -- renewals that change what is served ----------------------------------------------------


def _obtain(pebble: Pebble, out: Path, key_type: str = "ec256") -> int:
    ca = pebble.acme_ca_bundle
    result = obtain_certificate(pebble.directory_url, [NAME], out, http_port=free_port(),
                                acme_ca_bundle=ca, key_type=key_type)  # fmt: skip
    return result.serial


def test_a_renewal_that_changes_the_key_type_is_served_both_ways(
    pebble: Pebble, registry: Path, make_client: MakeClient, tmp_path: Path
) -> None:
    out = tmp_path / "tls"
    _obtain(pebble, out, "ec256")
    alice = make_client("alice")
    enroll(registry, alice.cert_path, "alice")
    config = ServerConfig("127.0.0.1:0", out / "fullchain.pem", out / "privkey.pem",
                          str(registry), poll_interval=0.05)  # fmt: skip
    with start_server(config) as running:
        stub = _stub(running.port, alice, pebble)  # opened before the switches
        assert admitted(stub)
        kinds = (("rsa2048", rsa.RSAPublicKey), ("ec384", ec.EllipticCurvePublicKey))
        for key_type, kind in kinds:
            serial = _obtain(pebble, out, key_type)
            eventually(lambda: served_serial(running.port, alice) == serial, timeout=5)  # noqa: B023
            assert isinstance(served_chain(running.port, alice)[0].public_key(), kind)
            assert admitted(_stub(running.port, alice, pebble))
            assert admitted(stub)


def test_a_directory_swapped_by_symlink_is_picked_up_whole(
    pebble: Pebble, registry: Path, make_client: MakeClient, tmp_path: Path
) -> None:
    """--cert and --key under current/, a symlink re-pointed (rename(2)) from one complete
    directory to the next: the pair switches together, and a directory swapped back to an
    older, mismatched or expired state is handled like any other file change."""
    _obtain(pebble, tmp_path / "v1")
    second = _obtain(pebble, tmp_path / "v2")
    current = tmp_path / "current"
    current.symlink_to("v1")
    alice = make_client("alice")
    enroll(registry, alice.cert_path, "alice")
    config = ServerConfig("127.0.0.1:0", current / "fullchain.pem", current / "privkey.pem",
                          str(registry), poll_interval=0.05)  # fmt: skip
    with start_server(config) as running:
        first = served_serial(running.port, alice)
        staging = tmp_path / "current.new"
        staging.symlink_to("v2")
        staging.replace(current)
        eventually(lambda: served_serial(running.port, alice) == second, timeout=5)
        # A directory whose key is not the certificate's: the pair served stays.
        (tmp_path / "v3").mkdir()
        shutil.copy(tmp_path / "v1" / "fullchain.pem", tmp_path / "v3")
        shutil.copy(tmp_path / "v2" / "privkey.pem", tmp_path / "v3")
        staging.symlink_to("v3")
        staging.replace(current)
        time.sleep(0.3)
        assert served_serial(running.port, alice) == second
        staging.symlink_to("v1")
        staging.replace(current)
        eventually(lambda: served_serial(running.port, alice) == first, timeout=5)
        assert admitted(_stub(running.port, alice, pebble))


def test_a_renewal_while_the_ca_is_down_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CA answered the first run and is gone at renewal time (stopped, not a bad URL)."""
    require_pebble()
    out = tmp_path / "tls"
    with start_pebble(tmp_path / "pebble") as gone:
        _obtain(gone, out)
        argv = _obtain_cert_argv(gone, out)[3:]  # the same flags, in-process
    before = {p.name: (p.read_bytes(), p.stat().st_mode) for p in out.iterdir()}
    capsys.readouterr()
    assert acme_main(argv) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("obtain-cert: error: cannot reach the ACME server") and err.count("\n") == 1
    )
    assert {p.name: (p.read_bytes(), p.stat().st_mode) for p in out.iterdir()} == before


def test_a_chain_whose_intermediate_did_not_issue_the_leaf_is_refused(
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The CA issues from several intermediates (Let's Encrypt's R10 and R11), and a hook that
    appends a fixed one gets it wrong half the time: no client could verify such a chain."""
    other_ca = DevCA("another CA")
    first = devca.ca.issue(NAMES)
    cert, key = first.write(tmp_path / "srv")
    config = ServerConfig("127.0.0.1:0", cert, key, str(registry), poll_interval=60)
    alice = make_client("alice")
    with caplog.at_level(logging.INFO, logger="pinrpc.trust"), start_server(config) as running:
        Connect(running, devca).enroll(alice, "alice")
        second = devca.ca.issue(NAMES)
        wrong = cert_to_pem(second.leaf) + cert_to_pem(other_ca.intermediate)
        write_all([(key, key_to_pem(second.key), 0o600), (cert, wrong, 0o644)], overwrite=True)
        running.trust.poll()
        assert (
            "not reloaded" in caplog.text
            and "no certificate after the leaf issued it" in caplog.text
        )
        assert served_serial(running.port, alice) == first.leaf.serial_number
        # The right intermediate, with another CA's certificate after it: served as given.
        third = devca.ca.issue(NAMES)
        extra = b"".join(cert_to_pem(c) for c in (third.leaf, *third.chain, other_ca.intermediate))
        write_all([(key, key_to_pem(third.key), 0o600), (cert, extra, 0o644)], overwrite=True)
        running.trust.poll()
        assert served_serial(running.port, alice) == third.leaf.serial_number
        assert whoami(Connect(running, devca).stub(alice.cert_path, alice.key_path)).name == "alice"
    cert.write_bytes(wrong)
    key.write_bytes(key_to_pem(second.key))
    refused = pytest.raises(ServerCertError, match="no certificate after the leaf issued it")
    with refused, start_server(config):
        pass


def _damaged_issuer(issued: Issued) -> bytes:
    """The chain with one byte of the leaf's issuer name flipped to invalid UTF-8, as a bad
    disk or copy would: it loads, and the name raises only when read."""
    der = bytearray(issued.leaf.public_bytes(serialization.Encoding.DER))
    at = der.find(b"pinrpc dev CA intermediate")
    der[at] = 0xFF
    leaf = x509.load_der_x509_certificate(bytes(der))
    return b"".join(cert_to_pem(c) for c in (leaf, *issued.chain))


def test_a_certificate_with_a_damaged_name_stops_neither_the_server_nor_revocations(
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = devca.ca.issue(NAMES)
    cert, key = first.write(tmp_path / "srv")
    config = ServerConfig("127.0.0.1:0", cert, key, str(registry), poll_interval=0.05)
    alice = make_client("alice")
    with caplog.at_level(logging.INFO, logger="pinrpc.trust"), start_server(config) as running:
        connect = Connect(running, devca)
        connect.enroll(alice, "alice")
        second = devca.ca.issue(NAMES)
        damaged = _damaged_issuer(second)
        write_all([(key, key_to_pem(second.key), 0o600), (cert, damaged, 0o644)], overwrite=True)
        running.trust.poll()  # never raises: the poll thread would end with it
        assert "not reloaded" in caplog.text and "cannot be read" in caplog.text
        assert served_serial(running.port, alice) == first.leaf.serial_number
        revoke(registry, "alice")  # picked up by the poll thread, which is still running
        eventually(lambda: not admitted(connect.stub(alice.cert_path, alice.key_path)), 5)
    refused = pytest.raises(ServerCertError, match="cannot be read")
    with refused, start_server(config):
        pass
