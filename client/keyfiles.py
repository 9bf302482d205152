"""The client's key pair on disk across a rotation: NAME.crt/.key, and the retiring *.old pair.

The old pair is kept while the server still accepts it (the rotation's overlap); the next
rotation deletes it once the overlap has ended, or replaces it with the pair it retires. Nothing
reads *.old: processes that loaded an older pair hold it in memory until they restart.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from pinrpc.errors import IdentityError
from pinrpc.identity import move_all, write_all


def old(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def new(path: Path) -> Path:
    return path.with_name(path.name + ".new")


def _until_file(cert: Path) -> Path:
    return cert.with_name(cert.name + ".old-until")


def finish_by_hand(cert: Path, key: Path) -> str:
    """How to check a staged pair and move it into place (or drop it), as one sentence."""
    return (
        f"check it with `pinrpc whoami --cert {new(cert)} --key {new(key)}` (same connection "
        f"flags): if the server names you, move it into place (mv {new(key)} {key}; "
        f"mv {new(cert)} {cert}); if it refuses it, delete both *.new files"
    )


def stage_pair(cert: Path, key: Path, cert_pem: bytes, key_pem: bytes) -> None:
    """Write NAME.crt.new and NAME.key.new together, never over an earlier rotation's pair.

    A current key its group may read (a service reading it under --insecure-key-permissions)
    passes that on to the new one: otherwise the service would lose its key at the swap."""
    try:
        current = key.stat()
        shared = bool(current.st_mode & stat.S_IRGRP)
        mode, owners = (0o640, {new(key): (-1, current.st_gid)}) if shared else (0o600, None)
        write_all(
            [(new(key), key_pem, mode), (new(cert), cert_pem, 0o644)],
            overwrite=False,
            owners=owners,
        )
    except FileExistsError as exc:
        raise unfinished_error(cert, key) from exc
    except OSError as exc:
        raise IdentityError(
            f"cannot write the new key pair next to {cert}: {exc.strerror or exc}"
        ) from exc


def unfinished_error(cert: Path, key: Path) -> IdentityError:
    return IdentityError(
        f"{new(cert)} or {new(key)} already exists: the new pair of an earlier rotation whose "
        f"outcome was unknown; {finish_by_hand(cert, key)}"
    )


@contextlib.contextmanager
def rotating(cert: Path) -> Iterator[None]:
    """One rotate of a pair at a time: a second one took the first one's staged *.new pair
    for an unfinished rotation and told the user to move it by hand while the first ran.
    Held on the current certificate's inode, which the swap moves to *.old: a rotate that
    opens the certificate after that rotates the new pair, as it would a moment later."""
    try:
        fd = os.open(cert, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise IdentityError(f"cannot read certificate {cert.absolute()}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IdentityError(
                f"another `pinrpc rotate` of {cert} is running; let it finish, then check "
                f"which pair is in place with `pinrpc whoami` (same connection flags)"
            ) from None
        yield
    finally:
        os.close(fd)


def check_targets(cert: Path, key: Path) -> None:
    """Before asking the server: refuse what would make the swap fail after it said yes."""
    for path in (new(cert), new(key)):
        if os.path.lexists(path):
            raise unfinished_error(cert, key)
    for path in (old(key), old(cert), _until_file(cert), new(_until_file(cert))):
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise IdentityError(f"cannot check {path}: {exc.strerror}") from exc
        if not stat.S_ISREG(mode):
            raise IdentityError(
                f"{path} is in the way of the rotation (not a regular file); move it away"
            )


def swap_in(cert: Path, key: Path, new_cert: Path, new_key: Path, until: dt.datetime) -> None:
    """Move the current pair to *.old and the staged pair into place, all or nothing."""
    marker = _until_file(cert)
    try:
        write_all([(new(marker), until.isoformat().encode(), 0o644)], overwrite=True)
        moves = [(key, old(key)), (new_key, key), (cert, old(cert)), (new_cert, cert)]
        move_all([*moves, (new(marker), marker)], overwrite=True)
    except OSError as exc:
        with contextlib.suppress(OSError):  # the error below matters, not this cleanup's
            new(marker).unlink(missing_ok=True)
        raise IdentityError(f"cannot swap the key pair {cert}, {key}: {exc}") from exc


def remove_expired_old_pair(cert: Path, key: Path, now: dt.datetime | None = None) -> bool:
    """Delete the *.old pair once the server no longer accepts it; True if something went."""
    marker = _until_file(cert)
    try:
        until = dt.datetime.fromisoformat(marker.read_text().strip())
    except (OSError, ValueError):
        return False
    if until.tzinfo is None:  # written by hand: read it as UTC, as this module writes it
        until = until.replace(tzinfo=dt.UTC)
    if until > (now or dt.datetime.now(dt.UTC)):
        return False
    try:
        for path in (old(key), old(cert), marker):
            path.unlink(missing_ok=True)
    except OSError as exc:
        raise IdentityError(f"cannot remove the retired pair {old(cert)}: {exc}") from exc
    return True
