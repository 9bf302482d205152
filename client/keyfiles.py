"""The client's key pair on disk across a rotation: NAME.crt/.key, and the retiring *.old pair.

The old pair is kept while the server still accepts it (the rotation's overlap); the next
rotation deletes it once the overlap has ended, or replaces it with the pair it retires. Nothing
reads *.old: processes that loaded an older pair hold it in memory until they restart.

Crash safety: a new pair is staged as *.new (both files synced), then a journal NAME.crt.swap
is written before the first rename of the swap: for a rotate, only after the server said yes,
holding the old pair's end (the *.old-until marker it becomes); for keygen, the word
"keygen" (no old pair kept). A process killed anywhere leaves either no journal (the current
pair is untouched; a lone NAME.key.new is a staging that never reached the server) or a
journal, which ``recover`` rolls forward: every pinrpc call runs it first. All changes hold
the directory's lock, briefly, so a recovery never meets a live swap half-way.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import glob
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pinrpc.channel import swap_journal
from pinrpc.errors import IdentityError
from pinrpc.identity import (
    DEFAULT_DAYS,
    Fingerprint,
    KeyPairFiles,
    cert_to_pem,
    check_name,
    exists_error,
    generate_key,
    key_to_pem,
    load_certificate,
    make_directory,
    move_all,
    self_signed_certificate,
    sync_directories,
    write_all,
)

KEYGEN = "keygen"  # a journal naming no end for an old pair: keygen keeps none
PAUSE = "PINRPC_TEST_PAUSE_AT"


def pause(point: str) -> None:
    """Test-only, off unless PINRPC_TEST_PAUSE_AT names ``point``: say so on stderr and sleep,
    so that a test can SIGKILL the process exactly there (tests/test_rotate_crash.py)."""
    if os.environ.get(PAUSE) == point:
        print(f"paused at {point}", file=sys.stderr, flush=True)
        time.sleep(60)


def old(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def new(path: Path) -> Path:
    return path.with_name(path.name + ".new")


def _until_file(cert: Path) -> Path:
    return cert.with_name(cert.name + ".old-until")


journal = swap_journal  # NAME.crt.swap; the library refuses a pair while it exists


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except FileNotFoundError:
        return False
    except OSError as exc:  # a name too long, a parent that is a file: no pair of ours there
        raise IdentityError(f"cannot use {path}: {exc.strerror}") from exc


@contextlib.contextmanager
def _directory_locked(cert: Path) -> Iterator[None]:
    """The pair's directory, locked while its files change: held for milliseconds, so waited
    for (the rotate-wide lock is ``rotating``)."""
    fd = os.open(cert.absolute().parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def recover(cert: Path, key: Path, *, tidy: bool = False) -> str | None:
    """Finish or undo what a killed rotate or keygen left; one line saying what, or None.

    Cheap when there is nothing to do (three lstat calls): every pinrpc call runs it. ``tidy``
    also removes the temporary files a kill can leave (a copy of a private key among them)."""
    marks = (journal(cert), new(key), new(_until_file(cert)))
    if not (tidy or any(os.path.lexists(path) for path in marks)):
        return None
    try:
        with _directory_locked(cert):
            return _recover(cert, key, tidy=tidy)
    except OSError as exc:
        raise IdentityError(
            f"cannot check for (or finish) an interrupted rotate or keygen of {cert} and "
            f"{key}: {exc}; {journal(cert)}, if present, says what was under way"
        ) from exc


def _recover(cert: Path, key: Path, *, tidy: bool) -> str | None:
    if tidy:
        _remove_leftovers(cert, key)
    if _is_file(new(_until_file(cert))) and not os.path.lexists(journal(cert)):
        # What older pinrpc wrote before its renames, once the server had said yes: a journal.
        os.rename(new(_until_file(cert)), journal(cert))
    staged = [path for path in (new(key), new(cert)) if os.path.lexists(path)]
    lone_key = staged == [new(key)]  # staging writes the key first; the call sends the cert
    if not _is_file(journal(cert)):
        if not lone_key:
            return None  # no journal: the current pair was never touched
        new(key).unlink()
        sync_directories([key])
        return f"removed {new(key)}: a rotate or keygen stopped before its new pair was whole"
    intent = journal(cert).read_text().strip()
    if intent == KEYGEN and lone_key:  # killed while staging: the old pair, if any, stays
        new(key).unlink()
        journal(cert).unlink()
        sync_directories([key, cert])
        return f"removed {new(key)}: an interrupted keygen; the pair in place is unchanged"
    for path in staged:
        if not _is_file(path):
            raise IsADirectoryError(f"{path} is not a regular file; move it away")
    _roll_forward(cert, key, intent)
    done = "keygen" if intent == KEYGEN else "rotation (the server had enrolled the new pair)"
    return f"finished an interrupted {done}: the new pair is in place as {cert} and {key}"


def _roll_forward(cert: Path, key: Path, intent: str) -> None:
    """Each step is one rename that the next recovery sees as done: the journal goes last."""
    for path in (key, cert):
        if os.path.lexists(new(path)):
            if intent != KEYGEN and os.path.lexists(path):
                os.replace(path, old(path))
            os.replace(new(path), path)
    sync_directories([key, cert])
    if intent == KEYGEN:
        journal(cert).unlink()
    else:
        os.replace(journal(cert), _until_file(cert))
    sync_directories([cert])


def _remove_leftovers(cert: Path, key: Path) -> None:
    """Temporary files of write_all/move_all (pinrpc/identity.py) that a kill left behind."""
    temps = (new(key), new(cert), journal(cert))
    backups = (key, cert, old(key), old(cert), _until_file(cert))
    for name, suffix in [(p.name, "tmp") for p in temps] + [(p.name, "bak") for p in backups]:
        for leftover in cert.absolute().parent.glob(f".{glob.escape(name)}.*.{suffix}"):
            leftover.unlink(missing_ok=True)


def make_pair(
    name: str,
    directory: Path,
    *,
    key_type: str = "p256",
    days: int = DEFAULT_DAYS,
    force: bool = False,
    passphrase: bytes | None = None,
    tell: Callable[[str], None],
) -> KeyPairFiles:
    """``pinrpc keygen``: create_identity's pair, placed through the journal so that a kill
    never leaves a key without its certificate or a mismatched pair; ``tell`` hears what
    ``recover`` did first."""
    check_name(name)
    directory = directory.absolute()
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    # What a killed keygen or rotate left is settled first: the checks below see its outcome.
    try:
        found = directory.is_dir()
    except OSError as exc:  # a name too long: is_dir() says False only for the usual misses
        raise IdentityError(f"cannot use the directory {directory}: {exc.strerror}") from exc
    if found and (note := recover(cert, key, tidy=True)):
        tell(note)
    if not force:  # early, before a slow RSA key; checked again under the lock
        for existing in (p for p in (key, cert) if os.path.lexists(p)):
            raise exists_error(existing)
    private = generate_key(key_type)
    certificate = self_signed_certificate(private, name, days=days)
    make_directory(directory)
    try:
        with _directory_locked(cert):
            if note := _recover(cert, key, tidy=True):
                tell(note)
            if not force:
                for existing in (p for p in (key, cert) if os.path.lexists(p)):
                    raise exists_error(existing)
            if any(os.path.lexists(p) for p in (new(cert), new(key))):
                raise unfinished_error(cert, key)
            for path in (key, cert):  # refused before anything is written, as write_all does
                if path.is_dir():
                    raise IdentityError(f"{path} is a directory; move it away")
            write_all([(journal(cert), KEYGEN.encode(), 0o644)], overwrite=False)
            try:
                pem = key_to_pem(private, passphrase)
                files = [(new(key), pem, 0o600), (new(cert), cert_to_pem(certificate), 0o644)]
                write_all(files, overwrite=False)
                pause("keygen")
                _roll_forward(cert, key, KEYGEN)
            except OSError:
                with contextlib.suppress(OSError):  # undo (or finish) what the journal says
                    _recover(cert, key, tidy=True)
                raise
    except OSError as exc:
        raise IdentityError(f"cannot write the key pair in {directory}: {exc}") from exc
    return KeyPairFiles(key, cert, Fingerprint.of(certificate))


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
        with _directory_locked(cert):
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
def rotating(cert: Path, *, refuse_busy: bool = True) -> Iterator[bool]:
    """One rotate of a pair at a time: a second one took the first one's staged *.new pair
    for an unfinished rotation and told the user to move it by hand while the first ran.
    Held on the current certificate's inode, which the swap moves to *.old: a rotate that
    opens the certificate after that rotates the new pair, as it would a moment later.
    Yields True once held; False (with ``refuse_busy=False``) while another process holds it."""
    try:
        fd = os.open(cert, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise IdentityError(f"cannot read certificate {cert.absolute()}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not refuse_busy:
                yield False
                return
            raise IdentityError(
                f"another `pinrpc rotate` of {cert} is running; let it finish, then check "
                f"which pair is in place with `pinrpc whoami` (same connection flags)"
            ) from None
        yield True
    finally:
        os.close(fd)


def check_targets(cert: Path, key: Path) -> None:
    """Before asking the server: refuse what would make the swap fail after it said yes."""
    for path in (new(cert), new(key)):
        if os.path.lexists(path):
            raise unfinished_error(cert, key)
    _check_obstacles(cert, key)


def _check_obstacles(cert: Path, key: Path) -> None:
    for path in (old(key), old(cert), _until_file(cert), new(_until_file(cert)), journal(cert)):
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


UNKNOWN_END = "unknown"  # a marker no date parses from: the next rotate replaces that *.old


def swap_in(
    cert: Path, key: Path, new_cert: Path, new_key: Path, until: dt.datetime | None
) -> None:
    """Move the current pair to *.old and the staged pair into place: all or nothing while
    this process lives (a failure puts everything back), and rolled forward by ``recover``
    from the journal if it is killed. The old pair's end is ``until``, None if unknown."""
    journaled = swapped = False
    end = until.isoformat() if until else UNKNOWN_END
    try:
        with _directory_locked(cert):
            write_all([(journal(cert), end.encode(), 0o644)], overwrite=False)
            journaled = True
            pause("swap")
            moves = [(key, old(key)), (new_key, key), (cert, old(cert)), (new_cert, cert)]
            move_all(moves, overwrite=True)
            swapped = True
            move_all([(journal(cert), _until_file(cert))], overwrite=True)
    except OSError as exc:
        if journaled and not swapped:  # the pair is back: nothing may roll it forward
            with contextlib.suppress(OSError):  # the error below matters, not this cleanup's
                journal(cert).unlink(missing_ok=True)
        raise IdentityError(f"cannot swap the key pair {cert}, {key}: {exc}") from exc


