"""--warm-start FILE: remember which clients connected, so a restart serves them first.

Loading every enrolled certificate takes about 10 s for 10,000 clients (docs/PERFORMANCE.md),
and a server cannot serve anyone before its first TLS context is built. With
``--tls-reload handover`` the first listener can hold fewer roots: the clients this server saw
connect (recorded here, one SHA-256 fingerprint per line), then the full set is handed over
in the background. The file holds public fingerprints only, and is intersected with the
active enrolled clients at start, so an edited file can only change who waits, never who
gets in.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from collections.abc import Iterable
from pathlib import Path

from pinrpc.identity import write_atomic

log = logging.getLogger("pinrpc.server")
MAX_BYTES = 4 * 1024 * 1024  # 64 hex digits + newline each: room for 60,000 clients
NOT_REGULAR = "not a regular file"  # a FIFO, a device or a directory is neither read nor replaced


class WarmSet:
    """Fingerprints (SHA-256 digests) of clients seen on this server, saved to a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._digests = set(load(path))
        self._saved = frozenset(self._digests)

    def loaded(self) -> frozenset[bytes]:
        return self._saved

    def seen(self, digest: bytes) -> None:
        if digest not in self._digests:  # a set read needs no lock; adds are rare
            with self._lock:
                self._digests.add(digest)

    def save(self) -> None:
        """Write the file if something new was seen; a failure is logged, never raised."""
        with self._lock:
            digests = frozenset(self._digests)
        if digests == self._saved:
            return
        text = "".join(f"{d.hex()}\n" for d in sorted(digests))
        try:
            if self.path.exists() and not self.path.is_file():
                raise OSError(NOT_REGULAR)
            write_atomic(self.path, text.encode(), 0o600)
        except OSError as exc:
            log.warning("could not save the warm-start file %s: %s", self.path, exc)
            return
        self._saved = digests


def load(path: Path) -> frozenset[bytes]:
    """The fingerprints in ``path``; empty (with a warning) if it is missing or malformed."""
    try:
        data = _read_regular(path, MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES} bytes")
        return frozenset(_parse(data.decode("ascii").split()))
    except FileNotFoundError:
        return frozenset()
    except (OSError, ValueError) as exc:
        log.warning("ignoring the warm-start file %s: %s", path, exc)
        return frozenset()


def _read_regular(path: Path, limit: int) -> bytes:
    # O_NONBLOCK: opening a FIFO would otherwise wait for a writer, and start-up with it.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(NOT_REGULAR)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit)
    finally:
        os.close(fd)


def _parse(words: Iterable[str]) -> Iterable[bytes]:
    for word in words:
        digest = bytes.fromhex(word)
        if len(digest) != 32:
            raise ValueError(f"not a SHA-256 fingerprint: {word[:80]!r}")
        yield digest
