"""The server's stderr: a log collector that stops reading must not stop the server, and a
stranger must not be able to flood it.

Each test runs a real `pinrpc-server serve` whose stderr is a pipe shrunk to one page that
nobody reads after start-up (server/stderr_pump.py's helper holds what it cannot write).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import signal
import socket
import ssl
import subprocess
import termios
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from pinrpc.channel import secure_channel
from pinrpc.identity import KeyPairFiles
from pinrpc.v1 import echo_pb2, echo_pb2_grpc
from server.stderr_helper import MARK
from server.stderr_pump import EXIT_WAIT
from tests.conftest import (
    ECHO_ALL,
    SERVER_NAME,
    MakeClient,
    ServerFiles,
    code_of,
    enroll,
    eventually,
    revoke,
    whoami,
)
from tests.security.attacker import BIN, server_env

PAGE = 4096
GRACE = 5.0  # ServerConfig.grace, which `pinrpc-server serve` uses


@dataclass
class StalledServer:
    process: subprocess.Popen[bytes]
    port: int
    stderr: int  # the pipe's read end, which the test does not read

    def queued(self) -> int:
        """Bytes written to stderr and not read."""
        buf = bytearray(4)
        fcntl.ioctl(self.stderr, termios.FIONREAD, buf)
        return int.from_bytes(buf, "little")

    def helper(self) -> int:
        """The PID of the server's one child, the stderr helper."""
        (pid,) = (
            Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        )
        return int(pid)

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/task"))

    def stub(self, files: KeyPairFiles, ca: Path) -> echo_pb2_grpc.EchoStub:
        target = f"127.0.0.1:{self.port}"
        channel = secure_channel(target, files.cert_path, files.key_path, ca, SERVER_NAME)
        return echo_pb2_grpc.EchoStub(channel)

    def read_to_end(self, timeout: float = 20) -> str:
        """The collector reads again: everything, up to the helper's end of file."""
        out, deadline = b"", time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.stderr], [], [], 0.1)[0]:
                if not (chunk := os.read(self.stderr, 65536)):
                    return out.decode()
                out += chunk
        pytest.fail(f"stderr did not end within {timeout} s: {out[-2000:]!r}")


