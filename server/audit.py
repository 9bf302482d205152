"""The audit trail: one JSON line per denial, per connection's first allowed call, per change.

Lines go to the ``pinrpc.audit`` logger (so they follow --log-format). A token bucket bounds
them: a flood of refused calls cannot fill the disk; what was dropped is counted and reported
in the next line that gets through.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("pinrpc.audit")


class TokenBucket:
    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self._rate, self._burst, self._clock = rate, burst, clock
        self._tokens = float(burst)
        self._last = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class Audit:
    def __init__(self, rate: float = 50.0, burst: int = 200) -> None:
        self._bucket = TokenBucket(rate, burst)
        self._lock = threading.Lock()
        self.suppressed = 0

    def event(self, event: str, **fields: object) -> None:
        with self._lock:
            if not self._bucket.take():
                self.suppressed += 1
                return
            dropped, self.suppressed = self.suppressed, 0
        record: dict[str, object] = {
            "time": dt.datetime.now(dt.UTC).isoformat(),
            "event": event,
            **fields,
        }
        if dropped:
            record["suppressed_before"] = dropped
        log.info(json.dumps(record), extra={"audit": record})
