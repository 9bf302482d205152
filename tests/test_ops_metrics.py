"""The metrics port against a stranger: a real `pinrpc-server serve --metrics-listen`."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from server import metrics
from tests.conftest import ServerFiles, eventually
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
                with contextlib.suppress(OSError):  # the server closed it: what the fix does
                    conn.send(b"G")
            if scraped(port):
                break
            time.sleep(1)
        assert scraped(port), "the trickling connections still hold every slot"


def rss_kib(pid: int) -> int:
    match = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert match
    return int(match.group(1))


def test_huge_headers_cannot_grow_the_server(
    devca: ServerFiles, registry: Path, tmp_path: Path
) -> None:
    # The standard library reads up to 100 header lines of 64 KiB each before it answers; 16
    # such requests at once grew the server by about 100 MB before.
    log = tmp_path / "server.log"
    header = b"X-Pad: " + b"a" * 65_000 + b"\r\n"
    with serve_process(devca.cert, devca.key, registry, log, "--metrics-listen",
                       "127.0.0.1:0") as server, ExitStack() as stack:  # fmt: skip
        port = metrics_port(server.log)
        assert scraped(port)
        before = rss_kib(server.pid)

        def send(conn: socket.socket) -> None:
            with contextlib.suppress(OSError):  # the server closed it: what the fix does
                conn.sendall(b"GET /metrics HTTP/1.1\r\n" + header * 99)

        conns = [stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
                 for _ in range(metrics.MAX_CONNECTIONS)]  # fmt: skip
        senders = [threading.Thread(target=send, args=(conn,)) for conn in conns]
        for sender in senders:
            sender.start()
        peak = before
        for _ in range(20):  # 2 s, bounded
            peak = max(peak, rss_kib(server.pid))
            time.sleep(0.1)
        for sender in senders:
            sender.join(timeout=10)
        assert peak - before < 20_000, f"grew by {peak - before} KiB"
        for conn in conns:
            conn.close()
        eventually(lambda: scraped(port), timeout=10)
