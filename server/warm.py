"""--warm-start FILE: remember which clients connected, so a restart serves them first.

Loading every enrolled certificate takes about 10 s for 10,000 clients (docs/PERFORMANCE.md),
and a server cannot serve anyone before its first TLS context is built. With
``--tls-reload handover`` the first listener can hold fewer roots: the clients this server saw
connect (recorded here, one SHA-256 fingerprint per line), then the full set is handed over
in the background. The first listener trusts at most FIRST_MAX of them, the most recently
seen, so it stays fast however many clients connected before. The file holds public
fingerprints only, and is intersected with the active enrolled clients at start (and pruned
to them at every save), so an edited file can only change who waits, never who gets in.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from collections.abc import Container, Iterable
from pathlib import Path

from pinrpc.identity import write_atomic

log = logging.getLogger("pinrpc.server")
MAX_BYTES = 4 * 1024 * 1024
MAX_CLIENTS = MAX_BYTES // 65  # 64 hex digits and a newline each: 64,527
# A FIFO, a device, a directory or a symlink is neither read nor replaced: a symlink planted
# in a shared directory would have the server read a file of the planter's choosing.
NOT_REGULAR = "not a regular file"
# Nor is a hard link read (the server's own file has one name), for the same reason: it would
# log the file's first word as a malformed fingerprint. Saving replaces the link, not its file.
LINKED = "a hard link to another file"
# The server writes the file mode 0600 as itself; one that someone else owns or may write was
# put there by them, and could make a restart trust one client first and keep the rest waiting.
WRITABLE = "owned by another user or writable by others"
# The first listener's roots at most. Each root costs more to load as the store grows
# (docs/PERFORMANCE.md, "Trust store at scale"): sorted, 2,000 load in 0.21-0.22 s here, 3,000
# in 0.50 s, 10,000 in 7.5 s. So a steady fleet, where every client connected before the
# restart, still gets its most recent 2,000 served in well under a second.
FIRST_MAX = 2_000


class WarmSet:
    """Fingerprints (SHA-256 digests) of clients seen on this server, saved to a file with the
    most recently seen last."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._saved = self._loaded = load(path)
        self._seen: dict[bytes, None] = {}  # this run's, in the order first seen
        # Said at start: otherwise the first save (a minute on, or at stop) is the first word.
        if problem := _unsavable(path):
            log.warning("the warm-start file %s cannot be saved: %s", path.absolute(), problem)

    def first(self, active: Container[bytes]) -> tuple[frozenset[bytes], int]:
        """The FIRST_MAX most recently seen of the ``active`` clients the file named at start,
        and how many active clients it named."""
        known = [d for d in self._loaded if d in active]
        return frozenset(known[-FIRST_MAX:]), len(known)

    def seen(self, digest: bytes) -> None:
        if digest not in self._seen:  # a dict read needs no lock; adds are rare
            with self._lock:
                self._seen[digest] = None

    def save(self, active: Container[bytes]) -> None:
        """Write the file if its contents change; a failure is logged, never raised.

        Only ``active`` clients are kept: revoked and rotated-away fingerprints would otherwise
        pile up until the file passed MAX_BYTES and the next start ignored all of it."""
        with self._lock:
            seen = dict(self._seen)
        older = [d for d in self._saved if d not in seen]
        keep = tuple(d for d in (*older, *seen) if d in active)[-MAX_CLIENTS:]
        if keep == self._saved:
            return
        text = "".join(f"{d.hex()}\n" for d in keep)
        try:
            if _not_regular(self.path):
                raise OSError(NOT_REGULAR)
            write_atomic(self.path, text.encode(), 0o600)
        except OSError as exc:
            log.warning("could not save the warm-start file %s: %s", self.path, exc)
            return
        self._saved = keep


def load(path: Path) -> tuple[bytes, ...]:
    """The fingerprints in ``path``, in order; none (with a warning) if it is missing or
    malformed."""
    try:
        data = _read_regular(path, MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES} bytes")
        return tuple(dict.fromkeys(_parse(data.decode("ascii").split())))
    except FileNotFoundError:
        return ()
    except (OSError, ValueError) as exc:
        log.warning("ignoring the warm-start file %s: %s", path, exc)
        return ()


def _read_regular(path: Path, limit: int) -> bytes:
    # O_NONBLOCK: opening a FIFO would otherwise wait for a writer, and start-up with it.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
            raise ValueError(NOT_REGULAR) from exc
        raise
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise ValueError(NOT_REGULAR)
        if status.st_nlink != 1:
            raise ValueError(LINKED)
        if status.st_uid != os.geteuid() or status.st_mode & 0o022:
            raise ValueError(WRITABLE)
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit)
    finally:
        os.close(fd)


def _unsavable(path: Path) -> str | None:
    """Why ``path`` could not be written (its directory is missing or read-only), or None."""
    parent = path.absolute().parent
    if not parent.is_dir():
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"the server may not write to {parent}"
    return None


def _not_regular(path: Path) -> bool:
    """Something other than a regular file, a symlink included, is at ``path``."""
    try:
        return not stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _parse(words: Iterable[str]) -> Iterable[bytes]:
    for word in words:
        digest = bytes.fromhex(word)
        if len(digest) != 32:
            raise ValueError(f"not a SHA-256 fingerprint: {word[:80]!r}")
        yield digest
