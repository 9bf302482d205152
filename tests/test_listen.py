"""`serve`'s listening: who else may hold our port, its start-up failures, its handover lines."""

# ruff: noqa: S104  (wildcard addresses are what these tests are about)

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from server.listener import Listener, ListenError, shared
from server.stderr_helper import CLOSING
from tests.conftest import ECHO_ALL, MakeClient, ServerFiles, enroll, first_line
from tests.ports import free_port
from tests.security.attacker import BIN, serve_process, server_env
from tests.test_handover import fresh_call, slow_listener
from tests.test_stderr_pump import core, own, run_helper

UNRESOLVED = "the host does not resolve (Name or service not known)"
LOW_PORT = "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
ACCEPT4 = (
    b"E1201 04:52:01.000000   4242 posix_engine_listener.cc:186] Closing acceptor. Failed accept4: "
)


@contextmanager
def listening(host: str, port: int) -> Iterator[socket.socket]:
    """A listener with SO_REUSEPORT, as gRPC binds one (a dual-stack one for [::])."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen()
        yield sock


@pytest.mark.parametrize(
    ("ours", "other", "taken"),
    [
        ("127.0.0.1", "127.0.0.1", True),  # one group: split
        ("0.0.0.0", "127.0.0.1", True),  # the specific one takes every connection to it
        ("::", "127.0.0.1", True),
        ("::", "0.0.0.0", True),  # an IPv4 wildcard wins IPv4 over a dual-stack one
        ("::", "::1", True),
        ("127.0.0.1", "0.0.0.0", False),  # ours is the more specific: the stranger gets none
        ("127.0.0.1", "::", False),
        ("0.0.0.0", "::", False),
        ("127.0.0.1", "127.0.0.2", False),
    ],
)
def test_a_stranger_is_seen_where_it_takes_our_connections(
    ours: str, other: str, taken: bool
) -> None:
    """Before, only the same address string counted: a stranger on 127.0.0.1 beside our
    0.0.0.0 took every connection to 127.0.0.1 unseen (measured, see takes_from)."""
    port = free_port()
    with listening(ours, port) as mine, listening(other, port):
        assert shared(frozenset({os.fstat(mine.fileno()).st_ino})) is taken
        with listening(ours, free_port()) as elsewhere:  # another port: never
            assert not shared(frozenset({os.fstat(elsewhere.fileno()).st_ino}))


STRANGER = """
import socket, sys
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
print("ready", flush=True)
sys.stdin.readline()  # bind when the test says so
sock.bind((sys.argv[1], int(sys.argv[2])))
sock.listen()
print("bound", flush=True)
sys.stdin.read()  # until the test closes it
"""


@pytest.mark.parametrize(
    ("ours", "stranger", "refused"),
    [("0.0.0.0", "127.0.0.1", True), ("127.0.0.1", "0.0.0.0", False)],
)
def test_a_stranger_joining_while_the_roots_load_is_refused_only_if_it_takes_ours(
    devca: ServerFiles, registry: Path, make_client: MakeClient, ours: str, stranger: str,
    refused: bool,
) -> None:  # fmt: skip
    """Another process binds our port while the roots load (2 s here, as 10,000 take): the
    start-up probe has passed, so only the look after the bind can see it."""
    alice = make_client("alice")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    port = free_port()
    argv = [sys.executable, "-c", STRANGER, stranger, str(port)]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as other:
        assert other.stdin is not None
        stdin = other.stdin
        bound: list[str] = []

        def join_now() -> None:
            """Bind from inside the first slow build: a fixed sleep before a process start
            (1-3 s under load) could land before the probe or after the build."""
            if bound:  # a later handover build: the stranger has joined already
                return
            stdin.write("bind\n")
            stdin.flush()
            bound.append(first_line(other, time.monotonic() + 10))

        try:
            assert first_line(other, time.monotonic() + 30) == "ready"
            with slow_listener(devca, registry, on_slow_build=join_now) as (served, _, slow):
                slow.set()
                outcome: list[object] = []
                starting = threading.Thread(
                    target=lambda: outcome.append(_start(served, ours, port))
                )
                starting.start()
                starting.join(20)
                assert bound == ["bound"]
                if refused:
                    assert outcome == [f"cannot listen on {ours}:{port}: address in use"]
                else:
                    assert outcome == [port]
                    for _ in range(8):  # every connection to 127.0.0.1 is ours
                        target = (f"127.0.0.1:{port}", devca.ca_path)
                        assert fresh_call(target, alice).caller == "alice"
        finally:
            other.kill()


def _start(served: Listener, host: str, port: int) -> int | str:
    try:
        return served.start(f"{host}:{port}")
    except ListenError as exc:
        return str(exc)


def serve_fails(tmp_path: Path, *flags: str, wrap: tuple[str, ...] = ()) -> list[str]:
    """The output of a `serve` that must fail: its exit code 1, the registry not left behind."""
    registry = tmp_path / "new.db"
    argv = [*wrap, str(BIN / "pinrpc-server"), "serve", "--registry", str(registry), *flags]
    done = subprocess.run(argv, capture_output=True, text=True, env=server_env(), timeout=60)
    assert done.returncode == 1, done.stderr
    assert not registry.exists()
    return (done.stdout + done.stderr).splitlines()


NO_BIND_CAP = ("setpriv", "--bounding-set=-net_bind_service", "--inh-caps=-net_bind_service")


@pytest.mark.parametrize("mode", ["inline", "handover"])
@pytest.mark.parametrize(
    ("flag", "where", "reason"),
    [
        ("--listen", "busy", "address in use"),
        ("--listen", "no-such-host.invalid:0", UNRESOLVED),
        ("--listen", "192.0.2.1:0", "Cannot assign requested address"),
        ("--listen", "127.0.0.1:81", LOW_PORT),
        ("--health-listen", "busy", "address in use"),
        ("--enrollment-listen", "no-such-host.invalid:0", UNRESOLVED),
        ("--metrics-listen", "busy", "address in use"),
    ],
)  # fmt: skip
def test_a_failed_start_ends_with_one_line_that_says_why(
    devca: ServerFiles, tmp_path: Path, mode: str, flag: str, where: str, reason: str
) -> None:
    """Before, gRPC's own add_port.cc line came first with the reason, and pinrpc's said only
    "address in use or invalid" (or "[Errno 98] ..." for metrics)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}" if where == "busy" else where
        flags = ["--cert", str(devca.cert), "--key", str(devca.key), "--tls-reload", mode]
        if flag != "--listen":
            flags += ["--listen", "127.0.0.1:0"]
        lines = serve_fails(tmp_path, *flags, flag, address, wrap=NO_BIND_CAP)
    *before, last = lines
    assert last.startswith("pinrpc-server: error: cannot ") and last.endswith(f": {reason}")
    assert address in last and (flag == "--listen" or flag in last), last
    # Only pinrpc's start-up progress before it: no gRPC line, nothing marked.
    assert all(re.match(r"\d{4}-\d\d-\d\d [\d:,]+ (INFO|WARNING) pinrpc\.", x) for x in before), (
        lines
    )


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_handover_turns_grpcs_acceptor_line_into_an_info_line(
    devca: ServerFiles, registry: Path, make_client: MakeClient, tmp_path: Path, log_format: str
) -> None:
    """Before, each handover logged gRPC's "Closing acceptor. Failed accept4: Invalid
    argument", an error line for what the handover did on purpose."""
    enroll(registry, make_client("alice").cert_path, "alice", ECHO_ALL)
    log = tmp_path / "server.log"
    with serve_process(devca.cert, devca.key, registry, log, "--tls-reload", "handover",
                       "--log-format", log_format) as server:  # fmt: skip
        enroll(registry, make_client("bob").cert_path, "bob", ECHO_ALL)
        deadline = time.monotonic() + 20
        while b"which the handover closed" not in log.read_bytes():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert server.terminate() == 0
    written = log.read_text()
    assert "accept4" not in written and written.count("which the handover closed") == 1, written
    (line,) = [x for x in written.splitlines() if "which the handover closed" in x]
    assert '"level": "INFO"' in line if log_format == "json" else " INFO pinrpc.server: " in line


CLOSING_TEXT = b"2026-12-01 04:52:00,950 INFO pinrpc.server: " + (CLOSING % 1).encode() + b"\n"


@pytest.mark.parametrize(
    "fed",
    [
        core([ACCEPT4 + b"Invalid argument\n"]),  # no handover announced it
        [*own([CLOSING_TEXT]), *core([ACCEPT4 + b"Too many open files\n"])],  # another failure
        [*own([CLOSING_TEXT]), *core([ACCEPT4 + b"Invalid argument\n"] * 2)],  # one too many
        core([CLOSING_TEXT, ACCEPT4 + b"Invalid argument\n"]),  # announced on fd 2: forged
        [*own([CLOSING_TEXT.replace(b" INFO pinrpc.server: ", b" INFO pinrpc.audit: x ")]),
         *core([ACCEPT4 + b"Invalid argument\n"])],  # not the listener's own line
    ],
)  # fmt: skip
def test_any_other_accept4_failure_passes_unchanged(fed: list[tuple[bool, bytes]]) -> None:
    out, code = run_helper("text", 1 << 20, stall=False, fed=fed)
    failures = [line for line in out.splitlines(keepends=True) if b"Failed accept4" in line]
    assert code == 0 and failures and failures[-1] == fed[-1][1], out
