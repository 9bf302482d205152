"""Signals to a real `pinrpc-server serve` and to its stderr helper."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.conftest import ServerFiles
from tests.security.attacker import other_thread, serve_process


def test_a_hang_up_to_the_helper_does_not_lose_the_servers_last_lines(
    devca: ServerFiles, registry: Path, tmp_path: Path
) -> None:
    # A closed terminal sends SIGHUP to the whole process group. The helper ignored SIGINT and
    # SIGTERM for that reason, but died of SIGHUP, and every later line of the server was lost.
    log = tmp_path / "server.log"
    with serve_process(devca.cert, devca.key, registry, log) as server:
        pid = server.pid
        (helper,) = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        os.kill(int(helper), signal.SIGHUP)
        assert server.terminate() == 0
    assert "stopping: finishing in-flight calls" in log.read_text()


def test_a_hang_up_stops_the_server_like_sigterm(
    devca: ServerFiles, registry: Path, tmp_path: Path
) -> None:
    # It killed the server at once (exit -1): no drain, no stopping line, queued audit lines lost.
    log = tmp_path / "server.log"
    with serve_process(devca.cert, devca.key, registry, log) as server:
        server.process.send_signal(signal.SIGHUP)
        assert server.process.wait(timeout=30) == 0
    assert "stopping: finishing in-flight calls" in log.read_text()


def test_a_signal_caught_by_another_thread_still_stops_the_server(
    devca: ServerFiles, registry: Path, tmp_path: Path
) -> None:
    # The kernel gives a process's signal to any thread that does not block it; Python runs
    # the handler only in the main thread, which waited with no timeout and never woke: the
    # server ignored that SIGTERM. kill(2) with a thread's id makes that thread take it.
    log = tmp_path / "server.log"
    with serve_process(devca.cert, devca.key, registry, log) as server:
        os.kill(other_thread(server.pid), signal.SIGTERM)
        assert server.process.wait(timeout=10) == 0
    assert "stopping: finishing in-flight calls" in log.read_text()