@contextmanager
def stalled_server(files: ServerFiles, registry: Path, *extra: str) -> Iterator[StalledServer]:
    """`pinrpc-server serve` on a one-page stderr pipe, read only until it reports its port."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PAGE)
    argv = [str(BIN / "pinrpc-server"), "serve", "--listen", "127.0.0.1:0", "--cert",
            str(files.cert), "--key", str(files.key), "--registry", str(registry),
            *extra]  # fmt: skip
    # gRPC's default verbosity, which logs each refused handshake.
    process = subprocess.Popen(argv, stdout=write_end, stderr=write_end, env=server_env())
    os.close(write_end)
    try:
        seen, deadline = b"", time.monotonic() + 20
        while not (match := re.search(rb"listening on \S+ \(port (\d+)\)", seen)):
            assert time.monotonic() < deadline and process.poll() is None, seen.decode()
            if select.select([read_end], [], [], 0.1)[0]:
                seen += os.read(read_end, 65536)
        yield StalledServer(process, int(match.group(1)), read_end)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        os.close(read_end)


def stall(server: StalledServer, write_lines: Callable[[], None]) -> None:
    """Make the server write until the pipe stays full."""
    deadline = time.monotonic() + 20
    while True:
        write_lines()
        before = server.queued()
        time.sleep(0.5)
        if server.queued() == before and before > PAGE // 2:
            return
        assert time.monotonic() < deadline, f"stderr never filled up ({before} bytes)"


def refused(stub: echo_pb2_grpc.EchoStub) -> Callable[[], bool]:
    def attempt() -> bool:
        try:
            whoami(stub)
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.PERMISSION_DENIED
        return False

    return attempt


def served(server: StalledServer, name: str, files: KeyPairFiles, ca: Path) -> Callable[[], bool]:
    def attempt() -> bool:
        try:
            return whoami(server.stub(files, ca)).name == name
        except grpc.RpcError:
            return False

    return attempt


def test_revocations_and_enrollments_apply_while_stderr_is_stalled(
    devca: ServerFiles, make_client: MakeClient, registry: Path
) -> None:
    alice, bob, carol = make_client("alice"), make_client("bob"), make_client("carol")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    enroll(registry, bob.cert_path, "bob", "/pinrpc.v1.Echo/WhoAmI")
    with stalled_server(devca, registry) as server:
        alices, bobs = server.stub(alice, devca.ca_path), server.stub(bob, devca.ca_path)
        assert whoami(alices).name == "alice" and whoami(bobs).name == "bob"

        def refusals() -> None:  # an audit line each
            for _ in range(20):
                code = code_of(lambda: bobs.Echo(echo_pb2.EchoRequest(message="x"), timeout=5))
                assert code == grpc.StatusCode.PERMISSION_DENIED

        stall(server, refusals)
        revoke(registry, "alice")
        eventually(refused(alices), 3)  # the first revocation
        # Before: the watcher was stuck in the first revocation's log line from here on.
        revoke(registry, "bob")
        eventually(refused(bobs), 3)  # the second
        enroll(registry, carol.cert_path, "carol", ECHO_ALL)
        eventually(served(server, "carol", carol, devca.ca_path), 5)  # the enrollment

        # SIGTERM, still stalled: the server exits, and nothing it wrote is lost.
        server.process.send_signal(signal.SIGTERM)
        try:
            assert server.process.wait(timeout=GRACE + EXIT_WAIT + 5) == 0
        except subprocess.TimeoutExpired:
            pytest.fail("SIGTERM: the server hung on its stalled stderr")
        written = server.read_to_end()
    audit = [json.loads(line[line.index("{") :]) for line in written.splitlines()
             if '"event": ' in line]  # fmt: skip
    assert [a["client"] for a in audit if a["event"] != "call"] == ["alice", "bob", "carol"]
    assert "stopping: finishing in-flight calls" in written
    assert "dropped" not in written  # far below the helper's limit


def test_refused_handshakes_do_not_stall_grpc_while_stderr_is_stalled(
    devca: ServerFiles, make_client: MakeClient, registry: Path
) -> None:
    """gRPC's C core writes a line per refused handshake to stderr itself (OPERATIONS.md)."""
    alice, carol, mallory = make_client("alice"), make_client("carol"), make_client("mallory")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    with stalled_server(devca, registry) as server:

        def strangers() -> None:
            for _ in range(10):
                code = code_of(lambda: whoami(server.stub(mallory, devca.ca_path)))
                assert code == grpc.StatusCode.UNAVAILABLE  # before: DEADLINE_EXCEEDED

        stall(server, strangers)
        # Below the server's priority: it takes the server's CPU only when that is spare.
        assert os.getpriority(os.PRIO_PROCESS, server.helper()) == 10
        threads = server.threads()
        for _ in range(5):
            strangers()
        # Before: one more gRPC thread, blocked for good, per refused handshake.
        assert server.threads() <= threads + 2
        for _ in range(20):  # each on a new connection
            assert whoami(server.stub(alice, devca.ca_path)).name == "alice"
        enroll(registry, carol.cert_path, "carol", ECHO_ALL)
        eventually(served(server, "carol", carol, devca.ca_path), 5)

        # A server that dies leaves what it wrote with the helper, which passes it on.
        server.process.kill()
        server.process.wait(timeout=10)
        written = server.read_to_end()
    assert "trusting 2 enrolled client certificate(s)" in written
    assert written.count("CERTIFICATE_VERIFY_FAILED") >= 60


