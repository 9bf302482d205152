"""The client as its environment meets it: gRPC's roots variable, HTTP proxies, a certificate
outside its dates, and doctor on pipes and bad passphrases."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pinrpc.cli import Exit
from pinrpc.identity import generate_key, self_signed_certificate
from server.app import start_server
from server.config import ServerConfig
from server.devca import DevCA
from tests.certs import write_pair
from tests.conftest import Connect, MakeClient, enroll
from tests.test_client_cli import run
from tests.test_scripts import BIN

ROOTS_ENV = "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"
PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy", "no_grpc_proxy", "no_proxy")


def pinrpc(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    """The real `pinrpc` program in its own process (gRPC reads its roots variable once per
    process, and aborts the process on some values), bounded in time."""
    base = {k: v for k, v in os.environ.items() if k not in (ROOTS_ENV, *PROXY_VARIABLES)}
    done = subprocess.run(
        [str(BIN / "pinrpc"), *argv],
        capture_output=True,
        text=True,
        timeout=30,
        env={**base, **env},
    )
    assert "Traceback" not in done.stderr
    return done.returncode, done.stdout, done.stderr


def without_ca(flags: list[str]) -> list[str]:
    at = flags.index("--ca")
    return flags[:at] + flags[at + 2 :]


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("directory", "Is a directory"),  # gRPC aborts the process (SIGABRT, exit 134)
        ("missing", "No such file"),  # gRPC quietly falls back to other roots
        ("key", "contains a private key"),  # gRPC: "Socket closed", blamed on enrollment
    ],
)
def test_a_bad_grpc_roots_variable_is_one_line_naming_it(
    connect: Connect, make_client: MakeClient, tmp_path: Path, bad: str, says: str
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    path = {"directory": tmp_path, "missing": tmp_path / "nope.pem", "key": alice.key_path}[bad]
    flags = without_ca(connect.cli_flags(alice))
    code, out, err = pinrpc({ROOTS_ENV: str(path)}, "whoami", *flags)
    assert (code, out) == (Exit.ERROR, "")
    assert err.count("\n") == 1 and err.startswith(f"pinrpc: error: {ROOTS_ENV}: "), err
    assert says in err and str(path) in err
    # doctor names the variable as the thing to fix, not --ca.
    code, out, _ = pinrpc({ROOTS_ENV: str(path)}, "doctor", *flags)
    assert code == Exit.ERROR
    assert f"fix:                check {ROOTS_ENV}={path}" in out, out
    # So does request-enrollment, which builds its own channel (any port: it never connects).
    code, out, err = pinrpc({ROOTS_ENV: str(path)}, "request-enrollment", "--name", "al", *flags)
    assert (code, out) == (Exit.ERROR, "") and err.count("\n") == 1, err
    assert err.startswith(f"pinrpc: error: {ROOTS_ENV}: "), err


def test_the_grpc_roots_variable_still_verifies_the_server(
    connect: Connect, make_client: MakeClient, tmp_path: Path
) -> None:
    """Allowed: the variable naming the right root, with no --ca; denied: another root."""
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    flags = without_ca(connect.cli_flags(alice))
    code, out, err = pinrpc({ROOTS_ENV: str(connect.devca.ca_path)}, "whoami", *flags)
    assert (code, err) == (Exit.OK, "") and "name         alice" in out
    code, _, err = pinrpc({ROOTS_ENV: str(alice.cert_path)}, "whoami", *flags)
    assert code == Exit.CONNECT and "could not verify the server" in err


def pair_outside_dates(tmp_path: Path, *, expired: bool) -> tuple[Path, Path]:
    key = generate_key()
    shift = dt.timedelta(days=-30 if expired else 30)
    cert = self_signed_certificate(key, "outside", days=2, now=dt.datetime.now(dt.UTC) + shift)
    return write_pair(tmp_path / "outside", "outside", key, cert)


@pytest.mark.parametrize(
    ("expired", "says"), [(True, "EXPIRED on"), (False, "is not valid before")]
)
def test_a_certificate_outside_its_dates_is_refused_before_the_handshake(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], expired: bool, says: str
) -> None:
    """No server at all (a closed port): the client says why before trying to connect."""
    cert, key = pair_outside_dates(tmp_path, expired=expired)
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    flags = ["--server", f"127.0.0.1:{port}", "--cert", str(cert), "--key", str(key)]
    for command in (["whoami"], ["echo", "hi"]):
        code, out, err = run([*command, *flags], capsys)
        assert (code, out) == (Exit.CONNECT, "")
        assert f"your certificate {says}" in err and str(cert) in err, err
        assert "cannot reach" not in err


@contextlib.contextmanager
def connect_proxy(*, refuse: bool = False) -> Iterator[tuple[int, list[bytes]]]:
    """A real HTTP CONNECT proxy on 127.0.0.1 that records each request line and relays bytes
    (or, with ``refuse``, a port with nothing listening)."""
    seen: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if refuse:
        listener.close()
        yield port, seen
        return
    listener.settimeout(0.1)
    stop = threading.Event()
    open_sockets: list[socket.socket] = []

    def pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def serve() -> None:
        for _ in range(300):  # bounded: at most 30 s
            if stop.is_set():
                return
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            client.settimeout(10)
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 4096:
                request += client.recv(4096) or b"\r\n\r\n"
            line = request.split(b"\r\n", 1)[0]
            seen.append(line)
            host, _, target_port = line.split()[1].rpartition(b":")
            upstream = socket.create_connection((host.decode(), int(target_port)), timeout=10)
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            open_sockets.extend((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=pump, args=(a, b), daemon=True).start()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield port, seen
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for sock in open_sockets:
            sock.close()


def test_an_unreachable_proxy_is_named_in_the_error(
    connect: Connect, make_client: MakeClient
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    with connect_proxy(refuse=True) as (port, _):
        env = {"https_proxy": f"http://user:secret@127.0.0.1:{port}"}
        code, _, err = pinrpc(env, "whoami", *connect.cli_flags(alice), "--timeout", "5")
        assert code == Exit.CONNECT
        assert f"https_proxy is set (127.0.0.1:{port})" in err, err
        assert "secret" not in err  # the proxy's password is not printed
        code, out, _ = pinrpc(env, "doctor", *connect.cli_flags(alice), "--timeout", "5")
        assert code == Exit.CONNECT
        assert out.count(f"https_proxy is set (127.0.0.1:{port})") == 2, out  # tcp step, fix
        flags = ("--name", "alice", *connect.cli_flags(alice), "--timeout", "5")
        code, _, err = pinrpc(env, "request-enrollment", *flags)
    assert code == Exit.CONNECT
    assert f"https_proxy is set (127.0.0.1:{port})" in err and "secret" not in err, err


def test_mtls_through_a_proxy_is_end_to_end_and_no_proxy_bypasses_it(
    connect: Connect, make_client: MakeClient
) -> None:
    """A CONNECT proxy sees the target's host and port, never the identity: the server still
    names alice by her certificate; a certificate it does not know is still refused."""
    alice, mallory = make_client("alice"), make_client("mallory")
    connect.enroll(alice, "alice")
    with connect_proxy() as (port, seen):
        env = {"grpc_proxy": f"http://127.0.0.1:{port}"}
        code, out, err = pinrpc(env, "whoami", *connect.cli_flags(alice))
        assert (code, err) == (Exit.OK, "") and "name         alice" in out
        assert seen == [f"CONNECT {connect.target} HTTP/1.1".encode()]
        code, _, err = pinrpc(env, "whoami", *connect.cli_flags(mallory))
        assert code == Exit.CONNECT and "closed the connection during the TLS handshake" in err
        assert "grpc_proxy is set" in err
        code, out, _ = pinrpc({**env, "no_proxy": "127.0.0.1"}, "whoami", *connect.cli_flags(alice))
        assert code == Exit.OK and len(seen) == 2  # the third call went direct


def pipe_path(data: bytes, fds: list[int]) -> str:
    read_end, write_end = os.pipe()
    os.write(write_end, data)  # small: fits in the pipe's buffer
    os.close(write_end)
    fds.append(read_end)
    return f"/dev/fd/{read_end}"


def test_doctor_reads_a_pair_from_pipes_once(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--cert <(command)` works for whoami, so doctor must agree: allowed for alice, and
    mallory's pair through the same pipes is still refused at the handshake."""
    alice, mallory = make_client("alice"), make_client("mallory")
    connect.enroll(alice, "alice")
    for files, expected in ((alice, Exit.OK), (mallory, Exit.CONNECT)):
        flags, fds = connect.cli_flags(files), list[int]()
        for flag, path in (("--cert", files.cert_path), ("--key", files.key_path)):
            flags[flags.index(flag) + 1] = pipe_path(path.read_bytes(), fds)
        try:
            code, out, _ = run(["doctor", "--insecure-key-permissions", *flags], capsys)
        finally:
            for fd in fds:
                os.close(fd)
        assert code == expected, out
        assert f"ok       client certificate  fingerprint {files.fingerprint}" in out
    assert "FAILED   client accepted" in out


