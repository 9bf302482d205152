"""What a stranger can make a real `pinrpc-server serve` write to its log."""

from __future__ import annotations

import contextlib
import re
import socket
import time
from pathlib import Path

import pytest

from tests.conftest import ServerFiles
from tests.security.attacker import serve_process


def goaway(port: int, debug_text: bytes) -> None:
    """An HTTP/2 GOAWAY on a plaintext port; gRPC core logs its debug text verbatim."""

    def frame(kind: int, payload: bytes) -> bytes:  # on stream 0, no flags
        return len(payload).to_bytes(3, "big") + bytes([kind, 0]) + bytes(4) + payload

    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, b"")  # SETTINGS
                     + frame(7, bytes(4) + (2).to_bytes(4, "big") + debug_text))  # fmt: skip
        with contextlib.suppress(OSError):
            for _ in range(100):  # until the server closes; bounded
                if not conn.recv(65536):
                    break


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_stranger_on_the_probe_port_writes_no_control_bytes_to_the_log(
    devca: ServerFiles, registry: Path, tmp_path: Path, log_format: str
) -> None:
    # No certificate needed: the probe port is plaintext. A carriage return or an ANSI escape
    # rewrote a terminal's view of the marked line, and a NUL ends a line for journald, so
    # what followed it read as one of pinrpc's own audit lines.
    log = tmp_path / "server.log"
    forged = b'{"level": "INFO", "logger": "pinrpc.audit", "event": "revoke"}'
    text = b"X\r" + forged + b"\x00" + forged + b"\x1b[2K\x7fend"
    with serve_process(devca.cert, devca.key, registry, log, "--log-format", log_format,
                       "--health-listen", "127.0.0.1:0") as server:  # fmt: skip
        match = re.search(r"health probes on \S+ \(port (\d+)\)", log.read_text())
        assert match
        goaway(int(match.group(1)), text)
        deadline = time.monotonic() + 5
        while b"Got goaway" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.terminate() == 0
    written = log.read_bytes()
    (line,) = [line for line in written.splitlines() if b"Got goaway" in line]
    assert b"X?" + forged + b"?" + forged + b"?[2K?end" in line
    assert not re.search(rb"[\x00-\x08\x0b-\x1f\x7f]", written)
