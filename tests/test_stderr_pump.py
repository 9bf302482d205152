"""server/stderr_helper.py, run as the real process server/stderr_pump.py starts for `serve`."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import server.stderr_pump as pump
from server.stderr_helper import CUT, GRPC_LINE, MARK, Buffer, Lines
from tests.conftest import eventually

LINES = [f"line {i:04d} ".encode().ljust(99, b"x") + b"\n" for i in range(300)]
LAST = b"no newline at the end"

Fed = list[tuple[bool, bytes]]  # (from pinrpc's own logging, else fd 2; the line)


def own(lines: list[bytes]) -> Fed:
    return [(True, line) for line in lines]


OWN_LINES = own(LINES)


def ignores(pid: int, *signums: signal.Signals) -> bool:
    """Whether process ``pid`` ignores all of ``signums`` (its SigIgn mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^SigIgn:\s+([0-9a-f]+)$", status, re.MULTILINE)
    assert found, status
    mask = int(found.group(1), 16)
    return all(mask >> (signum - 1) & 1 for signum in signums)


def run_helper(
    log_format: str, limit: int, *, stall: bool, fed: Fed = OWN_LINES, grpc_rate: float = 50
) -> tuple[bytes, int]:
    """Feed the lines to the helper, each on its channel, then LAST on pinrpc's; with
    ``stall``, read its output only once all are fed."""
    out_read, out_write = os.pipe()
    fcntl.fcntl(out_write, fcntl.F_SETPIPE_SZ, 4096)
    log_read, log_write = os.pipe()
    argv = pump.helper_argv(log_format, limit, 30, grpc_rate, log_read)
    helper = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out_write, pass_fds=[log_read])
    os.close(out_write)
    os.close(log_read)
    assert helper.stdin is not None
    channels = {False: helper.stdin, True: os.fdopen(log_write, "wb")}
    out, deadline = b"", time.monotonic() + 20
    try:
        # Ctrl-C and SIGTERM reach the whole process group; the helper stays for the lines,
        # once it has started ignoring them (a slow start would otherwise be killed here).
        eventually(lambda: ignores(helper.pid, signal.SIGINT, signal.SIGTERM), timeout=10)
        helper.send_signal(signal.SIGINT)
        helper.send_signal(signal.SIGTERM)
        for trusted, line in fed:
            channels[trusted].write(line)
            channels[trusted].flush()
            if not stall:
                while select.select([out_read], [], [], 0)[0]:
                    out += os.read(out_read, 65536)
        channels[True].write(LAST)
        for channel in channels.values():
            channel.close()
        if stall:
            time.sleep(0.5)  # let it take in, and drop, what it will
        while chunk := os.read(out_read, 65536):
            out += chunk
            assert time.monotonic() < deadline
        return out, helper.wait(timeout=10)
    finally:
        for channel in channels.values():
            with contextlib.suppress(OSError):
                channel.close()
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
    log_read, log_write = os.pipe()
    os.close(log_write)  # pinrpc's logging: ended at once
    argv = pump.helper_argv("text", pump.LIMIT, 1, 50, log_read)
    helper = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out_write, pass_fds=[log_read])
    os.close(out_write)
    os.close(log_read)
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
    with pump.drained("text", 50) as own_logging:
        assert os.fstat(2).st_ino == before.st_ino  # stderr itself, not a pipe of ours
        assert own_logging is sys.stderr  # pinrpc's logging too, as before the helper
    assert len(os.listdir("/proc/self/fd")) == fds  # the pipes and the copy are closed
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
    fd2: list[bytes] = []  # each core line with a line of its own text after it (a GOAWAY's)
    for i in range(300):
        fd2 += [grpc_line(i), f"debug text {i}\n".encode()]
    own_lines = LINES[:100]
    fed: Fed = []
    for i in range(0, len(fd2), 2):  # one of pinrpc's own lines after every third message
        fed += core(fd2[i : i + 2])
        if i % 6 == 0:
            fed.append((True, own_lines[i // 6]))
    started = time.monotonic()
    out, code = run_helper("json", pump.LIMIT, stall=False, fed=fed, grpc_rate=10)
    refilled = 10 * (time.monotonic() - started)
    assert code == 0
    g = own = passed = 0
    for line in out.splitlines(keepends=True):
        if line.startswith(b"{"):  # a notice
            message = json.loads(line)["message"]
            found = re.fullmatch(r"(\d+) gRPC log line\(s\) suppressed: more than 10 a second",
                                 message)  # fmt: skip
            assert found is not None, message
            g += int(found[1])  # whole messages: a suppressed line's text is suppressed with it
        elif GRPC_LINE.match(line):
            assert line == fd2[g]
            g, passed = g + 1, passed + 1
        elif line.startswith(MARK):
            assert line == MARK + fd2[g]
            g += 1
        elif line != LAST + b"\n":
            assert line == own_lines[own]  # pinrpc's own lines are never limited here
            own += 1
    assert (g, own) == (600, 100)
    assert 40 <= passed <= 41 + refilled  # a burst of 4 x 10, and what refilled meanwhile


def core(lines: list[bytes]) -> Fed:
    return [(False, line) for line in lines]


def test_lines_on_fd_2_cannot_pass_for_pinrpcs() -> None:
    """Anything a client can make gRPC or Python write there gets MARK, whatever it looks like;
    pinrpc's own lines, which come through their own pipe, are passed on as they are."""
    pinrpc_text = b"2026-11-30 10:00:00,000 INFO pinrpc.server: listening on 127.0.0.1:0\n"
    pinrpc_json = b'{"level": "INFO", "logger": "pinrpc.audit", "event": "enroll"}\n'
    goaway = b"I1130 10:00:00.000000   42 chttp2_transport.cc:1403] Got goaway; Debug Text: \n"
    forged = [b"2026-11-30 10:00:00,000 INFO pinrpc.audit: {}\n",
              b'{"level": "INFO", "logger": "pinrpc.audit", "event": "revoke"}\n',
              b"Traceback (most recent call last):\n", b"\n"]  # fmt: skip
    fed = [*own([pinrpc_text]), *core([goaway, *forged]), *own([pinrpc_json])]
    for log_format in ("text", "json"):
        out, code = run_helper(log_format, pump.LIMIT, stall=False, fed=fed)
        assert code == 0
        lines = out.splitlines(keepends=True)  # in order within each channel
        fd2 = [line for line in lines if line.startswith(MARK) or GRPC_LINE.match(line)]
        assert fd2 == [goaway, *(MARK + line for line in forged)]
        assert [line for line in lines if line not in fd2] == [pinrpc_text, pinrpc_json,
                                                                LAST + b"\n"]  # fmt: skip


def test_an_over_long_line_is_cut_and_the_lines_after_it_pass() -> None:
    """Before, a line over the limit with nothing else waiting silenced all later lines until
    exit, and then counted them as dropped."""
    long_line = b"x" * (pump.LIMIT + 10) + b"\n"
    fed = [*own([b"first\n", long_line]), *core([long_line]), *own(LINES[:5])]
    out, code = run_helper("text", pump.LIMIT, stall=False, fed=fed)
    assert code == 0
    cut = long_line[: pump.LIMIT // 2 - len(CUT)] + CUT + b"\n"
    lines = out.splitlines(keepends=True)
    assert [line for line in lines if line.startswith(MARK)] == [MARK + cut]
    own_lines = [b"first\n", cut, *LINES[:5], LAST + b"\n"]
    assert [line for line in lines if not line.startswith(MARK)] == own_lines


def test_a_line_without_an_end_is_cut_without_holding_it_all() -> None:
    lines = Lines(100)
    assert lines.feed(b"a" * 60) == []
    assert lines.feed(b"a" * 60) == [b"a" * (100 - len(CUT)) + CUT + b"\n"]  # not waiting for it
    assert lines.partial == b""  # memory stays bounded while the line goes on
    assert lines.feed(b"a" * 500) == []
    assert lines.feed(b"a" * 10 + b"\nnext\nlast") == [b"next\n"]  # its end is skipped
    assert lines.end() == [b"last\n"]


def test_a_count_of_dropped_lines_is_passed_on_without_waiting_for_a_line() -> None:
    buffer = Buffer(100, 50, "text")
    buffer.hold(b"y" * 101)  # more than the buffer holds, and nothing waiting
    taken: list[tuple[bytes, int] | None] = []
    taker = threading.Thread(target=lambda: taken.append(buffer.take()), daemon=True)
    taker.start()
    taker.join(5)
    assert taken == [(b"", 1)]  # before: take() waited for a line, and none could come


def test_with_grpc_traces_on_every_core_line_is_passed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [grpc_line(i) for i in range(300)]
    out, code = run_helper("text", pump.LIMIT, stall=False, fed=core(lines), grpc_rate=math.inf)
    assert code == 0
    # In order within each channel; LAST, on pinrpc's own pipe, may come anywhere among them.
    passed = out.splitlines(keepends=True)
    assert [line for line in passed if GRPC_LINE.match(line)] == lines
    assert [line for line in passed if not GRPC_LINE.match(line)] == [LAST + b"\n"]
    monkeypatch.setenv("GRPC_TRACE", "handshaker")
    assert pump.grpc_line_rate(50) == math.inf
    monkeypatch.delenv("GRPC_TRACE")
    assert pump.grpc_line_rate(50) == 50
