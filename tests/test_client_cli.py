"""`pinrpc whoami` / `echo` against a real server: output, exit codes and explanations."""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import threading
from pathlib import Path

import pytest

from client import cli
from pinrpc.cli import Exit, allow_patterns
from pinrpc.identity import load_certificate
from server.app import RunningServer
from server.devca import DevCA
from tests.conftest import ECHO_ALL, SERVER_NAME, Connect, MakeClient, ServerFiles
from tests.test_doctor import odd_server as odd_server  # the fixture
from tests.test_enrollment_requests import enrolling as enrolling  # the fixture
from tests.test_enrollment_requests import pending, request_flags
from tests.test_identity import bad_point_certificate


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what earlier steps printed
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_whoami_json_and_echo(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice", ECHO_ALL)
    code, out, _ = run(["whoami", "--json", *connect.cli_flags(alice)], capsys)
    assert code == Exit.OK
    assert json.loads(out) == {
        "name": "alice",
        "fingerprint": str(alice.fingerprint),
        "allowed_methods": [ECHO_ALL],
        "admitted_until": load_certificate(alice.cert_path).not_valid_after_utc.isoformat(),
        "retiring": False,
    }
    code, out, _ = run(["echo", "hello there", *connect.cli_flags(alice)], capsys)
    assert (code, out) == (Exit.OK, "hello there\n")


def test_flags_from_environment(
    connect: Connect,
    make_client: MakeClient,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    flags = connect.cli_flags(alice)
    for flag, value in zip(flags[::2], flags[1::2], strict=True):
        monkeypatch.setenv("PINRPC_" + flag[2:].replace("-", "_").upper(), value)
    code, out, _ = run(["whoami"], capsys)
    assert code == Exit.OK
    assert "name         alice" in out


def test_unenrolled_client_gets_an_explanation(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    connect.enroll(make_client("alice"), "alice")
    mallory = make_client("mallory")
    code, _, err = run(["whoami", *connect.cli_flags(mallory)], capsys)
    assert code == Exit.CONNECT
    assert "closed the connection during the TLS handshake" in err
    assert str(mallory.fingerprint) in err
    assert "not enrolled" in err


def test_denied_method_exit_code(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")  # WhoAmI only
    code, _, err = run(["echo", "hi", *connect.cli_flags(alice)], capsys)
    assert code == Exit.DENIED
    assert "may not call /pinrpc.v1.Echo/Echo" in err


def test_wrong_server_name_and_wrong_root(
    connect: Connect, make_client: MakeClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    flags = connect.cli_flags(alice)
    wrong_name = [*flags[:-1], "other.test"]
    code, _, err = run(["whoami", *wrong_name], capsys)
    assert code == Exit.CONNECT
    assert "could not verify the server" in err and "--server-name" in err
    other_root = tmp_path / "other-root.pem"
    other_root.write_bytes(DevCA("other").root_pem)
    ca_at = flags.index("--ca") + 1
    code, _, err = run(["whoami", *flags[:ca_at], str(other_root), *flags[ca_at + 1 :]], capsys)
    assert code == Exit.CONNECT
    assert "could not verify the server" in err and "--ca" in err


def test_a_port_that_is_not_grpc_over_tls_is_named_as_such(
    odd_server: RunningServer,
    devca: ServerFiles,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    alice = make_client("alice")
    flags = ["--cert", str(alice.cert_path), "--key", str(alice.key_path), "--timeout", "5",
             "--ca", str(devca.ca_path), "--server-name", SERVER_NAME]  # fmt: skip
    plaintext = f"127.0.0.1:{odd_server.health_port}"
    code, _, err = run(["whoami", "--server", plaintext, *flags], capsys)
    assert code == Exit.CONNECT
    assert f"{plaintext} does not serve gRPC over TLS" in err and "could not verify" not in err
    # TLS without ALPN h2, as a proxy that terminates TLS would answer.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(devca.cert, devca.key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)

        def serve_once() -> None:
            conn, _ = listener.accept()
            with conn, context.wrap_socket(conn, server_side=True) as tls:
                tls.settimeout(5)
                tls.recv(1)

        server = threading.Thread(target=serve_once)
        server.start()
        no_alpn = f"127.0.0.1:{listener.getsockname()[1]}"
        code, _, err = run(["whoami", "--server", no_alpn, *flags], capsys)
        server.join(10)
    assert code == Exit.CONNECT
    assert f"{no_alpn} does not serve gRPC over TLS" in err and "cannot reach" not in err
    # The control: the same flags reach the real server's TLS port.
    mtls = f"127.0.0.1:{odd_server.port}"
    code, _, err = run(["whoami", "--server", mtls, *flags], capsys)
    assert code == Exit.CONNECT and "does not serve gRPC over TLS" not in err


def test_nothing_listening(
    make_client: MakeClient, devca: ServerFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    alice = make_client("alice")
    argv = ["whoami", "--server", f"127.0.0.1:{port}", "--cert", str(alice.cert_path),
            "--key", str(alice.key_path), "--ca", str(devca.ca_path), "--timeout", "3"]  # fmt: skip
    code, _, err = run(argv, capsys)
    assert code == Exit.CONNECT
    assert "cannot reach" in err


def test_local_file_problems_are_one_line(
    connect: Connect, make_client: MakeClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    connect.enroll(alice, "alice")
    alice.key_path.chmod(0o640)
    code, _, err = run(["whoami", *connect.cli_flags(alice)], capsys)
    assert code == Exit.ERROR
    assert err.count("\n") == 1 and f"chmod 600 {alice.key_path}" in err
    code, _, _ = run(["whoami", "--insecure-key-permissions", *connect.cli_flags(alice)], capsys)
    assert code == Exit.OK
    mixed = connect.cli_flags(alice)
    mixed[mixed.index("--key") + 1] = str(bob.key_path)
    code, _, err = run(["whoami", *mixed], capsys)
    assert code == Exit.ERROR and "does not belong to certificate" in err


def test_missing_flags_are_usage_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for var in ("PINRPC_SERVER", "PINRPC_CERT", "PINRPC_KEY"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(SystemExit) as info:
        cli.main(["whoami"])
    assert info.value.code == Exit.USAGE
    assert "--server" in capsys.readouterr().err


def test_encrypted_key_via_environment(
    connect: Connect,
    make_client: MakeClient,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    alice = make_client("alice", passphrase=b"pass phrase")
    connect.enroll(alice, "alice")
    code, _, err = run(["whoami", *connect.cli_flags(alice)], capsys)
    assert code == Exit.ERROR and "PINRPC_KEY_PASSPHRASE" in err
    monkeypatch.setenv("PINRPC_KEY_PASSPHRASE", "pass phrase")
    code, out, _ = run(["whoami", *connect.cli_flags(alice)], capsys)
    assert code == Exit.OK and "alice" in out


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run a command that must stop at argparse; return its last stderr line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == Exit.USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()[-1]


BASE = ["--server", "127.0.0.1:1", "--cert", "c.crt", "--key", "c.key"]


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        *[
            (["whoami", *BASE, "--timeout", v], "--timeout")
            for v in ("nan", "inf", "-1", "0", "1e300")
        ],
        (["doctor", "--server", "127.0.0.1:1", "--timeout", "0"], "--timeout"),
        (["whoami", *BASE, "--warn-days", "99999999999"], "--warn-days"),
        (["whoami", *BASE, "--warn-days", "-1"], "--warn-days"),
        (["rotate", *BASE, "--days", "99999999"], "--days"),
        (["keygen", "x", "--days", "3000000"], "--days"),
        *[
            (["whoami", *BASE[2:], "--server", v], "--server")
            for v in ("host", "[::1]", ":0", "host:99999", "", "host:\u00b2")
        ],
    ],
)
def test_bad_numbers_and_addresses_are_usage_errors(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert f"argument {flag}:" in usage_error(argv, capsys)


def test_text_that_is_not_utf8_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = "caf\udce9"  # the byte 0xe9 from a Latin-1 terminal, as Python sees argv
    assert "not valid UTF-8" in usage_error(["echo", bad, *BASE], capsys)
    assert "not valid UTF-8" in usage_error(["admin", "get", bad, *BASE], capsys)
    assert "not valid UTF-8" in usage_error(["request-enrollment", "--name", bad, *BASE], capsys)
    monkeypatch.setenv("PINRPC_SERVER_NAME", bad)
    assert "not valid UTF-8" in usage_error(["whoami", *BASE], capsys)


def test_non_utf8_passphrase_works(
    connect: Connect,
    make_client: MakeClient,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    alice = make_client("alice", passphrase=b"caf\xe9")
    connect.enroll(alice, "alice")
    monkeypatch.setenv("PINRPC_KEY_PASSPHRASE", "caf\udce9")
    code, out, _ = run(["whoami", *connect.cli_flags(alice)], capsys)
    assert code == Exit.OK and "alice" in out
    monkeypatch.setenv("PINRPC_KEY_PASSPHRASE", "cafe")
    code, _, err = run(["whoami", *connect.cli_flags(alice)], capsys)
    assert code == Exit.ERROR and "wrong passphrase" in err


def test_ca_that_grpc_cannot_use_is_bad_input(
    connect: Connect, make_client: MakeClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(bytes(range(256)))
    # gRPC stops reading a bundle at a block it cannot parse: the right root after one is lost
    # (before this was checked: "not enrolled" when it came first, "could not verify" after).
    bad_block = b"-----BEGIN CERTIFICATE-----\nTUlJQmFk\n-----END CERTIFICATE-----\n"
    root, other = connect.devca.ca_path.read_bytes(), DevCA("other").root_pem
    bad_first, bad_between = tmp_path / "bad-first.pem", tmp_path / "bad-between.pem"
    bad_first.write_bytes(bad_block + root)
    bad_between.write_bytes(other + bad_block + root)
    flags = connect.cli_flags(alice)
    ca_at = flags.index("--ca") + 1
    for ca, reason in (
        (garbage, "holds no PEM certificate"),
        (alice.key_path, "private key"),
        (bad_first, "certificate 1 of 2 cannot be read"),
        (bad_between, "certificate 2 of 3 cannot be read"),
    ):
        flags[ca_at] = str(ca)
        for command in (["whoami"], ["request-enrollment", "--name", "alice"]):
            code, _, err = run([*command, *flags], capsys)
            assert code == Exit.ERROR and err.count("\n") == 1, err
            assert f"CA bundle {ca}" in err and reason in err
    flags[ca_at] = str(connect.devca.ca_path)
    assert run(["whoami", *flags], capsys)[0] == Exit.OK
    good_between = tmp_path / "good-between.pem"  # the allow twin: other roots are fine
    good_between.write_bytes(other + root)
    flags[ca_at] = str(good_between)
    assert run(["whoami", *flags], capsys)[0] == Exit.OK


def test_certificate_with_an_unreadable_public_key_is_one_line(
    connect: Connect, make_client: MakeClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = make_client("alice")
    flags = connect.cli_flags(alice)
    flags[flags.index("--cert") + 1] = str(bad_point_certificate(tmp_path / "bad.crt"))
    for command in ("whoami", "rotate"):
        code, _, err = run([command, *flags], capsys)
        assert code == Exit.ERROR and err.count("\n") == 1
        assert "cannot be read" in err


def test_request_enrollment_with_a_foreign_key_names_both_files_absolutely(
    enrolling: RunningServer,
    devca: ServerFiles,
    make_client: MakeClient,
    registry: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    carol, dave = make_client("carol"), make_client("dave")
    monkeypatch.chdir(carol.cert_path.parent)
    flags = request_flags(enrolling, devca, carol)
    flags[flags.index("--cert") + 1] = "carol.crt"
    flags[flags.index("--key") + 1] = "dave.key"
    code, _, err = run(["request-enrollment", "--name", "carol", *flags], capsys)
    assert code == Exit.ERROR and err.count("\n") == 1
    assert f"private key {dave.key_path} does not belong to certificate {carol.cert_path}" in err
    assert pending(registry, capsys) == []
    flags[flags.index("--key") + 1] = "carol.key"
    assert run(["request-enrollment", "--name", "carol", *flags], capsys)[0] == Exit.OK


@pytest.mark.parametrize(
    ("env", "patterns"),
    [("/a/*, /b/*", ["/a/*", "/b/*"]), (" /a/* ,,", ["/a/*"]), (" , ", []), ("", [])],
)
def test_allow_patterns_ignore_spaces_around_commas(
    monkeypatch: pytest.MonkeyPatch, env: str, patterns: list[str]
) -> None:
    monkeypatch.setenv("PINRPC_ALLOW", env)
    assert allow_patterns(argparse.Namespace(allow=None)) == patterns
    assert allow_patterns(argparse.Namespace(allow=[" /x/*"])) == [" /x/*"]  # flags as given


def test_request_enrollment_sends_the_parsed_certificate(
    enrolling: RunningServer,
    devca: ServerFiles,
    make_client: MakeClient,
    registry: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    carol = make_client("carol")
    pem = carol.cert_path.read_bytes()
    carol.cert_path.write_bytes(b"Subject: caf\xe9\n" + pem)  # Latin-1 text around the PEM
    code, _, err = run(
        ["request-enrollment", "--name", "carol", *request_flags(enrolling, devca, carol)], capsys
    )
    assert code == Exit.OK, err
    assert [r["fingerprint"] for r in pending(registry, capsys)] == [str(carol.fingerprint)]


@pytest.mark.parametrize(
    "command",
    [["admin", action] for action in ("enroll", "revoke", "permit", "list", "get")]
    + [["whoami"], ["echo"], ["rotate"], ["doctor"]],
)
def test_warn_days_help_says_what_it_does(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """`pinrpc admin ...` said --warn-days only warns about your own certificate; it also
    marks the listed clients that expire sooner as `expiring`."""
    with pytest.raises(SystemExit) as done:
        cli.main([*command, "--help"])
    assert done.value.code == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "warn when your certificate expires within this many days" in said
    marks = "and mark the clients listed whose certificates do as expiring" in said
    assert marks == (command[0] == "admin")
