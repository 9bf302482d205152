"""The server's stderr, drained by a helper process so that a stalled log collector stalls nothing.

Writing to a pipe that nobody reads blocks the writer. Before this, a collector that stopped
reading (tests/security/test_stderr.py) stopped the trust watcher at its next log line,
so later revocations and enrollments never applied, and left one gRPC core thread blocked for
good per refused handshake (the core logs each one to stderr itself).

``serve`` therefore points file descriptor 2 at a pipe that this module, run as a separate
process, empties into memory at once and passes on to the real stderr. Only the helper waits
for the collector; beyond ``LIMIT`` bytes it drops whole lines and says how many once the
collector reads again. A process rather than a thread: what a crashing server wrote last (a
fatal gRPC message, a traceback) is still in the pipe, and the helper outlives the server to
pass it on. It ends at end of file, that is when the server has exited.

The helper also bounds gRPC's own lines. The core writes one per refused handshake, and one
local client with a certificate nobody enrolled made 617 a second here (130 kB/s, 11 GB a
day). They get the audit's limit (``--audit-rate``), and a line says how many were suppressed.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from server.audit import TokenBucket

LIMIT = 1 << 20  # bytes of lines held while the collector does not read
EXIT_WAIT = 5.0  # seconds the server waits at exit for the helper to pass the rest on
LINGER = 30  # seconds the helper keeps trying after the server exited, then gives up
GATHER = 0.02  # seconds the helper waits after each read, so that lines arrive in batches
PIPE_SIZE = 1 << 20  # the server-to-helper pipe, far more than GATHER's worth of lines


@contextlib.contextmanager
def drained(log_format: str, grpc_rate: float) -> Iterator[None]:
    """Route this process's stderr through the helper while inside; a no-op without stderr."""
    try:
        real = os.dup(2)
    except OSError:  # started with stderr closed: nothing can stall
        yield
        return
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):  # above the system's limit: the default 64 KiB
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)  # what arrives while the helper waits
    argv = helper_argv(log_format, LIMIT, LINGER, grpc_rate)
    try:
        helper = subprocess.Popen(argv, stdin=read_end, stdout=real, stderr=subprocess.DEVNULL)
    except OSError as exc:  # out of processes or memory: serve all the same, unprotected
        print(
            f"pinrpc-server: warning: stderr not protected from a stalled reader: {exc}",
            file=sys.stderr,
        )
        for fd in (read_end, write_end, real):
            os.close(fd)
        yield
        return
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(real, 2)  # the pipe's last writer closes: the helper reads end of file
        os.close(real)
        # Bounded: the collector may still be stalled, and the helper copes with that alone.
        with contextlib.suppress(subprocess.TimeoutExpired):
            helper.wait(EXIT_WAIT)


def grpc_line_rate(audit_rate: float) -> float:
    """gRPC's own lines a second: the audit's rate, unlimited while GRPC_TRACE is set (the
    operator asked for the core's traces, every one of them)."""
    return math.inf if os.environ.get("GRPC_TRACE") else audit_rate


def helper_argv(log_format: str, limit: int, linger: int, grpc_rate: float) -> list[str]:
    """The helper's command line: this module's main(), isolated from the environment (-I)
    and without site-packages (-S), which it does not need."""
    root = str(Path(__file__).resolve().parent.parent)
    bootstrap = f"import sys; sys.path.insert(0, {root!r}); from {__name__} import main; " \
        "sys.exit(main(sys.argv[1:]))"  # fmt: skip
    return [sys.executable, "-I", "-S", "-c", bootstrap, log_format, str(limit), str(linger),
            str(grpc_rate)]  # fmt: skip


# -- the helper process ----------------------------------------------------------------------

# gRPC core's own lines, in absl's format: severity, date, time, thread, file:line], e.g.
# "I1129 12:05:22.069924   32482 ssl_transport_security.cc:2563] Handshake failed ...".
GRPC_LINE = re.compile(rb"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.+-]+:\d+\] ")


