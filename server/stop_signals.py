"""serve's stop signals: the first drains in-flight calls, a second cuts the drain short."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.app import RunningServer

# After a second signal, how long cancelled handlers may take before serve exits without them.
FORCED_EXIT_AFTER = 3.0


class StopSignals:
    """serve's stop signals: the first drains in-flight calls for the grace period, a second
    (an operator pressing Ctrl-C twice) cuts the drain short.

    Counted by a thread of their own from the wake-up fd, which the C-level handler writes in
    whichever thread the kernel gave the signal: Python runs the handler itself only once the
    main thread runs again, and after the grace period that thread waits, without a timeout,
    for the worker pool that a handler ignoring the cancellation holds."""

    def __init__(self, signums: tuple[int, ...]) -> None:
        self.stop = threading.Event()
        self.wake = threading.Event()  # a second signal came, or the drain ended
        self.drained = threading.Event()
        self.forced: int | None = None  # the second signal's number
        self._signums = signums
        self._read, self._write = socket.socketpair()
        self._write.setblocking(False)  # the C handler must never block
        # Not the default handlers: the thread counts them. Put back by close(), for a serve
        # run inside a longer-lived process (the tests run it in pytest's) that no signal
        # stopped.
        self._handlers = {n: signal.signal(n, lambda *_: None) for n in signums}
        self._wakeup = signal.set_wakeup_fd(self._write.fileno(), warn_on_full_buffer=False)
        self._counter = threading.Thread(target=self._count, name="pinrpc-signals", daemon=True)
        self._counter.start()

    def _count(self) -> None:
        while data := self._read.recv(64):  # empty once close() closed the writing end
            for signum in (n for n in data if n in self._signums):
                # Once drained, a later signal has nothing to cut short: serve exits 0.
                if self.stop.is_set() and self.forced is None and not self.drained.is_set():
                    self.forced = signum
                    self.wake.set()
                self.stop.set()

    def close(self) -> None:
        """Put back the handlers replaced, unless a signal stopped serve: then the process
        is on its way out (its stderr helper may take 5 s more), and the default handlers
        would turn a second Ctrl-C or SIGTERM, after a clean drain, into exit 130 or 143."""
        signal.set_wakeup_fd(self._wakeup)
        for signum, handler in self._handlers.items():
            if self.stop.is_set():
                signal.signal(signum, signal.SIG_IGN)
            elif handler is not None:  # None: set outside Python, nothing to put back
                signal.signal(signum, handler)
        self._write.close()
        self._counter.join()
        self._read.close()


def cut_short(signals: StopSignals, running: RunningServer) -> None:
    """On a second signal, cancel the in-flight calls, so the drain (in the main thread)
    ends now; the audit and stderr still get their last lines out on the way. A handler that
    ignores the cancellation (stuck on a hung registry, or a user service's own I/O) would
    still hold the worker pool's shutdown: then exit without it."""
    signals.wake.wait()
    if signals.forced is None:
        return
    log = logging.getLogger("pinrpc.server")
    log.warning("second signal: stopping without waiting for in-flight calls")
    running.listener.stop(None)
    if not signals.drained.wait(FORCED_EXIT_AFTER):
        log.error(
            "in-flight calls still running %g s after the second signal: exiting without them",
            FORCED_EXIT_AFTER,
        )
        running.audit.stop()  # its last lines, then nothing else can be waited for
        logging.shutdown()
        os._exit(128 + signals.forced)
