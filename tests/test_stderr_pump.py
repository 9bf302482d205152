"""server/stderr_helper.py, run as the real process server/stderr_pump.py starts for `serve`."""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import select
import signal
import subprocess
import time

import pytest

import server.stderr_pump as pump
from server.stderr_helper import GRPC_LINE

LINES = [f"line {i:04d} ".encode().ljust(99, b"x") + b"\n" for i in range(300)]
LAST = b"no newline at the end"


def run_helper(
    log_format: str, limit: int, *, stall: bool, lines: list[bytes] = LINES, grpc_rate: float = 50
) -> tuple[bytes, int]:
    """Feed ``lines`` to the helper; with ``stall``, read its output only once all are fed."""
    out_read, out_write = os.pipe()
    fcntl.fcntl(out_write, fcntl.F_SETPIPE_SZ, 4096)
    argv = pump.helper_argv(log_format, limit, 30, grpc_rate)
    helper = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out_write)
    os.close(out_write)
    assert helper.stdin is not None
    out, deadline = b"", time.monotonic() + 20
    try:
        # Ctrl-C and SIGTERM reach the whole process group; the helper stays for the lines.
        time.sleep(0.3)
        helper.send_signal(signal.SIGINT)
        helper.send_signal(signal.SIGTERM)
        for line in lines:
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
    assert out == b"".join(LINES) + LAST + b"\n"  # the end of file ends the last line


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_stalled_collector_gets_whole_lines_and_a_count_of_the_rest(log_format: str) -> None:
    out, code = run_helper(log_format, 2_000, stall=True)
    assert code == 0
    fed_lines = [*LINES, LAST + b"\n"]
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
    argv = pump.helper_argv("text", pump.LIMIT, 1, 50)
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
    with pump.drained("text", 50):
        assert os.fstat(2).st_ino == before.st_ino  # stderr itself, not a pipe of ours
    assert len(os.listdir("/proc/self/fd")) == fds  # the pipe and the copy are closed
    err = capfd.readouterr().err
    assert (
        err == "pinrpc-server: warning: stderr not protected from a stalled reader: [Errno 11] "
        "Resource temporarily unavailable\n"
    )


def grpc_line(i: int) -> bytes:
    return (f"I1130 07:42:51.{i:06d}    8196 ssl_transport_security.cc:2563] Handshake failed "
            f"with error SSL_ERROR_SSL: CERTIFICATE_VERIFY_FAILED {i}\n").encode()  # fmt: skip


def test_grpc_core_lines_get_the_audit_rate_and_a_count_of_the_rest() -> None:
    """One per refused handshake: a stranger could otherwise write as fast as it connects."""
    grpc_lines = [grpc_line(i) for i in range(300)]
    own_lines = LINES[:100]
    fed = []
    for i, line in enumerate(grpc_lines):  # one of pinrpc's own lines after every third
        fed += [line, own_lines[i // 3]] if i % 3 == 0 else [line]
    started = time.monotonic()
    out, code = run_helper("json", pump.LIMIT, stall=False, lines=fed, grpc_rate=10)
    refilled = 10 * (time.monotonic() - started)
    assert code == 0
    g = own = passed = 0
    for line in out.splitlines(keepends=True):
        if line.startswith(b"{"):  # a notice
            message = json.loads(line)["message"]
            found = re.fullmatch(r"(\d+) gRPC log line\(s\) suppressed: more than 10 a second",
                                 message)  # fmt: skip
            assert found is not None, message
            g += int(found[1])
        elif GRPC_LINE.match(line):
            assert line == grpc_lines[g]
            g, passed = g + 1, passed + 1
        elif line != LAST + b"\n":
            assert line == own_lines[own]  # pinrpc's own lines are never limited here
            own += 1
    assert (g, own) == (300, 100)
    assert 40 <= passed <= 41 + refilled  # a burst of 4 x 10, and what refilled meanwhile


def test_with_grpc_traces_on_every_core_line_is_passed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [grpc_line(i) for i in range(300)]
    out, code = run_helper("text", pump.LIMIT, stall=False, lines=lines, grpc_rate=math.inf)
    assert code == 0 and out == b"".join(lines) + LAST + b"\n"
    monkeypatch.setenv("GRPC_TRACE", "handshaker")
    assert pump.grpc_line_rate(50) == math.inf
    monkeypatch.delenv("GRPC_TRACE")
    assert pump.grpc_line_rate(50) == 50
