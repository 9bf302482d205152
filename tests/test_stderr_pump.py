"""server/stderr_pump.py's helper, run as the real process `serve` starts."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest

import server.stderr_pump as pump

LINES = [f"line {i:04d} ".encode().ljust(99, b"x") + b"\n" for i in range(300)]
LAST = b"no newline at the end"


def run_helper(log_format: str, limit: int, *, stall: bool) -> tuple[bytes, int]:
    """Feed LINES to the helper; with ``stall``, read its output only once all are fed."""
    out_read, out_write = os.pipe()
    fcntl.fcntl(out_write, fcntl.F_SETPIPE_SZ, 4096)
    argv = [sys.executable, "-I", "-S", pump.__file__, log_format, str(limit), "30"]
    helper = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out_write)
    os.close(out_write)
    assert helper.stdin is not None
    out, deadline = b"", time.monotonic() + 20
    try:
        # Ctrl-C and SIGTERM reach the whole process group; the helper stays for the lines.
        time.sleep(0.3)
        helper.send_signal(signal.SIGINT)
        helper.send_signal(signal.SIGTERM)
        for line in LINES:
            helper.stdin.write(line)
            helper.stdin.flush()
            if not stall:
                while select.select([out_read], [], [], 0)[0]:
                    out += os.read(out_read, 65536)
        helper.stdin.write(LAST)
        helper.stdin.close()
        if stall:
            time.sleep(0.5)  # let it take in, and drop, what it will
        while chunk := os.read(out_read, 65536):
            out += chunk
            assert time.monotonic() < deadline
        return out, helper.wait(timeout=10)
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
        os.close(out_read)


def test_a_reading_collector_gets_every_line_in_order() -> None:
    out, code = run_helper("text", pump.LIMIT, stall=False)
    assert code == 0
    assert out == b"".join(LINES) + LAST


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_stalled_collector_gets_whole_lines_and_a_count_of_the_rest(log_format: str) -> None:
    out, code = run_helper(log_format, 2_000, stall=True)
    assert code == 0
    fed_lines = [*LINES, LAST]
    # Walk the output: each line is the next one fed, or a notice of how many came next.
    fed = notices = 0
    for line in out.decode().splitlines(keepends=True):
        if "dropped" not in line:
            assert line.encode() == fed_lines[fed]
            fed += 1
            continue
        notices += 1
        if log_format == "json":
            notice = json.loads(line)
            assert notice["level"] == "WARNING" and notice["logger"] == "pinrpc.server"
        else:
            assert " WARNING pinrpc.server: " in line
        count = re.search(r"(\d+) log line\(s\) dropped: stderr was not being read", line)
        assert count is not None
        fed += int(count[1])
    assert fed == len(fed_lines) and notices >= 1


def test_the_helper_gives_up_on_a_collector_stalled_after_the_server_exited() -> None:
    out_read, out_write = os.pipe()
    fcntl.fcntl(out_write, fcntl.F_SETPIPE_SZ, 4096)
    argv = [sys.executable, "-I", "-S", pump.__file__, "text", str(pump.LIMIT), "1"]
    helper = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out_write)
    os.close(out_write)
    try:
        helper.communicate(b"".join(LINES), timeout=10)  # more than the pipe holds, then EOF
        assert helper.returncode == -signal.SIGALRM
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
        os.close(out_read)


def test_serving_goes_on_unprotected_when_the_helper_cannot_start(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """Fork failing (out of processes or memory) cannot be arranged for root here: simulated."""

    def no_fork(*_: object, **__: object) -> None:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(subprocess, "Popen", no_fork)
    before, fds = os.fstat(2), len(os.listdir("/proc/self/fd"))
    with pump.drained("text"):
        assert os.fstat(2).st_ino == before.st_ino  # stderr itself, not a pipe of ours
    assert len(os.listdir("/proc/self/fd")) == fds  # the pipe and the copy are closed
    err = capfd.readouterr().err
    assert (
        err == "pinrpc-server: warning: stderr not protected from a stalled reader: [Errno 11] "
        "Resource temporarily unavailable\n"
    )
