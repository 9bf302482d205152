"""Signals to a real `pinrpc-server serve` and to its stderr helper."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ServerFiles
from tests.security.attacker import BIN, other_thread, serve_process, server_env


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


def _read_until(fd: int, text: bytes, seen: bytearray, timeout: float = 20) -> None:
    """Read ``fd`` into ``seen`` until ``text`` is in it, or end of file ("" as ``text``)."""
    deadline = time.monotonic() + timeout
    while not (text and text in seen):
        left = deadline - time.monotonic()
        assert left > 0, f"no {text!r} within {timeout} s in {bytes(seen)!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                assert not text, f"end of file before {text!r}: {bytes(seen)!r}"
                return
            seen += chunk


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_after_the_drain_finished_still_exits_zero(
    devca: ServerFiles, registry: Path, signum: signal.Signals
) -> None:
    # After a clean drain serve put its signals' old handlers back and then waited (up to 5 s)
    # for its stderr helper to pass on its last lines: a second Ctrl-C or SIGTERM meanwhile
    # killed it (exit -15: 143 in a shell) after it had finished everything.
    read, write = os.pipe()  # serve's stdout and stderr: a log collector that stalls
    argv = [str(BIN / "pinrpc-server"), "serve", "--listen", "127.0.0.1:0", "--cert",
            str(devca.cert), "--key", str(devca.key), "--registry", str(registry)]  # fmt: skip
    process = subprocess.Popen(argv, stdout=write, stderr=write, env=server_env())
    seen = bytearray()
    try:
        _read_until(read, b"check --registry", seen)  # start-up's last line
        # Fill the pipe: the helper holds the lines to come, and serve waits for it at exit.
        # Not blocking only meanwhile: the helper's stdout shares the flag, and takes EAGAIN
        # for a collector gone.
        os.set_blocking(write, False)
        for _ in range(1024):
            try:
                os.write(write, b"\n" * 65536)
            except BlockingIOError:
                break
        os.set_blocking(write, True)
        ours = os.readlink(f"/proc/self/fd/{write}")
        process.send_signal(signum)
        # The drain is over once serve gives fd 2 back to our pipe, just before that wait.
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{process.pid}/fd/2") != ours:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.01)
        process.send_signal(signum)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        os.close(write)
    _read_until(read, b"", seen)  # the helper passes the rest on, then exits
    os.close(read)
    text = seen.decode(errors="replace")
    assert "stopping: finishing in-flight calls" in text
    assert "second signal" not in text
    assert "Traceback" not in text