def unsettled(cert: Path, key: Path) -> bool:
    """Both staged files and no journal: a rotation whose outcome only the server knows."""
    marks = (journal(cert), new(_until_file(cert)))
    return _is_file(new(cert)) and _is_file(new(key)) and not any(map(os.path.lexists, marks))


def _still_staged(cert: Path, key: Path, staged: Fingerprint) -> None:
    """Under the lock: the pair the server was asked about is still the one staged."""
    if not unsettled(cert, key) or Fingerprint.of(load_certificate(new(cert))) != staged:
        raise IdentityError(
            f"{new(cert)} changed while the server was asked about it (another pinrpc call "
            f"settled it?); nothing changed here: run the command again"
        )


def settle_forward(cert: Path, key: Path, staged: Fingerprint, until: dt.datetime | None) -> None:
    """The server admits the staged pair as this client: swap it in through the journal, as
    a rotate that heard the yes does; the old pair's end is ``until``, None if unknown."""
    try:
        with _directory_locked(cert):
            _still_staged(cert, key, staged)
            _check_obstacles(cert, key)
            end = until.isoformat() if until else UNKNOWN_END
            write_all([(journal(cert), end.encode(), 0o644)], overwrite=False)
            _roll_forward(cert, key, end)
    except OSError as exc:  # a journal written stays: the next call rolls it forward
        raise IdentityError(f"cannot swap in {new(cert)} and {new(key)}: {exc}") from exc


def drop_staged(cert: Path, key: Path, staged: Fingerprint) -> None:
    """The server refused the staged pair and admits the current one: the rotation never
    happened. The certificate goes first: a lone NAME.key.new is known junk to ``recover``."""
    try:
        with _directory_locked(cert):
            _still_staged(cert, key, staged)
            new(cert).unlink()
            new(key).unlink()
            sync_directories([cert, key])
    except OSError as exc:
        raise IdentityError(f"cannot remove {new(cert)} and {new(key)}: {exc}") from exc


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
