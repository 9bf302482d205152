"""The client's key pair on disk across a rotation: NAME.crt/.key, and the retiring *.old pair.

The old pair is kept while the server still accepts it (the rotation's overlap), so a
process that read the old files keeps working; it is removed once the overlap has ended.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from pinrpc.identity import write_atomic


def old(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def _until_file(cert: Path) -> Path:
    return cert.with_name(cert.name + ".old-until")


def stage(path: Path, data: bytes, mode: int) -> Path:
    """Write the successor next to ``path`` before anything irreversible happens."""
    staged = path.with_name(path.name + ".new")
    write_atomic(staged, data, mode)
    return staged


def swap_in(cert: Path, key: Path, new_cert: Path, new_key: Path, until: dt.datetime) -> None:
    """Move the current pair to *.old and the staged pair into place (each file atomically)."""
    for current, staged in ((key, new_key), (cert, new_cert)):
        os.replace(current, old(current))
        os.replace(staged, current)
    write_atomic(_until_file(cert), until.isoformat().encode(), 0o644)


def remove_expired_old_pair(cert: Path, key: Path, now: dt.datetime | None = None) -> bool:
    """Delete the *.old pair once the server no longer accepts it; True if something went."""
    marker = _until_file(cert)
    try:
        until = dt.datetime.fromisoformat(marker.read_text().strip())
    except (OSError, ValueError):
        return False
    if until > (now or dt.datetime.now(dt.UTC)):
        return False
    for path in (old(key), old(cert), marker):
        path.unlink(missing_ok=True)
    return True
