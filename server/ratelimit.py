"""A token bucket: the audit's lines, and gRPC's own lines in the stderr helper."""

from __future__ import annotations

import time
from collections.abc import Callable


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


# A burst as good as unlimited; the cap keeps the count an int for any rate, inf included.
MAX_BURST = 10**9


def burst_for(rate: float) -> int:
    """--audit-rate's bursts: four seconds' worth, and at least one line (below 0.25 a second
    a smaller bucket could never pass a line at all)."""
    burst = rate * 4
    return max(1, int(burst)) if burst < MAX_BURST else MAX_BURST
