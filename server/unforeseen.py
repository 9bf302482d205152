"""Keep a background loop alive through an exception that no handler foresaw."""

from __future__ import annotations

import logging
from collections.abc import Callable


class Unforeseen:
    """Runs one step of a background thread's loop. A thread ended by an unforeseen exception
    would stop doing its job (picking up revocations, handing over listeners) while the server
    looked healthy, with one traceback to say so. Instead the step's failure is logged with its
    traceback once per distinct failure (loops retry several times a second), and the loop
    goes on; the step working again is logged too."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self._log, self._what = log, what
        self._failing: str | None = None  # the current failure, as logged

    def run(self, step: Callable[[], object]) -> bool:
        """Run ``step``; False if it raised."""
        try:
            step()
        except Exception as exc:
            failure = f"{type(exc).__name__}: {exc}"
            if failure != self._failing:
                self._log.exception("%s failed unexpectedly, retrying: %s", self._what, failure)
                self._failing = failure
            return False
        if self._failing is not None:
            self._log.info("%s works again", self._what)
            self._failing = None
        return True
