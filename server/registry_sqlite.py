"""The SQLite backend (the default): one file in WAL mode, shared by the server and the CLI.

A long-running server holds its connection open, so it must notice when the file is deleted
or replaced underneath it (the connection would keep reading the old inode): every operation
compares the path's inode with the one it opened, and reopens the new file once it holds a
complete registry. WAL readers are never blocked by a writer; writers wait ``busy_timeout``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from pinrpc.errors import RegistryError
from server.registry_schema import (
    LATEST,
    Dialect,
    ForeignDatabase,
    Query,
    Row,
    apply_migrations,
    schema_version,
)
from server.registry_sql import BUMP_GENERATION, SqlRegistry, T

log = logging.getLogger("pinrpc.registry")


def _utc(when: dt.datetime) -> dt.datetime:
    """pinrpc writes an offset; SQLite's own datetime('now'), in an operator's hand edit, is
    UTC without one. Left naive, it failed every comparison: a traceback from `list`, and the
    trust watcher's thread ended, later revocations with it."""
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


SQLITE = Dialect(
    name="sqlite",
    types={"id": "INTEGER PRIMARY KEY", "int": "INTEGER", "ts": "TEXT"},
    placeholder="?",
    tables="SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite~_%' "
    "ESCAPE '~'",
    columns="SELECT name FROM pragma_table_info(?)",
    change_lock=None,  # BEGIN IMMEDIATE already holds the write lock
    migration_lock=None,
    bump_generation=BUMP_GENERATION.format(
        max="MAX", now_us="CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER)"
    ),
    encode_time=lambda t: t.isoformat(),
    decode_time=lambda text: _utc(dt.datetime.fromisoformat(text)),
)


def _query(db: sqlite3.Connection) -> Query:
    def q(statement: str, params: Sequence[object]) -> list[Row]:
        return db.execute(statement, params).fetchall()

    return q


# The registry names the whole fleet (permissions, revocations, requesters' hosts): owner only.
# SQLite gives its -wal, -shm and -journal files the database file's mode.
MODE = 0o600
# Whoever may write the file, or a -wal file SQLite would replay into it, admits any
# certificate: refused, as a private key others may read is (a group may still read it).
COMPANIONS = ("", "-wal", "-shm")


def _create_private(path: str) -> None:
    """Create a new registry file 0600 before SQLite would, 0644 less the umask."""
    # Failing: it exists (kept as it is), or SQLite's own open says why it cannot be made.
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, MODE))


def _refuse_writable_by_others(path: Path) -> None:
    target = os.path.realpath(path)  # SQLite follows a symlink: its -wal is beside the target
    wide = {}
    for name in (target + end for end in COMPANIONS):
        try:
            mode = os.stat(name).st_mode
        except OSError:
            continue  # missing; or SQLite's own open says why it cannot be read
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            wide[name] = stat.S_IMODE(mode)
    if wide:
        modes = ", ".join(f"{name} {mode:04o}" for name, mode in wide.items())
        raise RegistryError(
            f"registry {path.absolute()} may be written by other users ({modes}), who could "
            f"admit any certificate; run: chmod go-w {' '.join(wide)}"
        )


# Below this much free space SQLite's I/O errors are most likely the full disk: the -shm file
# alone takes 32 KiB, and opening the registry, even to read it, creates it.
LOW_SPACE = 1 << 20


def _explain(exc: sqlite3.Error, busy_timeout: float, path: Path) -> str:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return f"{text} (another process is writing to it; gave up after {busy_timeout:g} s)"
    if "readonly" in text:
        return f"{text} (the file, its -wal/-shm files or its directory are not writable)"
    if exc.sqlite_errorname.startswith(("SQLITE_FULL", "SQLITE_IOERR")):
        try:
            space = os.statvfs(path.parent)
        except OSError:
            return text
        free = space.f_bavail * space.f_frsize
        if free < LOW_SPACE:
            return f"{text} (its file system is full: {free // 1024} KiB free; free some space)"
    return text