def test_doctor_on_a_wrong_passphrase_points_at_the_passphrase(
    connect: Connect,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    carol = make_client("carol", passphrase=b"right")
    connect.enroll(carol, "carol")
    monkeypatch.setenv("PINRPC_KEY_PASSPHRASE", "right")
    code, out, _ = run(["doctor", *connect.cli_flags(carol)], capsys)
    assert code == Exit.OK, out  # allowed: an encrypted key, presented in the handshake step
    monkeypatch.setenv("PINRPC_KEY_PASSPHRASE", "wrong")
    code, out, _ = run(["doctor", *connect.cli_flags(carol)], capsys)
    assert code == Exit.ERROR
    assert "wrong passphrase" in out and "(an encrypted key: PINRPC_KEY_PASSPHRASE)" in out
    assert "yours could not be presented (see above)" in out
    assert "pass --cert/--key" not in out  # they were passed


def test_an_ipv6_server_name_in_brackets_reads_as_whoami_reads_it(
    tmp_path: Path, registry: Path, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """A server whose certificate names only the address ::1: `--server-name [::1]` is what
    gRPC verifies it with, so doctor agrees; `[127.0.0.1]` gRPC refuses, and doctor too."""
    ca = DevCA()
    cert, key = ca.issue(["::1"]).write(tmp_path)
    (tmp_path / "ca.pem").write_bytes(ca.root_pem)
    alice = make_client("alice")
    enroll(registry, alice.cert_path, "alice")
    config = ServerConfig("[::1]:0", cert, key, str(registry), poll_interval=0.1, grace=1.0)
    with start_server(config) as running:
        flags = [
            "--server", f"[::1]:{running.port}", "--ca", str(tmp_path / "ca.pem"),
            "--cert", str(alice.cert_path), "--key", str(alice.key_path),
        ]  # fmt: skip
        for name, expected in (("[::1]", Exit.OK), ("[127.0.0.1]", Exit.CONNECT)):
            for command in ("whoami", "doctor"):
                code, out, _ = run([command, *flags, "--server-name", name], capsys)
                assert code == expected, (command, name, out)
