"""Attacker-side helpers: the stolen-cert-attack tool, a recording relay, real server processes."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest

from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parents[2]
ATTACK_TOOL = ROOT / "scripts" / "stolen-cert-attack"
BIN = Path(sys.executable).parent


def require_attack_modules() -> None:
    """tlslite-ng and h2 are dev dependencies; outside CI a missing one skips."""
    for module in ("tlslite", "h2"):
        found = importlib.util.find_spec(module) is not None
        require_tool(found, module, "pip install tlslite-ng h2")


@dataclass(frozen=True)
class ToolRun:
    code: int
    out: str
    err: str


def attack(*args: str | Path, timeout: float = 60) -> ToolRun:
    """Run scripts/stolen-cert-attack as an attacker would: a separate process."""
    require_attack_modules()
    argv = [sys.executable, str(ATTACK_TOOL), *map(str, args)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    return ToolRun(done.returncode, done.stdout, done.stderr)


@dataclass
class Recording:
    """The bytes of one relayed TCP connection, in arrival order."""

    to_server: list[bytes] = field(default_factory=list)
    to_client: list[bytes] = field(default_factory=list)


class TeeRelay:
    """A loopback TCP relay to ``upstream`` that records every connection it carries."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.recordings: list[Recording] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._spawn(self._accept)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            server = socket.create_connection(self.upstream, timeout=5)
            self._sockets += [client, server]
            recording = Recording()
            self.recordings.append(recording)
            self._spawn(self._pump, client, server, recording.to_server)
            self._spawn(self._pump, server, client, recording.to_client)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, log: list[bytes]) -> None:
        source.settimeout(10)
        try:
            while data := source.recv(65536):
                log.append(data)
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        self._threads[0].join(timeout=5)  # the accept loop notices within its 0.2 s timeout
        self._listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads[1:]:
            thread.join(timeout=5)
        for sock in self._sockets:
            sock.close()


def exchange(address: tuple[str, int], chunks: list[bytes], wait: float = 3.0) -> list[bytes]:
    """Send ``chunks`` one by one on a new connection; return what the server sent back."""
    received: list[bytes] = []
    with socket.create_connection(address, timeout=5) as sock:
        sock.settimeout(0.3)
        deadline = time.monotonic() + wait
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                break  # the server already hung up
            received += _drain(sock, time.monotonic() + 0.3)
        received += _drain(sock, deadline)
    return received


def _drain(sock: socket.socket, until: float) -> list[bytes]:
    out: list[bytes] = []
    while time.monotonic() < until:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not data:
            break
        out.append(data)
    return out


def server_hello_random(stream: bytes) -> bytes:
    """The 32-byte random of the ServerHello at the start of the server's byte stream."""
    # TLS record header (5 bytes), handshake header (4), legacy_version (2), then the random.
    assert stream[0] == 22 and stream[5] == 2, "the stream does not start with a ServerHello"
    return stream[11:43]


# -- raw HTTP/2 --------------------------------------------------------------------------------


class Transport(Protocol):
    def sendall(self, data: bytes, /) -> None: ...
    def recv(self, size: int, /) -> bytes: ...


def raw_whoami(transport: Transport, authority: str, timeout: float = 5.0) -> str | None:
    """A gRPC WhoAmI call in plain h2 frames; the grpc-status, or None if the server hung up."""
    require_attack_modules()
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration())
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(
        stream,
        [(":method", "POST"), (":scheme", "https"), (":path", "/pinrpc.v1.Echo/WhoAmI"),
         (":authority", authority), ("content-type", "application/grpc"), ("te", "trailers")],
    )  # fmt: skip
    conn.send_data(stream, b"\x00\x00\x00\x00\x00", end_stream=True)  # empty gRPC message
    status: bytes | None = None
    deadline = time.monotonic() + timeout
    try:
        transport.sendall(conn.data_to_send())
        while time.monotonic() < deadline:
            data = transport.recv(65536)
            if not data:
                return None
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    status = dict(event.headers).get(b"grpc-status", status)
                if isinstance(event, h2.events.StreamEnded):
                    return None if status is None else status.decode()
            transport.sendall(conn.data_to_send())
    except (OSError, ssl.SSLError):
        return None
    raise AssertionError(f"no answer within {timeout} s")


# -- real server processes ---------------------------------------------------------------------


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert match, status
        return int(match.group(1))

    def terminate(self) -> int:
        """SIGTERM this process (by PID) and wait for its exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


def other_thread(pid: int) -> int:
    """The newest thread of ``pid`` that is not its main thread: kill(2) with its id makes
    that thread take a signal meant for the process, as the kernel may choose to."""
    return max(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)


def server_env() -> dict[str, str]:
    """This environment with gRPC's own verbosity, as a user's server has it: the client CLI,
    run in this process by other tests, sets GRPC_VERBOSITY=NONE for itself, and a child
    server would inherit it (and log none of gRPC's lines)."""
    return {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}


@contextmanager
def serve_process(
    cert: Path,
    key: Path,
    registry: Path | str,
    log: Path,
    *extra: str,
    env: dict[str, str] | None = None,
) -> Iterator[ServerProcess]:
    """`pinrpc-server serve` on a port the kernel picks; killed by PID if still running.
    ``registry``: a path, or a postgresql:// URL as text (a Path would fold its "//")."""
    argv = [str(BIN / "pinrpc-server"), "serve", "--listen", "127.0.0.1:0", "--cert", str(cert),
            "--key", str(key), "--registry", str(registry), *extra]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(
            argv, stdout=sink, stderr=subprocess.STDOUT, env={**server_env(), **(env or {})}
        )
    try:
        port = _wait_for_port(process, log)
        yield ServerProcess(process, port, log)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def _wait_for_port(process: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(r"listening on \S+ \(port (\d+)\)", log.read_text(errors="replace"))
        if match:
            return int(match.group(1))
        if process.poll() is not None:
            pytest.fail(f"pinrpc-server exited with {process.returncode}: {log.read_text()}")
        time.sleep(0.05)
    pytest.fail(f"pinrpc-server did not report its port within {timeout} s: {log.read_text()}")
