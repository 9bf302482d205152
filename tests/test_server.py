"""The server's decisions, end to end: real server on loopback, real TLS, real clients."""

from __future__ import annotations

import datetime as dt
import logging
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest

from pinrpc.channel import load_pair, pair_credentials
from pinrpc.cli import env_name
from pinrpc.identity import Fingerprint, cert_to_pem, load_certificate, load_private_key
from pinrpc.v1 import echo_pb2, echo_pb2_grpc
from server import cli as server_cli
from server.app import start_server
from server.config import ServeError, ServerConfig
from server.enrollment import Candidate, check_certificate
from tests.certs import make_cert, name, p256, write_pair
from tests.conftest import (
    ECHO_ALL,
    SERVER_NAME,
    Connect,
    MakeClient,
    ServerFiles,
    admitted,
    code_of,
    enroll,
    eventually,
    revoke,
    whoami,
)
from tests.ports import free_port

DENIED = grpc.StatusCode.PERMISSION_DENIED
# A rejected handshake never reaches Python; the client sees the connection close.
REFUSED_AT_HANDSHAKE = grpc.StatusCode.UNAVAILABLE


def test_the_package_exports_load_on_first_use() -> None:
    # README's "from pinrpc import secure_channel" (conftest uses it for every channel here);
    # grpc loads only then, so the admin commands start without it (tests/test_enrollment.py).
    import pinrpc
    from pinrpc.channel import secure_channel

    assert pinrpc.secure_channel is secure_channel
    assert set(pinrpc.__all__) == {"Fingerprint", "PinrpcError", "secure_channel"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = pinrpc.nope


def test_enrolled_client_calls_every_method(
    connect: Connect, registry: Path, make_client: MakeClient
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice", ECHO_ALL)
    stub = connect.stub(alice.cert_path, alice.key_path)

    me = whoami(stub)
    assert (me.name, me.fingerprint) == ("alice", str(alice.fingerprint))
    assert list(me.allowed_methods) == [ECHO_ALL]
    reply = stub.Echo(echo_pb2.EchoRequest(message="hello"), timeout=5)
    assert (reply.message, reply.caller) == ("hello", "alice")
    messages = [echo_pb2.EchoRequest(message=str(i)) for i in range(5)]
    replies = list(stub.EchoStream(iter(messages), timeout=5))
    assert [(r.message, r.caller) for r in replies] == [(str(i), "alice") for i in range(5)]


def test_two_clients_are_told_apart(
    connect: Connect, registry: Path, make_client: MakeClient
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    connect.enroll(alice, "alice")
    connect.enroll(bob, "bob")
    assert whoami(connect.stub(alice.cert_path, alice.key_path)).name == "alice"
    assert whoami(connect.stub(bob.cert_path, bob.key_path)).name == "bob"


def test_unenrolled_client_is_refused_at_handshake(
    connect: Connect, registry: Path, make_client: MakeClient
) -> None:
    connect.enroll(make_client("alice"), "alice", ECHO_ALL)
    mallory = make_client("mallory")
    stub = connect.stub(mallory.cert_path, mallory.key_path)
    assert code_of(lambda: whoami(stub)) == REFUSED_AT_HANDSHAKE


def test_client_without_certificate_is_refused(
    connect: Connect, registry: Path, make_client: MakeClient, devca: ServerFiles
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice", ECHO_ALL)
    creds = grpc.ssl_channel_credentials(root_certificates=devca.ca_path.read_bytes())
    options = [("grpc.ssl_target_name_override", SERVER_NAME)]
    with grpc.secure_channel(connect.target, creds, options=options) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        assert code_of(lambda: whoami(stub)) == REFUSED_AT_HANDSHAKE
    # The same server admits alice: the refusal is about the missing certificate.
    assert whoami(connect.stub(alice.cert_path, alice.key_path)).name == "alice"


def test_expired_client_certificate_is_refused(connect: Connect, tmp_path: Path) -> None:
    key = p256()
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    cert = make_cert(key, "old", key_cert_sign=False, not_before=past, days=5)
    cert_path, key_path = write_pair(tmp_path, "old", key, cert)
    # Enrollment refuses expired certificates, so plant it directly in the registry.
    planted = check_certificate(cert_to_pem(cert), "old", now=past + dt.timedelta(days=1))
    connect.plant(planted, "old")
    # Presented on purpose: secure_channel() refuses an expired certificate before any call.
    creds = pair_credentials(*load_pair(cert_path, key_path), connect.devca.ca_path)
    override = [("grpc.ssl_target_name_override", SERVER_NAME)]
    with grpc.secure_channel(connect.target, creds, options=override) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        assert code_of(lambda: whoami(stub)) == REFUSED_AT_HANDSHAKE


def test_a_certificate_that_expires_is_refused_on_its_open_channel(
    connect: Connect, tmp_path: Path
) -> None:
    key = p256()
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = make_cert(key, "brief", key_cert_sign=False, not_before=start, days=303 / 86400)
    connect.plant(check_certificate(cert_to_pem(cert), "brief"), "brief")
    stub = connect.stub(*write_pair(tmp_path, "brief", key, cert))
    assert whoami(stub).name == "brief"  # admitted while valid (about 3 s more)
    left = cert.not_valid_after_utc - dt.datetime.now(dt.UTC)
    assert left.total_seconds() > 0.5

    def refused() -> bool:
        try:
            whoami(stub)  # the same channel: no new handshake
        except grpc.RpcError as exc:
            return exc.code() == DENIED
        return False

    assert eventually(refused, timeout=left.total_seconds() + 1.0) >= left.total_seconds()


def test_leaf_minted_with_a_pinrpc_key_is_refused_at_handshake(
    connect: Connect, registry: Path, make_client: MakeClient, tmp_path: Path
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice", ECHO_ALL)
    alice_cert = load_certificate(alice.cert_path)
    alice_key = load_private_key(alice.key_path)
    leaf_key = p256()
    minted = make_cert(leaf_key, "admin", issuer=alice_cert.subject, signer=alice_key)
    cert_path, key_path = write_pair(tmp_path, "minted", leaf_key, minted)
    stub = connect.stub(cert_path, key_path)
    # keyUsage without keyCertSign makes the handshake itself reject the minted chain.
    assert code_of(lambda: whoami(stub)) == REFUSED_AT_HANDSHAKE


def test_leaf_minted_with_a_ca_key_passes_handshake_but_not_the_interceptor(
    connect: Connect, tmp_path: Path
) -> None:
    # An openssl-style CA:TRUE certificate, enrolled by bypassing validation.
    ca_key = p256()
    ca_cert = make_cert(ca_key, "openssl-style", ca=True)
    planted = Candidate(
        cert=ca_cert,
        fingerprint=Fingerprint.of(ca_cert),
        pem=cert_to_pem(ca_cert).decode(),
        spki_sha256="",
        subject=ca_cert.subject.rfc4514_string(),
        has_key_ids=True,
        not_after=ca_cert.not_valid_after_utc,
    )
    connect.plant(planted, "ca-holder")
    ca_path, ca_key_path = write_pair(tmp_path, "ca-holder", ca_key, ca_cert)
    leaf_key = p256()
    minted = make_cert(leaf_key, name("admin"), issuer=ca_cert.subject, signer=ca_key)
    cert_path, key_path = write_pair(tmp_path, "minted", leaf_key, minted)

    # The holder of the enrolled certificate itself gets in ...
    assert _succeeds(connect, ca_path, ca_key_path)
    stub = connect.stub(cert_path, key_path)
    # ... the minted leaf gets through the handshake (PERMISSION_DENIED comes from the
    # interceptor, not UNAVAILABLE) and is refused by fingerprint, on every method.
    with pytest.raises(grpc.RpcError) as info:
        whoami(stub)
    assert info.value.code() == DENIED
    assert str(Fingerprint.of(minted)) in (info.value.details() or "")
    assert code_of(lambda: stub.Echo(echo_pb2.EchoRequest(), timeout=5)) == DENIED
    stream = stub.EchoStream(iter([echo_pb2.EchoRequest()]), timeout=5)
    assert code_of(lambda: list(stream)) == DENIED
    unknown = connect.channel(cert_path, key_path).unary_unary("/pinrpc.v1.Echo/Nope", None, None)
    assert code_of(lambda: unknown(b"", timeout=5)) == DENIED


def _succeeds(connect: Connect, cert: Path, key: Path) -> bool:
    return admitted(connect.stub(cert, key))


def test_revocation_reaches_an_open_channel_within_a_second(
    connect: Connect, registry: Path, make_client: MakeClient
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice", ECHO_ALL)
    stub = connect.stub(alice.cert_path, alice.key_path)
    assert whoami(stub).name == "alice"
    revoke(registry, "alice")

    codes: list[grpc.StatusCode] = []

    def refused() -> bool:
        try:
            whoami(stub)
        except grpc.RpcError as exc:
            codes.append(exc.code())
            return True
        return False

    eventually(refused, timeout=1.0)
    assert codes == [DENIED]  # refused by the interceptor on the open connection
    # A new channel is refused at the handshake.
    fresh = connect.stub(alice.cert_path, alice.key_path)
    assert code_of(lambda: whoami(fresh)) == REFUSED_AT_HANDSHAKE


def test_method_outside_allowed_patterns_is_denied(
    connect: Connect, registry: Path, make_client: MakeClient
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice", "/pinrpc.v1.Echo/EchoStream")
    stub = connect.stub(alice.cert_path, alice.key_path)
    assert whoami(stub).name == "alice"  # always allowed
    with pytest.raises(grpc.RpcError) as info:
        stub.Echo(echo_pb2.EchoRequest(message="x"), timeout=5)
    assert info.value.code() == DENIED
    assert "may not call /pinrpc.v1.Echo/Echo" in (info.value.details() or "")
    replies = stub.EchoStream(iter([echo_pb2.EchoRequest(message="y")]), timeout=5)
    assert [r.message for r in replies] == ["y"]


def test_unknown_method_for_enrolled_client_is_unimplemented(
    connect: Connect, registry: Path, make_client: MakeClient
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice", "*")
    call = connect.channel(alice.cert_path, alice.key_path).unary_unary(
        "/pinrpc.v1.Echo/Nope", None, None
    )
    assert code_of(lambda: call(b"", timeout=5)) == grpc.StatusCode.UNIMPLEMENTED


def test_metadata_claiming_another_identity_is_ignored(
    connect: Connect, registry: Path, make_client: MakeClient
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    connect.enroll(alice, "alice", ECHO_ALL)
    connect.enroll(bob, "bob")  # bob may not call Echo
    spoof = (
        ("x-pinrpc-client", "alice"),
        ("x-client-cert-fingerprint", str(alice.fingerprint)),
        ("x-forwarded-client-cert", f"Hash={alice.fingerprint.hex};Subject=CN=alice"),
        ("authorization", "Bearer alice"),
    )
    stub = connect.stub(bob.cert_path, bob.key_path)
    me = stub.WhoAmI(echo_pb2.WhoAmIRequest(), metadata=spoof, timeout=5)
    assert (me.name, me.fingerprint) == ("bob", str(bob.fingerprint))
    denied = lambda: stub.Echo(echo_pb2.EchoRequest(), metadata=spoof, timeout=5)  # noqa: E731
    assert code_of(denied) == DENIED


def test_enrollment_takes_effect_without_restart(
    connect: Connect, registry: Path, make_client: MakeClient
) -> None:
    connect.enroll(make_client("first"), "first")
    carol = make_client("carol")
    assert not _succeeds(connect, carol.cert_path, carol.key_path)
    enroll(registry, carol.cert_path, "carol")  # the server's own polling must notice
    eventually(lambda: _succeeds(connect, carol.cert_path, carol.key_path), timeout=10)


def test_empty_registry_serves_nobody_and_says_so(
    devca: ServerFiles, tmp_path: Path, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    config = ServerConfig("127.0.0.1:0", devca.cert, devca.key, str(tmp_path / "empty.db"))
    with caplog.at_level(logging.INFO), start_server(config) as running:
        alice = make_client("alice")
        connect = Connect(running, devca)
        stub = connect.stub(alice.cert_path, alice.key_path)
        assert code_of(lambda: whoami(stub)) == REFUSED_AT_HANDSHAKE
    assert "no enrolled clients" in caplog.text


def serve_argv(devca: ServerFiles, registry: Path, *flags: str) -> list[str]:
    return ["serve", "--cert", str(devca.cert), "--key", str(devca.key),
            "--registry", str(registry), *flags]  # fmt: skip


def error_line(stderr: str) -> str:
    """The one line a failed command prints (gRPC's own log lines aside)."""
    assert "Traceback" not in stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("pinrpc-server:")]
    return line


@pytest.mark.parametrize(
    ("first", "second"), [("inline", "inline"), ("handover", "handover"), ("handover", "inline")]
)
def test_a_second_server_on_a_busy_port_exits_with_one_line(
    first: str, second: str, devca: ServerFiles, registry: Path
) -> None:
    # gRPC binds with SO_REUSEPORT by default: the second server used to start and take a
    # share of the first one's connections. In a process of its own, as an operator runs it.
    config = ServerConfig("127.0.0.1:0", devca.cert, devca.key, str(registry), tls_reload=first)
    with start_server(config) as running:
        address = f"127.0.0.1:{running.port}"
        argv = serve_argv(devca, registry, "--listen", address, "--tls-reload", second)
        done = subprocess.run(
            [sys.executable, "-m", "server.cli", *argv], capture_output=True, text=True,
            timeout=20, check=False,
        )  # fmt: skip
        assert done.returncode == 1
        line = error_line(done.stderr)
        assert line.startswith(f"pinrpc-server: error: cannot listen on {address}: address in use")


@pytest.mark.parametrize("mode", ["inline", "handover"])
@pytest.mark.parametrize("flag", ["health_listen", "enrollment_listen", "metrics_listen"])
def test_a_side_port_equal_to_the_mtls_port_is_refused(
    mode: str, flag: str, devca: ServerFiles, registry: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    config = ServerConfig(address, devca.cert, devca.key, str(registry), tls_reload=mode)
    side: dict[str, Any] = {flag: address}
    says = f"cannot .* on {address} .*--{flag.replace('_', '-')}"
    with pytest.raises(ServeError, match=says), start_server(replace(config, **side)):
        pass
    with start_server(config):  # the allow twin: everything was stopped, the port is free
        pass


@pytest.mark.parametrize("flag", ["--health-listen", "--enrollment-listen", "--metrics-listen"])
def test_a_side_port_in_use_is_one_line_naming_the_flag(
    flag: str, devca: ServerFiles, registry: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:  # another program's port
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        argv = serve_argv(devca, registry, "--listen", "127.0.0.1:0", flag, address)
        assert server_cli.main(argv) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith("pinrpc-server: error: cannot ") and f"{address} ({flag}" in line


def test_a_metrics_port_out_of_range_is_a_serve_error(devca: ServerFiles, registry: Path) -> None:
    # The CLI refuses it first; this is the config's own guard (it was an OverflowError).
    config = ServerConfig("127.0.0.1:0", devca.cert, devca.key, str(registry))
    wrapped = replace(config, metrics_listen="127.0.0.1:99999")
    with pytest.raises(ServeError, match="--metrics-listen"), start_server(wrapped):
        pass


LISTEN_FLAGS = ["--listen", "--health-listen", "--enrollment-listen", "--metrics-listen"]
SERVE_UNCHECKED = ["serve", "--cert", "c.pem", "--key", "k.pem", "--registry", "r.db"]


@pytest.mark.parametrize("flag", LISTEN_FLAGS)
@pytest.mark.parametrize("value", ["127.0.0.1:99999", "127.0.0.1:-5", "127.0.0.1:65536", "nope"])
def test_a_bad_listen_address_is_a_usage_error_from_flag_or_environment(
    flag: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # These used to wrap around: :99999 listened on 34463, :-5 on 65531.
    plain = SERVE_UNCHECKED
    for argv in ([*plain, flag, value], plain):
        if argv is plain:
            monkeypatch.setenv(env_name(flag), value)
        with pytest.raises(SystemExit) as info:
            server_cli.main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: not HOST:PORT with a port from 0 to 65535: {value!r}" in err
        assert "Traceback" not in err


@pytest.mark.parametrize("flag", LISTEN_FLAGS)
def test_a_good_listen_address_is_taken_from_flag_or_environment(
    flag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = SERVE_UNCHECKED
    dest = flag[2:].replace("-", "_")
    args = server_cli.build_parser().parse_args([*plain, flag, "[::1]:0"])
    assert getattr(args, dest) == "[::1]:0"
    monkeypatch.setenv(env_name(flag), "localhost:65535")
    assert getattr(server_cli.build_parser().parse_args(plain), dest) == "localhost:65535"


@pytest.mark.parametrize("value", ["3", "1025", "many"])
def test_a_bad_max_workers_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        server_cli.main([*SERVE_UNCHECKED, "--max-workers", value])
    assert info.value.code == 2
    assert "argument --max-workers:" in capsys.readouterr().err


def test_max_workers_is_taken_from_flag_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The per-client stream cap is a quarter of it (tests/security/test_open_streams.py).
    parse = server_cli.build_parser().parse_args
    assert parse(SERVE_UNCHECKED).max_workers == 32
    assert parse([*SERVE_UNCHECKED, "--max-workers", "64"]).max_workers == 64
    monkeypatch.setenv("PINRPC_MAX_WORKERS", "8")
    assert server_cli.build_parser().parse_args(SERVE_UNCHECKED).max_workers == 8
