"""How `pinrpc` fails: the cause it names, its exit code, one line for bad input, no traceback."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from client import cli
from client.connect import call
from pinrpc.cli import Exit
from pinrpc.v1 import echo_pb2, echo_pb2_grpc
from server.app import start_server
from server.config import ServerConfig
from tests.conftest import SERVER_NAME, Connect, MakeClient, ServerFiles, enroll
from tests.test_client_cli import run
from tests.test_scripts import BIN


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A real TCP port that accepts connections and never says a word (a wrong port, a
    firewall that holds connections open)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.1)
        stop, held = threading.Event(), []

        def accept() -> None:
            for _ in range(600):  # bounded: at most a minute
                if stop.is_set():
                    return
                with contextlib.suppress(TimeoutError):
                    held.append(listener.accept()[0])

        thread = threading.Thread(target=accept)
        thread.start()
        try:
            yield listener.getsockname()[1]
        finally:
            stop.set()
            thread.join(5)
            for conn in held:
                conn.close()


def test_a_handshake_the_server_never_answers_is_not_blamed_on_the_certificate(
    connect: Connect,
    make_client: MakeClient,
    silent_port: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    alice = make_client("alice")
    flags = connect.cli_flags(alice)
    flags[flags.index("--server") + 1] = f"127.0.0.1:{silent_port}"
    args = cli.build_parser().parse_args(["whoami", *flags, "--timeout", "30"])

    def rpc(channel: grpc.Channel) -> int:
        echo_pb2_grpc.EchoStub(channel).WhoAmI(echo_pb2.WhoAmIRequest(), timeout=args.timeout)
        return Exit.OK

    # gRPC gives up on a handshake after its connect timeout (20 s unless set; 1 s here), long
    # before a generous --timeout, and reports it as UNAVAILABLE, like a refused certificate.
    capsys.readouterr()
    code = call(args, rpc, [("grpc.min_reconnect_backoff_ms", 1000)])
    err = capsys.readouterr().err
    assert code == Exit.CONNECT
    assert f"127.0.0.1:{silent_port} accepted the connection but never completed" in err
    assert "not enrolled" not in err and "closed the connection" not in err
    # The control: a server that does refuse the certificate is still explained as such.
    code, _, err = run(["whoami", *connect.cli_flags(alice)], capsys)
    assert code == Exit.CONNECT
    assert "closed the connection during the TLS handshake" in err and "not enrolled" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["fingerprint", ""],
        ["whoami", "--server", "127.0.0.1:1", "--cert", "", "--key", "k"],
        ["whoami", "--server", "127.0.0.1:1", "--cert", "c", "--key", ""],
        ["echo", "hi", "--server", "127.0.0.1:1", "--cert", "c", "--key", "k", "--ca", ""],
        ["doctor", "--server", "127.0.0.1:1", "--cert", "", "--key", "k"],
        [
            "admin",
            "enroll",
            "",
            "--name",
            "x",
            "--server",
            "127.0.0.1:1",
            "--cert",
            "c",
            "--key",
            "k",
        ],
    ],
)
def test_an_empty_file_name_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Not "cannot read certificate /current/dir: Is a directory" (exit 1)."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == Exit.USAGE
    assert "must not be empty" in capsys.readouterr().err


def test_a_file_name_that_is_not_utf8_still_works(
    make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """The allow next to the deny above: any non-empty name is a file name."""
    alice = make_client("alice")
    odd = alice.cert_path.with_name("caf\udce9.crt")  # the byte 0xE9: Latin-1, not UTF-8
    odd.write_bytes(alice.cert_path.read_bytes())
    code, out, _ = run(["fingerprint", str(odd)], capsys)
    assert (code, out) == (Exit.OK, f"{alice.fingerprint}\n")


def pinrpc(*argv: str, pass_fds: tuple[int, ...] = ()) -> tuple[int, str, str]:
    """The real `pinrpc` program, bounded in time: a hang fails the test."""
    done = subprocess.run(
        [str(BIN / "pinrpc"), *argv],
        capture_output=True,
        text=True,
        timeout=20,
        pass_fds=pass_fds,
    )
    assert "Traceback" not in done.stderr
    return done.returncode, done.stdout, done.stderr


def test_a_fifo_without_a_writer_is_one_line_not_a_hang(
    make_client: MakeClient, tmp_path: Path
) -> None:
    alice = make_client("alice")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code, _, err = pinrpc("fingerprint", str(fifo))
    assert code == Exit.ERROR and err.count("\n") == 1 and str(fifo) in err
    code, _, err = pinrpc(
        "whoami", "--server", "127.0.0.1:1", "--cert", str(alice.cert_path), "--key", str(fifo)
    )
    assert code == Exit.ERROR and err.count("\n") == 1 and str(fifo) in err
    # A pipe with a writer, as `--key <(command)` gives, is still read.
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, alice.cert_path.read_bytes())
        os.close(write_end)
        code, out, _ = pinrpc("fingerprint", f"/dev/fd/{read_end}", pass_fds=(read_end,))
    finally:
        os.close(read_end)
    assert (code, out) == (Exit.OK, f"{alice.fingerprint}\n")


def test_a_certificate_from_a_pipe_is_read_once(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--cert <(command)`: the second read of a pipe finds it empty ("is empty; expected one
    PEM certificate"), so every file is read once."""
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    flags = connect.cli_flags(alice)
    for flag, path in (("--cert", alice.cert_path), ("--key", alice.key_path)):
        read_end, write_end = os.pipe()
        os.write(write_end, path.read_bytes())  # small: fits in the pipe's buffer
        os.close(write_end)
        flags[flags.index(flag) + 1] = f"/dev/fd/{read_end}"
    try:
        code, out, err = run(["whoami", *flags], capsys)
    finally:
        for fd in (int(flags[flags.index(f) + 1].rsplit("/", 1)[1]) for f in ("--cert", "--key")):
            os.close(fd)
    assert (code, err) == (Exit.OK, "")
    assert "name         alice" in out


def test_an_expired_server_certificate_is_named_as_such(
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A renewal that did not happen: the running server keeps its certificate past expiry."""
    alice = make_client("alice")
    enroll(registry, alice.cert_path, "alice")
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
    cert, key = devca.ca.issue([SERVER_NAME], not_after=expires).write(tmp_path / "tls")
    config = ServerConfig("127.0.0.1:0", cert, key, str(registry), grace=1.0)
    with start_server(config) as running:
        flags = Connect(running, devca).cli_flags(alice)
        code, _, _ = run(["whoami", *flags], capsys)
        assert code == Exit.OK  # the control: the same flags get in while it is valid
        time.sleep(max(0.0, (expires - dt.datetime.now(dt.UTC)).total_seconds()) + 1.1)
        code, _, err = run(["whoami", *flags], capsys)
    assert code == Exit.CONNECT
    assert "certificate has expired" in err and "the operator must" in err
    assert "not signed by a root you trust" not in err and "--server-name" not in err
