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

pinrpc's own logging reaches the helper through a pipe of its own; file descriptor 2 is left to
what pinrpc does not control (gRPC core, Python's tracebacks), which a client can write into:
the helper marks that channel's lines so that none can pass for pinrpc's (stderr_helper.py).

The helper also bounds gRPC's own lines. The core writes one per refused handshake, and one
local client with a certificate nobody enrolled made 617 a second here (130 kB/s, 11 GB a
day). They get the audit's limit (``--audit-rate``), and a line says how many were suppressed.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from server.stderr_helper import PIPE_SIZE

LIMIT = 1 << 20  # bytes of lines held while the collector does not read
EXIT_WAIT = 5.0  # seconds the server waits at exit for the helper to pass the rest on
LINGER = 30  # seconds the helper keeps trying after the server exited, then gives up


@contextlib.contextmanager
def drained(log_format: str, grpc_rate: float) -> Iterator[TextIO]:
    """Route this process's stderr through the helper while inside, and yield the stream for
    pinrpc's own logging (stderr itself when there is no helper)."""
    try:
        real = os.dup(2)
    except OSError:  # started with stderr closed: nothing can stall
        yield sys.stderr
        return
    read_end, write_end = os.pipe()  # fd 2's, untrusted
    log_read, log_write = os.pipe()  # pinrpc's logging
    for fd in (write_end, log_write):
        with contextlib.suppress(OSError):  # above the system's limit: the default 64 KiB
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)  # what arrives while the helper waits
    argv = helper_argv(log_format, LIMIT, LINGER, grpc_rate, log_read)
    try:
        # Niced from its first instruction: starting and running it must not take the server's
        # CPU (its interpreter's start-up took a quarter of a shared core for 60 ms otherwise).
        # A preexec_fn is safe here: `serve` has started no thread yet.
        helper = subprocess.Popen(argv, stdin=read_end, stdout=real, stderr=subprocess.DEVNULL,
                                  pass_fds=(log_read,), preexec_fn=lambda: os.nice(10))  # fmt: skip
    except OSError as exc:  # out of processes or memory: serve all the same, unprotected
        print(
            f"pinrpc-server: warning: stderr not protected from a stalled reader: {exc}",
            file=sys.stderr,
        )
        for fd in (read_end, write_end, log_read, log_write, real):
            os.close(fd)
        yield sys.stderr
        return
    os.close(read_end)
    os.close(log_read)
    os.dup2(write_end, 2)
    os.close(write_end)
    # As sys.stderr is: a character it cannot encode must not lose the line.
    own_logging = open(log_write, "w", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
    try:
        yield own_logging
    finally:
        sys.stderr.flush()
        own_logging.close()
        os.dup2(real, 2)  # the pipes' last writers close: the helper reads end of file
        os.close(real)
        # Bounded: the collector may still be stalled, and the helper copes with that alone.
        with contextlib.suppress(subprocess.TimeoutExpired):
            helper.wait(EXIT_WAIT)


def grpc_line_rate(audit_rate: float) -> float:
    """gRPC's own lines a second: the audit's rate, unlimited while GRPC_TRACE is set (the
    operator asked for the core's traces, every one of them)."""
    return math.inf if os.environ.get("GRPC_TRACE") else audit_rate


def helper_argv(
    log_format: str, limit: int, linger: int, grpc_rate: float, own_logging: int
) -> list[str]:
    """The helper's command line: server/stderr_helper.py's main(), isolated from the
    environment (-I) and without site-packages (-S), which it does not need; ``own_logging`` is
    the descriptor it reads pinrpc's logging from."""
    root = str(Path(__file__).resolve().parent.parent)
    bootstrap = (f"import sys; sys.path.insert(0, {root!r}); "
                 "from server.stderr_helper import main; sys.exit(main(sys.argv[1:]))")  # fmt: skip
    return [sys.executable, "-I", "-S", "-c", bootstrap, log_format, str(limit), str(linger),
            str(grpc_rate), str(own_logging)]  # fmt: skip
