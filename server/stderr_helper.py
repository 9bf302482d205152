"""The stderr helper process that server/stderr_pump.py starts (see there for why).

Its stdin is the server's stderr and its stdout the collector's. One thread empties the pipe
into memory at once; the main thread passes the lines on, and only it waits for the
collector. It imports little, so that it is ready before the server has much to say.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
import signal
import threading
import time
from collections import deque

from server.ratelimit import TokenBucket, burst_for

GATHER = 0.02  # seconds the helper waits after each read, so that lines arrive in batches
PIPE_SIZE = 1 << 20  # the server-to-helper pipe, far more than GATHER's worth of lines

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
            self.grpc_lines = TokenBucket(grpc_rate, burst_for(grpc_rate))  # as the audit's

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
    """argv: --log-format, the byte limit, the linger seconds, gRPC's lines a second."""
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
