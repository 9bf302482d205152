"""pinrpc doctor against real servers: each step passes for a good setup and fails for its fault."""

from __future__ import annotations

import datetime as dt
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.cli import main
from client.doctor import split_target
from pinrpc.cli import Exit
from pinrpc.identity import Fingerprint, KeyPairFiles, cert_to_pem
from server.app import RunningServer, start_server
from server.config import ServerConfig
from server.devca import DevCA
from tests.certs import make_cert, p256, write_pair
from tests.conftest import SERVER_NAME, Connect, MakeClient, ServerFiles, revoke

STEPS = (
    "client certificate",
    "trust roots",
    "resolve",
    "tcp connect",
    "tls handshake",
    "server chain",
    "server name",
    "client accepted",
    "whoami",
)


def doctor(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, str]]:
    """Run `pinrpc doctor`; return the exit code and each step's status line (and fix)."""
    capsys.readouterr()
    code = main(["doctor", *argv])
    out = capsys.readouterr().out
    steps: dict[str, str] = {}
    last = ""
    for line in out.splitlines():
        name = line[9:28].strip()
        if name in STEPS:
            steps[last := name] = line
        elif line.strip().startswith("fix:") and last:
            steps[last] += "\n" + line
    assert set(steps) == set(STEPS), out
    return code, steps


def status(line: str) -> str:
    return line.split()[0]