class SqliteRegistry(SqlRegistry):
    dialect = SQLITE

    def __init__(
        self,
        path: Path,
        *,
        create: bool = True,
        migrate: bool = False,
        readonly: bool = False,
        busy_timeout: float = 5.0,
        lay_out_late: bool = False,
    ) -> None:
        """``lay_out_late``: as PostgresRegistry's, for an existing empty file, so that the
        first change failing leaves it as empty as it was (0 bytes)."""
        self.path = path.absolute()
        super().__init__(str(self.path))
        self._check_directory()
        if not create and not self.path.exists():
            raise RegistryError(
                f"registry {self.path} does not exist; enroll a client first or check --registry"
            )
        self._busy_timeout = busy_timeout
        self._readonly = readonly
        self._lock = threading.Lock()
        self._lay_out = False
        self._db, self._inode = self._connect(create)
        try:
            if lay_out_late and create and not self._read(lambda q: q(SQLITE.tables, ())):
                self._lay_out = True  # WAL waits too: it would write the empty file's header
            else:
                self._open_schema(create=create, migrate=migrate)
                # Only now that it is known to be pinrpc's: WAL rewrites the file's header.
                self._use_wal(self._db)
        except BaseException:
            self._db.close()
            raise

    def _check_directory(self) -> None:
        """SQLite says only "unable to open database file" when the directory is missing."""
        parent = self.path.parent
        try:
            is_dir = stat.S_ISDIR(os.stat(parent).st_mode)
        except FileNotFoundError:
            raise RegistryError(f"directory {parent} does not exist; check --registry") from None
        except OSError:
            return  # SQLite's own error says why (a permission, a file as a parent's parent)
        if not is_dir:
            raise RegistryError(f"{parent} is not a directory; check --registry")

    def _connect(self, create: bool) -> tuple[sqlite3.Connection, int]:
        mode = "ro" if self._readonly else "rwc" if create else "rw"
        if mode == "rwc":
            _create_private(os.path.realpath(self.path))  # SQLite follows a symlink too
        _refuse_writable_by_others(self.path)  # before opening replays a -wal file into it
        uri = f"{self.path.as_uri()}?mode={mode}"
        wal = self.path.with_name(self.path.name + "-wal")
        if self._readonly and not wal.exists() and not os.access(self.path.parent, os.W_OK):
            # A WAL reader needs a -shm file it cannot create here. Without a -wal file every
            # commit is in the main file, and no writer can add one to this directory either.
            uri += "&immutable=1"
        try:
            db = sqlite3.connect(
                uri,
                uri=True,
                timeout=self._busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open registry {self.path}: {exc}") from exc
        try:
            return db, os.stat(self.path).st_ino
        except OSError as exc:
            db.close()
            raise RegistryError(f"cannot open registry {self.path}: {exc}") from exc

    def _use_wal(self, db: sqlite3.Connection) -> None:
        if self._readonly:
            return
        try:
            db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open registry {self.path}: {exc}") from exc

    def _current(self) -> sqlite3.Connection:
        """The connection to the file now at ``path``; reopens if the file was replaced."""
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError as exc:
            raise RegistryError(f"registry {self.path} is gone (deleted or moved)") from exc
        except OSError as exc:
            raise RegistryError(f"cannot stat registry {self.path}: {exc}") from exc
        if inode == self._inode:
            return self._db
        db, inode = self._connect(create=False)
        try:
            version = schema_version(_query(db), SQLITE)
        except sqlite3.Error as exc:
            db.close()
            raise RegistryError(f"replaced registry {self.path} is unreadable: {exc}") from exc
        except ForeignDatabase as exc:
            db.close()
            raise RegistryError(
                f"replaced registry {self.path} is not a pinrpc registry (tables {exc})"
            ) from None
        if version != LATEST:
            db.close()
            raise RegistryError(
                f"replaced registry {self.path} has schema version {version}, need {LATEST}"
            )
        try:
            self._use_wal(db)
        except RegistryError:
            db.close()
            raise
        self._db.close()
        self._db, self._inode = db, inode
        log.warning("registry %s was replaced on disk; reopened it", self.path)
        return db

    def _read(self, body: Callable[[Query], T]) -> T:
        with self._lock:
            db = self._current()
            try:
                return body(_query(db))
            except sqlite3.Error as exc:
                why = _explain(exc, self._busy_timeout, self.path)
                raise RegistryError(f"cannot read registry {self.path}: {why}") from exc

    def _transaction(self, body: Callable[[Query], T]) -> T:
        with self._lock:
            db = self._current()
            try:
                db.execute("BEGIN IMMEDIATE")  # the write lock before any read
                try:
                    if self._lay_out:
                        self.applied = apply_migrations(_query(db), SQLITE)
                    result = body(_query(db))
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                why = _explain(exc, self._busy_timeout, self.path)
                raise RegistryError(f"cannot change registry {self.path}: {why}") from exc
            if self._lay_out:
                self._lay_out = False
                self._use_wal(db)  # only outside a transaction
            return result

    def close(self) -> None:
        with self._lock:
            self._db.close()
