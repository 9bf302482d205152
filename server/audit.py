"""The audit trail: one JSON line per denial, per connection's first allowed call, per change.

Lines go to the ``pinrpc.audit`` logger (so they follow --log-format). Token buckets bound
them: a flood of refused calls cannot fill the disk; what was dropped is counted and reported
in the next line that gets through, or in an ``audit_suppressed`` line once the drops stop
(and at stop()), so the count is never lost. Calls, the changes clients may make themselves
(rotations, enrollment requests) and the operator's changes (enrollments, permissions, admin
actions) have a bucket each, so that no flood of the first two can push the third out of the
trail; revocations and retirements are never dropped (``ALWAYS``).

A call only queues its event (with the time it happened); a writer thread turns the queue into
lines every ``FLUSH_INTERVAL``. Built one by one between TLS handshakes, a line cost about
100 us of server CPU; built in a batch, a small fraction of that (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time

from server.ratelimit import TokenBucket

log = logging.getLogger("pinrpc.audit")


# The longest a line waits in the queue; a killed server (SIGKILL) loses at most this much.
FLUSH_INTERVAL = 0.1
# Call lines waiting beyond this many are counted as suppressed: a writer stuck on a blocked
# stderr (a stalled log collector) must not grow the queue without bound. Change lines may
# fill as many again, so that calls cannot crowd them out of the queue either.
MAX_QUEUED = 10_000
# Drops that no line has reported get a line of their own once the count has stood still this
# long: the flood is over and nothing came after it to carry the count.
REPORT_AFTER = 1.0
# Never dropped: any enrolled client can spend the changes' bucket by rotating, and then the
# trail lost whom the operator revoked. Each certificate leaves the trusted set once, so these
# are bounded by the registry's rows, as the server's memory already is.
ALWAYS = frozenset(("revoke", "retire"))
# What any enrolled client (Rotate, up to its daily limit) or any host (an enrollment request)
# can cause at will: a bucket of their own, or a flood of them dropped the operator's changes.
SELF_SERVICE = frozenset(("rotate", "enrollment_request"))


class _Line:
    """An audit record as a log message, encoded only if a text formatter asks for it: the JSON
    formatter writes the record's fields itself, and encoding them twice was wasted work."""

    __slots__ = ("record",)

    def __init__(self, record: dict[str, object]) -> None:
        self.record = record

    def __str__(self) -> str:
        return json.dumps(self.record)


class Audit:
    """Rate-limited audit events, queued by event() and written by flush(): every
    FLUSH_INTERVAL between start() and stop(), and by stop() itself."""

    def __init__(self, rate: float = 50.0, burst: int = 200) -> None:
        self._calls = TokenBucket(rate, burst)
        self._changes = TokenBucket(rate, burst)
        self._self_service = TokenBucket(rate, burst)
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # one flush at a time, so lines stay in order
        self.suppressed = 0  # dropped since the last queued line (calls and changes alike)
        self._still = (0, 0.0)  # the count flush() last saw change, and when
        self._queue: list[tuple[float, str, dict[str, object], int]] = []
        self._stopped = threading.Event()
        self._writer: threading.Thread | None = None

    def event(self, event: str, **fields: object) -> None:
        with self._lock:
            if event == "call":
                full, bucket = len(self._queue) >= MAX_QUEUED, self._calls
            elif event in ALWAYS:
                full, bucket = False, None
            elif event in SELF_SERVICE:
                full, bucket = len(self._queue) >= 2 * MAX_QUEUED, self._self_service
            else:
                full, bucket = len(self._queue) >= 2 * MAX_QUEUED, self._changes
            if full or (bucket is not None and not bucket.take()):
                self.suppressed += 1
                return
            dropped, self.suppressed = self.suppressed, 0
            self._queue.append((time.time(), event, fields, dropped))

    def flush(self, final: bool = False) -> None:
        """Write every queued event, in the order they happened; then the drops no line will
        report (all of them when ``final``)."""
        with self._flushing:
            with self._lock:
                queued, self._queue = self._queue, []
                stranded = self._stranded(final)
            if stranded:
                queued.append((time.time(), "audit_suppressed", {}, stranded))
            for when, event, fields, dropped in queued:
                record: dict[str, object] = {
                    "time": dt.datetime.fromtimestamp(when, dt.UTC).isoformat(),
                    "event": event,
                    **fields,
                }
                if dropped:
                    record["suppressed_before"] = dropped
                log.info(_Line(record), extra={"audit": record})

    def _stranded(self, final: bool) -> int:
        """The drop count to report on a line of its own, taken (called under the lock).

        Watched here rather than timed in event(), whose only work must stay the append."""
        now = time.monotonic()
        if self.suppressed != self._still[0]:
            self._still = (self.suppressed, now)
        if not self.suppressed or not (final or now - self._still[1] >= REPORT_AFTER):
            return 0
        dropped, self.suppressed, self._still = self.suppressed, 0, (0, now)
        return dropped

    def start(self) -> None:
        """Write the queue every FLUSH_INTERVAL from a thread of its own, until stop()."""
        self._writer = threading.Thread(target=self._write, name="pinrpc-audit", daemon=True)
        self._writer.start()

    def stop(self) -> None:
        """Stop the writer and write what is still queued, and the count of what was not."""
        self._stopped.set()
        if self._writer is not None:
            self._writer.join()
        self.flush(final=True)

    def _write(self) -> None:
        # Woken by the clock, never by event(): a wake-up per line would cost what batching saves.
        while not self._stopped.wait(FLUSH_INTERVAL):
            self.flush()