def test_enrolled_client_passes_every_step(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice", "/pinrpc.v1.Echo/Echo")
    code, steps = doctor(connect.cli_flags(alice), capsys)
    assert code == Exit.OK
    assert {status(line) for line in steps.values()} == {"ok"}
    assert "TLSv1.3, ALPN h2" in steps["tls handshake"]
    assert "enrolled as 'alice'; allowed: /pinrpc.v1.Echo/Echo" in steps["whoami"]


@pytest.mark.parametrize("revoked", [False, True], ids=["unenrolled", "revoked"])
def test_refused_client_certificate_is_named(
    connect: Connect,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
    revoked: bool,
) -> None:
    mallory = make_client("mallory")
    if revoked:
        connect.enroll(mallory, "mallory")
        revoke(connect.server_registry, "mallory")
        connect.server.trust.poll()
    code, steps = doctor(connect.cli_flags(mallory), capsys)
    assert code == Exit.CONNECT  # a refused handshake: the same code as `pinrpc whoami` gives
    refused = steps["client accepted"]
    assert status(refused) == "FAILED"
    assert "not enrolled, revoked or expired" in refused
    assert str(mallory.fingerprint) in refused
    assert "pinrpc-server list" in refused  # the fix line
    # The server side is fine: only the client certificate is the problem.
    for step in ("tls handshake", "server chain", "server name"):
        assert status(steps[step]) == "ok"
    assert status(steps["whoami"]) == "skipped"


def test_wrong_server_name_fails_the_name_step(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    flags = [*connect.cli_flags(alice), "--server-name", "other.test"]
    code, steps = doctor(flags, capsys)
    assert code == Exit.CONNECT
    assert status(steps["server name"]) == "FAILED"
    assert (
        "other.test is not among the certificate's names: DNS:server.test" in steps["server name"]
    )
    assert status(steps["server chain"]) == "ok"
    assert status(steps["client accepted"]) == "ok"
    assert status(steps["whoami"]) == "skipped"


def test_wrong_ca_fails_the_chain_step(
    connect: Connect,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    other = tmp_path / "other-ca.pem"
    other.write_bytes(DevCA("another CA").root_pem)
    code, steps = doctor([*connect.cli_flags(alice), "--ca", str(other)], capsys)
    assert code == Exit.CONNECT
    assert status(steps["server chain"]) == "FAILED"
    assert "not trusted" in steps["server chain"]
    assert "pass --ca with the root" in steps["server chain"]
    assert status(steps["server name"]) == "ok"
    assert status(steps["client accepted"]) == "ok"


def test_nothing_listening_fails_the_tcp_step(
    make_client: MakeClient, devca: ServerFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago and has no listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    alice = make_client("alice")
    flags = ["--server", f"127.0.0.1:{port}", "--cert", str(alice.cert_path)]
    flags += ["--key", str(alice.key_path), "--ca", str(devca.ca_path)]
    code, steps = doctor(flags, capsys)
    assert code == Exit.CONNECT
    assert status(steps["tcp connect"]) == "FAILED"
    assert "Connection refused" in steps["tcp connect"]
    assert status(steps["tls handshake"]) == "skipped"


def test_without_a_certificate_checks_the_server_only(
    connect: Connect, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = ["--server", connect.target, "--ca", str(connect.devca.ca_path)]
    code, steps = doctor([*flags, "--server-name", SERVER_NAME], capsys)
    assert code == Exit.OK
    assert status(steps["server chain"]) == "ok"
    assert status(steps["client accepted"]) == "skipped"
    assert "closes connections without a client certificate" in steps["client accepted"]


def test_flags_fall_back_to_environment(
    connect: Connect,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    flags = connect.cli_flags(alice)
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        monkeypatch.setenv("PINRPC_" + flag[2:].replace("-", "_").upper(), value)
    code, steps = doctor([], capsys)
    assert code == Exit.OK
    assert "enrolled as 'alice'" in steps["whoami"]


def test_certificate_expiring_soon_is_a_warning(
    connect: Connect,
    make_client: MakeClient,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    short = make_client("short", days=10)
    connect.enroll(short, "short")
    capsys.readouterr()
    assert main(["doctor", *connect.cli_flags(short)]) == Exit.OK
    assert "warning: expires in less than 30 days" in capsys.readouterr().out
    # --warn-days, and its PINRPC_WARN_DAYS fallback, as for the other commands.
    assert main(["doctor", *connect.cli_flags(short), "--warn-days", "5"]) == Exit.OK
    assert "warning" not in capsys.readouterr().out
    monkeypatch.setenv("PINRPC_WARN_DAYS", "5")
    assert main(["doctor", *connect.cli_flags(short)]) == Exit.OK
    assert "warning" not in capsys.readouterr().out
    assert main(["doctor", *connect.cli_flags(short), "--warn-days", "11"]) == Exit.OK
    assert "warning: expires in less than 11 days" in capsys.readouterr().out


def test_expired_certificate_exits_as_whoami_does_and_is_not_presented(
    connect: Connect, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = p256()
    ended = make_cert(key, "old", key_cert_sign=False, not_before=dt.datetime(2020, 1, 1), days=1)
    cert_path, key_path = write_pair(tmp_path, "old", key, ended)
    old = KeyPairFiles(key_path, cert_path, Fingerprint.of(ended))
    assert main(["whoami", *connect.cli_flags(old)]) == Exit.CONNECT
    code, steps = doctor(connect.cli_flags(old), capsys)
    assert code == Exit.CONNECT  # README: exit 3 for an expired certificate, whoami and doctor
    assert status(steps["client certificate"]) == "FAILED"
    assert "expired" in steps["client certificate"]
    # The handshake went without it: no step may claim the server refused it.
    assert status(steps["client accepted"]) == "skipped"
    assert str(old.fingerprint) not in steps["client accepted"]


def test_unreadable_key_is_a_local_error(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = make_client("alice")
    flags = connect.cli_flags(alice)
    flags[flags.index("--key") + 1] = str(alice.key_path.with_name("missing.key"))
    code, steps = doctor(flags, capsys)
    assert code == Exit.ERROR
    assert status(steps["client certificate"]) == "FAILED"
    assert "missing.key" in steps["client certificate"]
    assert status(steps["tls handshake"]) == "ok"  # the server is still checked
    assert status(steps["whoami"]) == "skipped"


@pytest.mark.parametrize(
    "server", ["no-port-here", "host:\u00b2", "[::1]", "::1:8443", ":8443", "host:0", "host:65536"]
)
def test_bad_address_is_a_usage_error(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["doctor", "--server", server])
    assert info.value.code == Exit.USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("pinrpc doctor: error: argument --server: not HOST:PORT")


@pytest.mark.parametrize(
    ("server", "split"),
    [
        ("[::1]:8443", ("::1", 8443)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("a.b:65535", ("a.b", 65535)),
    ],
)
def test_valid_addresses_split(server: str, split: tuple[str, int]) -> None:
    assert split_target(server) == split


@pytest.fixture
def odd_server(devca: ServerFiles, registry: Path, tmp_path: Path) -> Iterator[RunningServer]:
    """A server that sends its leaf without the intermediate and has a plaintext probe port."""
    issued = devca.ca.issue([SERVER_NAME])
    cert, key = issued.write(tmp_path / "leaf-only")
    cert.write_bytes(cert_to_pem(issued.leaf))
    config = ServerConfig(
        "127.0.0.1:0", cert, key, str(registry), health_listen="127.0.0.1:0", grace=1.0
    )
    with start_server(config) as running:
        yield running


def test_leaf_without_intermediate_and_plaintext_port(
    odd_server: RunningServer,
    devca: ServerFiles,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    alice: KeyPairFiles = make_client("alice")
    flags = ["--cert", str(alice.cert_path), "--key", str(alice.key_path)]
    flags += ["--ca", str(devca.ca_path), "--server-name", SERVER_NAME]
    code, steps = doctor(["--server", f"127.0.0.1:{odd_server.port}", *flags], capsys)
    assert code == Exit.CONNECT
    assert status(steps["server chain"]) == "FAILED"
    assert "serve fullchain.pem" in steps["server chain"]

    code, steps = doctor(["--server", f"127.0.0.1:{odd_server.health_port}", *flags], capsys)
    assert code == Exit.CONNECT
    assert status(steps["tls handshake"]) == "FAILED"
    assert "does not speak TLS" in steps["tls handshake"]
