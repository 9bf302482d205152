"""The server's stderr, drained by a helper process so that a stalled log collector stalls nothing.

Writing to a pipe that nobody reads blocks the writer. Before this, a collector that stopped
reading (tests/security/test_stalled_stderr.py) stopped the trust watcher at its next log line,
so later revocations and enrollments never applied, and left one gRPC core thread blocked for
good per refused handshake (the core logs each one to stderr itself).

``serve`` therefore points file descriptor 2 at a pipe that this module, run as a separate
process, empties into memory at once and passes on to the real stderr. Only the helper waits
for the collector; beyond ``LIMIT`` bytes it drops whole lines and says how many once the
collector reads again. A process rather than a thread: what a crashing server wrote last (a
fatal gRPC message, a traceback) is still in the pipe, and the helper outlives the server to
pass it on. It ends at end of file, that is when the server has exited.

Run as a script it uses only the standard library (started with ``python -I -S``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator

LIMIT = 1 << 20  # bytes of lines held while the collector does not read
EXIT_WAIT = 5.0  # seconds the server waits at exit for the helper to pass the rest on
LINGER = 30  # seconds the helper keeps trying after the server exited, then gives up
GATHER = 0.02  # seconds the helper waits after each read, so that lines arrive in batches
PIPE_SIZE = 1 << 20  # the server-to-helper pipe, far more than GATHER's worth of lines


@contextlib.contextmanager
def drained(log_format: str) -> Iterator[None]:
    """Route this process's stderr through the helper while inside; a no-op without stderr."""
    try:
        real = os.dup(2)
    except OSError:  # started with stderr closed: nothing can stall
        yield
        return
    read_end, write_end = os.pipe()
    with contextlib.suppress(OSError):  # above the system's limit: the default 64 KiB
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)  # what arrives while the helper waits
    argv = [sys.executable, "-I", "-S", os.path.abspath(__file__), log_format, str(LIMIT),
            str(LINGER)]  # fmt: skip
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


# -- the helper process ----------------------------------------------------------------------


class Buffer:
    """Whole lines waiting for the collector, at most ``limit`` bytes; the rest counted."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.lines: deque[bytes] = deque()
        self.size = self.dropped = 0
        self.ended = False
        self.changed = threading.Condition()

    def read(self, fd: int, linger: int) -> None:
        partial = b""
        while chunk := os.read(fd, PIPE_SIZE):
            *lines, partial = (partial + chunk).split(b"\n")
            self.add([line + b"\n" for line in lines])
            # Let lines gather: a reader waiting in read() is woken by each line the server
            # writes, and takes the server's CPU from it each time (one audit line per new
            # connection: 15 % more context switches for the server without this, none with).
            time.sleep(GATHER)
        self.add([partial] if partial else [])
        signal.alarm(linger)  # the server has exited: do not wait for a stalled collector forever
        with self.changed:
            self.ended = True
            self.changed.notify()

    def add(self, lines: list[bytes]) -> None:
        with self.changed:
            for line in lines:
                # Once one is dropped, so is the rest until the writer takes: the count then
                # stands for the lines right after those taken.
                if self.dropped or self.size + len(line) > self.limit:
                    self.dropped += 1
                else:
                    self.lines.append(line)
                    self.size += len(line)
            self.changed.notify()

    def take(self) -> tuple[bytes, int] | None:
        """The waiting lines and the count dropped before them; None once all is passed on."""
        with self.changed:
            while not self.lines and not self.ended:
                self.changed.wait()
            if not self.lines and not self.dropped:
                return None
            data, dropped = b"".join(self.lines), self.dropped
            self.lines.clear()
            self.size = self.dropped = 0
            return data, dropped


def notice(dropped: int, log_format: str) -> bytes:
    message = f"{dropped} log line(s) dropped: stderr was not being read"
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
    log_format, limit, linger = argv[0], int(argv[1]), int(argv[2])
    # Ctrl-C reaches the whole process group; the helper leaves when the server has.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    buffer = Buffer(limit)
    threading.Thread(target=buffer.read, args=(0, linger), daemon=True).start()
    try:
        while (taken := buffer.take()) is not None:
            data, dropped = taken
            write_all(1, data + (notice(dropped, log_format) if dropped else b""))
    except OSError:
        return 1  # the collector went away (EPIPE): nobody is left to tell
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
