"""TLS handshakes counted inside gRPC's credential fetcher, without running Python there.

gRPC's C core calls the fetcher on one of its own threads at every new handshake. Measured
pinned, server CPU per new connection against bare grpcio rose 5-8 % with a fetcher written in
Python, 0-2 % with one implemented in C (docs/PERFORMANCE.md, "New connections"): CPython
builds a thread state for each call, and a Python frame on it costs more than that. So every
fetcher is composed of C-implemented callables only. Each call takes one item of a counting
iterator shared by the mTLS listeners and pops what waits in its own slot: a new configuration
for --tls-reload inline, otherwise None ("keep the current one").

A connection's first call follows its handshake (gRPC connects on first use), so a handshake
that no new connection has claimed yet is what tells server.observe to look for one.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from operator import length_hint
from typing import Any

# A handshake not followed by a new connection's first call within this many seconds (failed,
# or a channel connected eagerly and not used yet) stops counting as pending.
NEW_CONNECTION_WINDOW = 10.0
SLOT_KEY = "config"


def fetcher(slot: dict[str, Any], ticks: Iterator[str] | None = None) -> Callable[[], Any]:
    """slot.pop(SLOT_KEY, None) at every call, taking one item of ``ticks`` (an iterator
    yielding SLOT_KEY) on the way; all in C."""
    keys = itertools.repeat(SLOT_KEY) if ticks is None else ticks
    calls: Iterator[Any] = map(slot.pop, keys, itertools.repeat(None))
    return calls.__next__


class Handshakes:
    """How many handshakes there were, and whether one is still waiting for its first call.

    The count lives in ``itertools.repeat`` (each handshake takes an item, ``length_hint``
    says how many are left), so counting costs the fetcher no Python. Claims and expiry move
    a cursor over the same count, oldest handshake first.
    """

    def __init__(self) -> None:
        self._ticks = itertools.repeat(SLOT_KEY, sys.maxsize)
        self._cursor = sys.maxsize  # items left just after the last claimed or expired one
        self._marks: deque[tuple[float, int]] = deque()  # (time, items left then)
        self._lock = threading.Lock()

    def fetcher(self, slot: dict[str, Any]) -> Callable[[], Any]:
        """A credential fetcher that counts its calls here (see the module's docstring)."""
        return fetcher(slot, self._ticks)

    def total(self) -> int:
        return sys.maxsize - length_hint(self._ticks)

    def pending(self) -> bool:
        """Some handshake has been neither claimed nor expired. Asked on every call."""
        return length_hint(self._ticks) < self._cursor

    def claim(self) -> None:
        """A new connection made its first call: its handshake (or an older one) is done."""
        with self._lock:
            if length_hint(self._ticks) < self._cursor:
                self._cursor -= 1

    def expire(self, now: float | None = None) -> None:
        """Forget handshakes older than the window; called every poll (server.trust)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._marks.append((now, length_hint(self._ticks)))
            while self._marks[0][0] <= now - NEW_CONNECTION_WINDOW:
                # Every handshake before that mark is older than the window.
                self._cursor = min(self._cursor, self._marks.popleft()[1])