class Buffer:
    """Whole lines waiting for the collector, at most ``limit`` bytes; the rest counted."""

    def __init__(self, limit: int, grpc_rate: float, log_format: str) -> None:
        self.limit, self.log_format = limit, log_format
        self.lines: deque[bytes] = deque()
        self.size = self.dropped = 0
        self.ended = False
        self.changed = threading.Condition()
        self.grpc_rate, self.suppressed = grpc_rate, 0
        self.grpc_lines = None
        if math.isfinite(grpc_rate):
            self.grpc_lines = TokenBucket(grpc_rate, max(1, int(grpc_rate * 4)))  # as the audit's

    def read(self, fd: int, linger: int) -> None:
        partial = b""
        while chunk := os.read(fd, PIPE_SIZE):
            *lines, partial = (partial + chunk).split(b"\n")
            self.add([line + b"\n" for line in lines])
            # Let lines gather: a reader waiting in read() is woken by each line the server
            # writes, and takes the server's CPU from it each time (one audit line per new
            # connection: 15 % more context switches for the server without this, none with).
            time.sleep(GATHER)
        # The server's last words may lack a newline; a notice after them must not.
        self.add([partial + b"\n"] if partial else [])
        if self.suppressed:
            self.add([self.suppressed_notice()])
        signal.alarm(linger)  # the server has exited: do not wait for a stalled collector forever
        with self.changed:
            self.ended = True
            self.changed.notify()

    def add(self, lines: list[bytes]) -> None:
        with self.changed:
            for line in lines:
                if self.grpc_lines is not None and GRPC_LINE.match(line):
                    if not self.grpc_lines.take():
                        self.suppressed += 1
                        continue
                    if self.suppressed:
                        line = self.suppressed_notice() + line
                # Once one is dropped, so is the rest until the writer takes: the count then
                # stands for the lines right after those taken.
                if self.dropped or self.size + len(line) > self.limit:
                    self.dropped += 1
                else:
                    self.lines.append(line)
                    self.size += len(line)
            self.changed.notify()

    def suppressed_notice(self) -> bytes:
        count, self.suppressed = self.suppressed, 0
        rate = f"{self.grpc_rate:g}"
        return notice(f"{count} gRPC log line(s) suppressed: more than {rate} a second",
                      self.log_format)  # fmt: skip

    def take(self) -> tuple[bytes, int] | None:
        """The waiting lines and the count dropped after them; None once all is passed on."""
        with self.changed:
            while not self.lines and not self.ended:
                self.changed.wait()
            if not self.lines and not self.dropped:
                return None
            data, dropped = b"".join(self.lines), self.dropped
            self.lines.clear()
            self.size = self.dropped = 0
            return data, dropped


def notice(message: str, log_format: str) -> bytes:
    """A warning line of the helper's, in the server's --log-format."""
    if log_format == "json":
        now = dt.datetime.now(dt.UTC).isoformat()
        fields = {"time": now, "level": "WARNING", "logger": "pinrpc.server", "message": message}
        return (json.dumps(fields) + "\n").encode()
    now = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
    return f"{now} WARNING pinrpc.server: {message}\n".encode()


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main(argv: list[str]) -> int:
    """The helper: stdin is the server's stderr, stdout the collector's (see helper_argv)."""
    log_format, limit, linger, grpc_rate = argv[0], int(argv[1]), int(argv[2]), float(argv[3])
    # Ctrl-C reaches the whole process group; the helper leaves when the server has.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    buffer = Buffer(limit, grpc_rate, log_format)
    threading.Thread(target=buffer.read, args=(0, linger), daemon=True).start()
    try:
        while (taken := buffer.take()) is not None:
            data, dropped = taken
            if dropped:
                data += notice(f"{dropped} log line(s) dropped: stderr was not being read",
                               log_format)  # fmt: skip
            write_all(1, data)
    except OSError:
        return 1  # the collector went away (EPIPE): nobody is left to tell
    return 0
