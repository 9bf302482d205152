"""The metrics port against a stranger: a real `pinrpc-server serve --metrics-listen`."""

from __future__ import annotations

import re
import socket
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from server import metrics
from tests.conftest import ServerFiles
from tests.security.attacker import serve_process


def metrics_port(log: Path) -> int:
    match = re.search(r"metrics on http://\S+:(\d+)/metrics", log.read_text())
    assert match, log.read_text()
    return int(match.group(1))


def scraped(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as response:
            return b"pinrpc_calls_total" in response.read()
    except OSError:
        return False


def test_trickled_requests_cannot_hold_the_metrics_port(
    devca: ServerFiles, registry: Path, tmp_path: Path
) -> None:
    # Each connection sends one byte of its request line a second: every read finishes within
    # the 5 s idle timeout, so before, all 16 slots stayed taken and no scrape got through.
    log = tmp_path / "server.log"
    with serve_process(devca.cert, devca.key, registry, log, "--metrics-listen",
                       "127.0.0.1:0") as server, ExitStack() as stack:  # fmt: skip
        port = metrics_port(server.log)
        assert scraped(port)
        slow = []
        for _ in range(metrics.MAX_CONNECTIONS):
            conn = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
            slow.append(conn)
        started = time.monotonic()
        deadline = started + metrics.CONNECTION_TIMEOUT + 10
        while time.monotonic() < deadline:  # bounded: about 14 s of trickling
            for conn in slow:
                try:
                    conn.send(b"G")
                except OSError:
                    pass  # the server closed it: what the fix does
            if scraped(port):
                break
            time.sleep(1)
        assert scraped(port), "the trickling connections still hold every slot"
