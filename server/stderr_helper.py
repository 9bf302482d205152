"""The stderr helper process that server/stderr_pump.py starts (see there for why).

It reads two channels. Its stdin is the server's file descriptor 2: gRPC core's lines, Python's
own fatal errors and tracebacks, anything else. Anyone who can make the core log something
(a client's HTTP/2 GOAWAY debug text, logged verbatim, newlines included) writes there, so it
is untrusted: a line there that is not a core line gets ``MARK`` in front, and none can pass for
one of pinrpc's. pinrpc's own logging comes through a second pipe (the descriptor given on the
command line), passed on as it is.

One thread per channel empties its pipe into memory at once; the main thread passes the lines
on, and only it waits for the collector. It imports little, so that it is ready before the
server has much to say.
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
PIPE_SIZE = 1 << 20  # each server-to-helper pipe, far more than GATHER's worth of lines
CHANNELS = 2  # fd 2 (untrusted) and pinrpc's logging (trusted)

# gRPC core's own lines, in absl's format: severity, date, time, thread, file:line], e.g.
# "I1129 12:05:22.069924   32482 ssl_transport_security.cc:2563] Handshake failed ...".
GRPC_LINE = re.compile(rb"[IWEF]\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.+-]+:\d+\] ")
# Before every other line of fd 2: no such line starts with a timestamp or a '{', as pinrpc's do.
MARK = b"  | "
CUT = b" [cut: line too long]"
# Control bytes in fd 2's lines, each passed on as "?": a stranger's GOAWAY text reached the
# log verbatim, and a carriage return or an ANSI escape rewrote a terminal's view of the line
# (its MARK included), a NUL ended the line for journald. A line keeps only its final newline.
CONTROLS = bytes((*range(0x09), *range(0x0B, 0x20), 0x7F))
NEUTERED = bytes.maketrans(CONTROLS, b"?" * len(CONTROLS))
# A handover closes the previous listener's sockets, and gRPC's acceptor says so, alarmingly,
# once for each (below). The listener logs CLOSING first (through the trusted channel, 50 ms
# before): that many such lines within CLOSE_WINDOW seconds become one INFO line each. Any
# other accept4 failure, or one without the notice (--log-level WARNING), passes unchanged.
CLOSING = "closing the previous listener's %d listening socket(s)"
CLOSING_LINE = re.compile(re.escape(CLOSING).replace("%d", r"(\d+)"))
ACCEPTOR_CLOSED = re.compile(rb"E\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ "
                             rb"(?:posix_engine_listener|tcp_server_posix)\.cc:\d+\] "
                             rb"Closing acceptor\. Failed accept4: Invalid argument\n")  # fmt: skip
TEXT_PREFIX = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO pinrpc\.server: ")
CLOSE_WINDOW = 2.0


class Lines:
    """One channel's bytes as lines of at most ``max_len`` bytes: a longer one is passed on cut,
    with ``CUT``, and the rest of it skipped, so that no line can fill the buffer alone."""

    def __init__(self, max_len: int) -> None:
        self.max_len, self.partial, self.skipping = max_len, b"", False

    def feed(self, chunk: bytes) -> list[bytes]:
        *ends, self.partial = (self.partial + chunk).split(b"\n")
        if self.skipping and ends:
            del ends[0]  # the rest of a line already passed on cut
            self.skipping = False
        lines = [self.bounded(end) for end in ends]
        if len(self.partial) > self.max_len:  # no newline yet: cut now, memory stays bounded
            if not self.skipping:
                lines.append(self.bounded(self.partial))
            self.partial, self.skipping = b"", True
        return lines

    def end(self) -> list[bytes]:
        """The last words, which may lack a newline (a notice after them must not)."""
        return [self.bounded(self.partial)] if self.partial and not self.skipping else []

    def bounded(self, line: bytes) -> bytes:
        if len(line) > self.max_len:
            line = line[: self.max_len - len(CUT)] + CUT
        return line + b"\n"


class Buffer:
    """Whole lines waiting for the collector, at most ``limit`` bytes; the rest counted."""

    def __init__(self, limit: int, grpc_rate: float, log_format: str) -> None:
        self.limit, self.log_format = limit, log_format
        self.lines: deque[bytes] = deque()
        self.size = self.dropped = 0
        self.open = CHANNELS
        self.ended = False
        self.changed = threading.Condition()
        self.grpc_rate, self.suppressed, self.suppressing = grpc_rate, 0, False
        self.grpc_lines = None
        self.closing, self.closing_until = 0, 0.0  # acceptor lines a handover announced
        if math.isfinite(grpc_rate):
            self.grpc_lines = TokenBucket(grpc_rate, burst_for(grpc_rate))  # as the audit's

    def read(self, fd: int, trusted: bool, linger: int) -> None:
        lines = Lines(self.limit // 2)  # half: an empty buffer always takes a line
        while chunk := os.read(fd, PIPE_SIZE):
            self.add(lines.feed(chunk), trusted)
            # Let lines gather: a reader waiting in read() is woken by each line the server
            # writes, and takes the server's CPU from it each time (one audit line per new
            # connection: 15 % more context switches for the server without this, none with).
            time.sleep(GATHER)
        self.add(lines.end(), trusted)
        with self.changed:
            self.open -= 1
            if self.open:
                return
            if self.suppressed:
                self.hold(self.suppressed_notice())
            signal.alarm(
                linger
            )  # the server has exited: do not wait for a stalled collector forever
            self.ended = True
            self.changed.notify()

    def add(self, lines: list[bytes], trusted: bool) -> None:
        with self.changed:
            for line in lines:
                if trusted and (count := self.closing_notice(line)):
                    self.closing, self.closing_until = count, time.monotonic() + CLOSE_WINDOW
                passed = line if trusted else self.untrusted(line)
                if passed is not None:
                    self.hold(passed)
            self.changed.notify()

    def untrusted(self, line: bytes) -> bytes | None:
        """A line of fd 2 as passed on, or None when it is suppressed."""
        line = line.translate(NEUTERED)
        if not GRPC_LINE.match(line):
            if self.suppressing:  # the rest of a suppressed core message (GOAWAY text can be long)
                self.suppressed += 1
                return None
            return MARK + line
        if (
            self.closing
            and time.monotonic() < self.closing_until
            and ACCEPTOR_CLOSED.fullmatch(line)
        ):
            self.closing -= 1
            closed = "gRPC stopped accepting on the previous listener, which the handover closed"
            return notice(closed, self.log_format, "INFO")
        if self.grpc_lines is not None and not self.grpc_lines.take():
            self.suppressed += 1
            self.suppressing = True
            return None
        self.suppressing = False
        return self.suppressed_notice() + line if self.suppressed else line

    def closing_notice(self, line: bytes) -> int:
        """The sockets a trusted line's CLOSING notice announces; 0 for any other line."""
        if CLOSING.split("%")[0].encode() not in line:  # most lines: the audit's
            return 0
        text = line.decode(errors="replace").rstrip("\n")
        if self.log_format == "json":
            try:
                fields = json.loads(text)
            except ValueError:
                return 0
            ours = isinstance(fields, dict) and fields.get("logger") == "pinrpc.server"
            message = fields.get("message") if ours and fields.get("level") == "INFO" else None
        else:
            prefix = TEXT_PREFIX.match(text)
            message = text[prefix.end() :] if prefix else None
        found = CLOSING_LINE.fullmatch(message) if isinstance(message, str) else None
        return int(found[1]) if found else 0

    def hold(self, line: bytes) -> None:
        # Once one is dropped, so is the rest until the writer takes: the count then stands
        # for the lines right after those taken.
        if self.dropped or self.size + len(line) > self.limit:
            self.dropped += 1
        else:
            self.lines.append(line)
            self.size += len(line)

    def suppressed_notice(self) -> bytes:
        count, self.suppressed = self.suppressed, 0
        rate = f"{self.grpc_rate:g}"
        return notice(f"{count} gRPC log line(s) suppressed: more than {rate} a second",
                      self.log_format)  # fmt: skip

    def take(self) -> tuple[bytes, int] | None:
        """The waiting lines and the count dropped after them; None once all is passed on."""
        with self.changed:
            # A count alone is worth waking for: its notice must not wait for the next line.
            while not self.lines and not self.dropped and not self.ended:
                self.changed.wait()
            if not self.lines and not self.dropped:
                return None
            data, dropped = b"".join(self.lines), self.dropped
            self.lines.clear()
            self.size = self.dropped = 0
            return data, dropped


def notice(message: str, log_format: str, level: str = "WARNING") -> bytes:
    """A line of the helper's, in the server's --log-format."""
    if log_format == "json":
        now = dt.datetime.now(dt.UTC).isoformat()
        fields = {"time": now, "level": level, "logger": "pinrpc.server", "message": message}
        return (json.dumps(fields) + "\n").encode()
    now = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
    return f"{now} {level} pinrpc.server: {message}\n".encode()


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main(argv: list[str]) -> int:
    """argv: --log-format, the byte limit, the linger seconds, gRPC's lines a second, and the
    descriptor of pinrpc's own logging."""
    log_format, limit, linger, grpc_rate = argv[0], int(argv[1]), int(argv[2]), float(argv[3])
    own_logging = int(argv[4])
    # Ctrl-C and a closed terminal's hang-up reach the whole process group; the helper leaves
    # when the server has.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    buffer = Buffer(limit, grpc_rate, log_format)
    for fd, trusted in ((0, False), (own_logging, True)):
        threading.Thread(target=buffer.read, args=(fd, trusted, linger), daemon=True).start()
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
