"""A stranger without a certificate holding connections open must not lock enrolled clients out.

Each accepted connection costs the server a file descriptor until its TLS handshake ends.
Measured before the fix, under a soft RLIMIT_NOFILE of 1,024: from about 1,010 held
connections on, gRPC's accept failed ("File descriptor limit reached. Retrying.") and an
enrolled client's call waited until its deadline; gRPC waited 120 s for each handshake. Now
``serve`` raises the soft limit to the hard one, handshakes end after HANDSHAKE_TIMEOUT, and so
do connections with no call on the ports where anyone finishes the handshake.
"""

from __future__ import annotations

import resource
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc

from pinrpc import secure_channel
from pinrpc.v1 import echo_pb2_grpc
from server.app import start_server
from server.config import ServerConfig
from server.fdlimit import FLOOR, HANDSHAKE_TIMEOUT
from tests.conftest import SERVER_NAME, MakeClient, ServerFiles, enroll, whoami
from tests.security.attacker import BIN, ServerProcess, _wait_for_port, server_env
from tests.security.conftest import HandlerCalls

SOFT = 256  # the server's soft limit at start: as systemd's 1,024, only cheaper to fill
STRANGERS = 400  # connections that never send a byte: more than SOFT
HARD = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 4096)


@contextmanager
def limited_server(
    files: ServerFiles, registry: Path, log: Path, hard: int
) -> Iterator[ServerProcess]:
    """`pinrpc-server serve` started with RLIMIT_NOFILE SOFT:hard; killed by PID at the end."""
    argv = ["prlimit", f"--nofile={SOFT}:{hard}", "--", str(BIN / "pinrpc-server"), "serve",
            "--listen", "127.0.0.1:0", "--cert", str(files.cert), "--key", str(files.key),
            "--registry", str(registry)]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=server_env())
    try:
        yield ServerProcess(process, _wait_for_port(process, log), log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def test_strangers_holding_connections_do_not_lock_out_a_low_limit_server(
    devca: ServerFiles, registry: Path, make_client: MakeClient, tmp_path: Path
) -> None:
    assert HARD > STRANGERS + 50, f"this test needs a hard open-file limit above {STRANGERS + 50}"
    alice = make_client("alice")
    enroll(registry, alice.cert_path, "alice")
    with (
        limited_server(devca, registry, tmp_path / "server.log", HARD) as server,
        ExitStack() as held,
    ):
        start = time.monotonic()
        for _ in range(STRANGERS):
            held.enter_context(socket.create_connection(("127.0.0.1", server.port), 5))
        # Until the server has accepted them all (bounded: before the fix it never does).
        while open_fds(server.pid) < STRANGERS and time.monotonic() - start < 5:
            time.sleep(0.1)
        channel = held.enter_context(
            secure_channel(f"127.0.0.1:{server.port}", alice.cert_path, alice.key_path,
                           devca.ca_path, SERVER_NAME)
        )  # fmt: skip
        assert whoami(echo_pb2_grpc.EchoStub(channel)).name == "alice"  # before: DEADLINE_EXCEEDED
        assert open_fds(server.pid) > STRANGERS  # they are all still held
        log = server.log.read_text()
        assert f"raised the open-file limit (RLIMIT_NOFILE) from {SOFT} to {HARD}" in log
        assert "File descriptor limit reached" not in log
        assert server.terminate() == 0


def test_a_limit_that_cannot_be_raised_is_warned_about(
    devca: ServerFiles, registry: Path, tmp_path: Path
) -> None:
    with limited_server(devca, registry, tmp_path / "server.log", SOFT) as server:
        assert server.terminate() == 0
    log = server.log.read_text()
    assert "raised the open-file limit" not in log
    assert f"the open-file limit is {SOFT} (hard limit {SOFT})" in log
    assert f"raise it to at least {FLOOR}" in log


def wait_closed(sock: socket.socket, until: float) -> bool:
    """Read ``sock`` (a TLS alert at most) until the server closes it; False at ``until``."""
    try:
        while True:
            sock.settimeout(max(until - time.monotonic(), 0.01))
            if not sock.recv(4096):
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def closed_when_idle(channel: grpc.Channel) -> threading.Event:
    """Connect ``channel``; the event is set when the server closes its connection."""
    grpc.channel_ready_future(channel).result(timeout=5)
    closed = threading.Event()

    def seen(state: grpc.ChannelConnectivity) -> None:
        if state is not grpc.ChannelConnectivity.READY:
            closed.set()

    channel.subscribe(seen)
    return closed


def test_unfinished_handshakes_and_idle_side_connections_end_after_the_timeout(
    devca: ServerFiles, registry: Path, handler_calls: HandlerCalls
) -> None:
    config = ServerConfig(
        listen="127.0.0.1:0", cert=devca.cert, key=devca.key, registry=str(registry),
        poll_interval=0.1, grace=1.0, health_listen="127.0.0.1:0",
        enrollment_listen="127.0.0.1:0",
    )  # fmt: skip
    hello = b"\x16\x03\x01\x00\x10\x01"  # a ClientHello's first bytes
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # HTTP/2's, without SETTINGS
    with start_server(config) as running, ExitStack() as held:
        tls, plain = [running.port, running.enrollment_port], running.health_port
        starts = [(port, b"") for port in (*tls, plain)]
        starts += [(port, hello) for port in tls] + [(plain, preface)]
        socks = []
        for port, payload in starts:
            sock = held.enter_context(socket.create_connection(("127.0.0.1", port), 5))
            sock.sendall(payload)
            socks.append((sock, time.monotonic()))
        # And gRPC clients that finish the handshakes anyone can, then hold their connection.
        creds = grpc.ssl_channel_credentials(devca.ca_path.read_bytes())
        name = [("grpc.ssl_target_name_override", SERVER_NAME)]
        channels = [grpc.insecure_channel(f"127.0.0.1:{plain}"),
                    grpc.secure_channel(f"127.0.0.1:{tls[1]}", creds, options=name)]  # fmt: skip
        idle = [closed_when_idle(held.enter_context(channel)) for channel in channels]
        # Long enough for a slow client: none is closed early (gRPC's timers fired up to a
        # second early under load here). All wait in parallel.
        early = HANDSHAKE_TIMEOUT - 5
        assert not any(wait_closed(sock, opened + early) for sock, opened in socks)
        assert not any(event.is_set() for event in idle)
        assert all(wait_closed(sock, opened + HANDSHAKE_TIMEOUT + 5) for sock, opened in socks)
        assert all(event.wait(5) for event in idle)  # before: held for good
    assert handler_calls.count == 0