def refuse(port: int, stranger: KeyPairFiles, ca: Path, times: int) -> None:
    """TLS handshakes with a certificate nobody enrolled: one gRPC core line each."""
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    context.load_cert_chain(stranger.cert_path, stranger.key_path)
    context.set_alpn_protocols(["h2"])
    for _ in range(times):
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            contextlib.suppress(ssl.SSLError, OSError),
            context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls,
        ):
            assert tls.recv(1) == b""  # refused: the server closes


def test_a_flood_of_refused_handshakes_gets_the_audit_rate(
    devca: ServerFiles, make_client: MakeClient, registry: Path
) -> None:
    mallory = make_client("mallory")
    with stalled_server(devca, registry, "--audit-rate", "5") as server:
        started = time.monotonic()
        refuse(server.port, mallory, devca.ca_path, 100)
        elapsed = time.monotonic() - started
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=GRACE + EXIT_WAIT + 5) == 0
        written = server.read_to_end()
    shown = written.count("Handshake failed")
    counts = re.findall(r"(\d+) gRPC log line\(s\) suppressed: more than 5 a second", written)
    assert shown + sum(map(int, counts)) == 100
    assert 20 <= shown <= 21 + 5 * elapsed  # bursts of 4 x --audit-rate, then the rate


def goaway(port: int, client: KeyPairFiles, ca: Path, debug_text: bytes) -> None:
    """An HTTP/2 GOAWAY whose debug text gRPC core logs verbatim, newlines included."""

    def frame(kind: int, payload: bytes) -> bytes:  # on stream 0, no flags
        return len(payload).to_bytes(3, "big") + bytes([kind, 0]) + bytes(4) + payload

    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    context.load_cert_chain(client.cert_path, client.key_path)
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls,
    ):
        last_stream, protocol_error = bytes(4), (2).to_bytes(4, "big")
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, b"")  # SETTINGS
                    + frame(7, last_stream + protocol_error + debug_text))  # fmt: skip
        with contextlib.suppress(OSError):
            while tls.recv(65536):  # until the server closes
                pass


TEXT_RECORD = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ pinrpc\.")


def pinrpc_records(written: str, log_format: str) -> list[str]:
    """The lines a log reader takes for pinrpc's."""
    if log_format == "text":
        return [line for line in written.splitlines() if TEXT_RECORD.match(line)]
    records = []
    for line in written.splitlines():
        with contextlib.suppress(ValueError):
            if str(json.loads(line).get("logger", "")).startswith("pinrpc."):
                records.append(line)
    return records


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_client_cannot_forge_log_lines_through_grpcs_own(
    devca: ServerFiles, make_client: MakeClient, registry: Path, log_format: str
) -> None:
    """Before, bob's GOAWAY text appeared as lines of their own, a forged `revoke` among them."""
    alice, bob = make_client("alice"), make_client("bob")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    enroll(registry, bob.cert_path, "bob")
    forged = [
        '2026-11-30 10:00:00,000 INFO pinrpc.audit: {"event": "revoke", "client": "alice"}',
        '{"time": "2026-11-30T10:00:00+00:00", "level": "INFO", "logger": "pinrpc.audit", '
        '"event": "revoke", "client": "alice", "fingerprint": "00"}',
    ]
    with stalled_server(devca, registry, "--log-format", log_format) as server:
        goaway(server.port, bob, devca.ca_path, "\n".join(["", *forged, ""]).encode())
        assert whoami(server.stub(alice, devca.ca_path)).name == "alice"
        time.sleep(0.5)  # the audit's writer and the helper pass their lines on
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=GRACE + EXIT_WAIT + 5) == 0
        written = server.read_to_end()
    assert "Got goaway" in written  # gRPC did log the debug text
    for line in forged:
        assert f"{MARK.decode()}{line}\n" in written  # passed on, marked as not pinrpc's
    records = pinrpc_records(written, log_format)
    assert any("stopping: finishing in-flight calls" in r for r in records)
    assert not [r for r in records if '"event": "revoke"' in r]  # nobody was revoked
