"""Enrolled clients: one interface, and its SQLite implementation (the default).

Nothing is ever deleted: revoking sets ``revoked_at`` and keeps the row, so history stays and
a revoked certificate can never be enrolled again. Every change bumps a generation counter in
the same transaction; the server polls that one integer to know when to reload.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pinrpc.errors import ConflictError, NotFoundError, RegistryError
from pinrpc.identity import Fingerprint
from server.enrollment import REKEY_HINT, Candidate


@dataclass(frozen=True, slots=True)
class Client:
    name: str
    fingerprint: Fingerprint
    cert_pem: str
    spki_sha256: str
    subject: str
    has_key_ids: bool
    allowed_methods: tuple[str, ...]
    enrolled_at: dt.datetime
    not_after: dt.datetime
    revoked_at: dt.datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "fingerprint": str(self.fingerprint),
            "spki_sha256": self.spki_sha256,
            "subject": self.subject,
            "allowed_methods": list(self.allowed_methods),
            "enrolled_at": self.enrolled_at.isoformat(),
            "not_after": self.not_after.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


class Registry(Protocol):
    """What the server and the admin CLI need from a registry backend."""

    def enroll(
        self, candidate: Candidate, name: str, allowed: Sequence[str], *, replace: bool = False
    ) -> Client: ...

    def revoke(self, ref: str) -> Client: ...

    def clients(self) -> list[Client]: ...

    def generation(self) -> int:
        """A number that changes whenever the enrolled set changes; cheap to poll."""
        ...

    def close(self) -> None: ...


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def subject_clash(candidate: Candidate, active: Sequence[Client]) -> Client | None:
    """grpcio verifies only one of several trust anchors that share a subject and lack key ids."""
    for client in active:
        same = client.subject == candidate.subject
        if same and not (candidate.has_key_ids and client.has_key_ids):
            return client
    return None


def check_enrollment(
    candidate: Candidate, name: str, rows: Sequence[Client], replace: bool
) -> Client | None:
    """Apply the registry-level rules; return the client that ``replace`` retires, if any."""
    for row in rows:
        if row.fingerprint != candidate.fingerprint:
            continue
        if row.revoked_at is not None:
            raise ConflictError(
                f"certificate {candidate.fingerprint} was revoked on "
                f"{row.revoked_at:%Y-%m-%d %H:%M} UTC (as {row.name!r}) and cannot be enrolled "
                f"again; {REKEY_HINT}"
            )
        raise ConflictError(
            f"certificate {candidate.fingerprint} is already enrolled as {row.name!r}"
        )
    active = [row for row in rows if row.active]
    retired = next((row for row in active if row.name == name), None)
    if retired is not None and not replace:
        raise ConflictError(
            f"a client named {name!r} is already enrolled ({retired.fingerprint}); "
            "pass --replace to re-key it (the old certificate is revoked)"
        )
    clash = subject_clash(candidate, [row for row in active if row is not retired])
    if clash is not None:
        raise ConflictError(
            f"certificate subject {candidate.subject!r} equals that of enrolled client "
            f"{clash.name!r} and one of them lacks subject/authority key identifiers, so the "
            f"TLS stack could not tell them apart; {REKEY_HINT}"
        )
    return retired


SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    id              INTEGER PRIMARY KEY,
    name            TEXT NOT NULL,
    fingerprint     TEXT NOT NULL UNIQUE,
    cert_pem        TEXT NOT NULL,
    spki_sha256     TEXT NOT NULL,
    subject         TEXT NOT NULL,
    has_key_ids     INTEGER NOT NULL,
    allowed_methods TEXT NOT NULL,
    enrolled_at     TEXT NOT NULL,
    not_after       TEXT NOT NULL,
    revoked_at      TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS clients_active_name ON clients(name) WHERE revoked_at IS NULL;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('generation', 0);
"""

COLUMNS = (
    "name, fingerprint, cert_pem, spki_sha256, subject, has_key_ids, allowed_methods, "
    "enrolled_at, not_after, revoked_at"
)


def _row_to_client(row: tuple[str, str, str, str, str, int, str, str, str, str | None]) -> Client:
    name, fp, pem, spki, subject, ids, allowed, enrolled, not_after, revoked = row
    return Client(
        name=name,
        fingerprint=Fingerprint(bytes.fromhex(fp)),
        cert_pem=pem,
        spki_sha256=spki,
        subject=subject,
        has_key_ids=bool(ids),
        allowed_methods=tuple(json.loads(allowed)),
        enrolled_at=dt.datetime.fromisoformat(enrolled),
        not_after=dt.datetime.fromisoformat(not_after),
        revoked_at=dt.datetime.fromisoformat(revoked) if revoked else None,
    )


class SqliteRegistry:
    """A registry in one SQLite file (WAL), shared safely by the server and the admin CLI."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = path.absolute()
        if not create and not self.path.exists():
            raise RegistryError(
                f"registry {self.path} does not exist; enroll a client first or check --registry"
            )
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.path, timeout=5.0, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open registry {self.path}: {exc}") from exc

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: BEGIN IMMEDIATE takes the write lock before any read."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("UPDATE meta SET value = value + 1 WHERE key='generation'")
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise RegistryError(f"cannot change registry {self.path}: {exc}") from exc

    def _all(self, db: sqlite3.Connection) -> list[Client]:
        rows = db.execute(f"SELECT {COLUMNS} FROM clients ORDER BY id").fetchall()  # noqa: S608
        return [_row_to_client(row) for row in rows]

    def enroll(
        self, candidate: Candidate, name: str, allowed: Sequence[str], *, replace: bool = False
    ) -> Client:
        now = now_utc()
        with self._transaction() as db:
            retired = check_enrollment(candidate, name, self._all(db), replace)
            if retired is not None:
                db.execute(
                    "UPDATE clients SET revoked_at=? WHERE fingerprint=?",
                    (now.isoformat(), retired.fingerprint.hex),
                )
            db.execute(
                f"INSERT INTO clients ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,NULL)",  # noqa: S608
                (
                    name,
                    candidate.fingerprint.hex,
                    candidate.pem,
                    candidate.spki_sha256,
                    candidate.subject,
                    int(candidate.has_key_ids),
                    json.dumps(list(allowed)),
                    now.isoformat(),
                    candidate.not_after.isoformat(),
                ),
            )
        return self.find(candidate.fingerprint.hex)

    def find(self, ref: str) -> Client:
        """The client with this fingerprint (any form), else the active client with this name."""
        clients = self.clients()
        if Fingerprint.looks_like(ref):
            fp = Fingerprint.parse(ref)
            for client in clients:
                if client.fingerprint == fp:
                    return client
        for client in clients:
            if client.name == ref and client.active:
                return client
        raise NotFoundError(
            f"no enrolled client named or with fingerprint {ref!r} in {self.path}; "
            "see `pinrpc-server list`"
        )

    def revoke(self, ref: str) -> Client:
        client = self.find(ref)
        if not client.active:
            raise ConflictError(
                f"client {client.name!r} ({client.fingerprint}) was already revoked on "
                f"{client.revoked_at:%Y-%m-%d %H:%M} UTC"
            )
        with self._transaction() as db:
            db.execute(
                "UPDATE clients SET revoked_at=? WHERE fingerprint=? AND revoked_at IS NULL",
                (now_utc().isoformat(), client.fingerprint.hex),
            )
        return self.find(client.fingerprint.hex)

    def clients(self) -> list[Client]:
        with self._lock:
            try:
                return self._all(self._db)
            except sqlite3.Error as exc:
                raise RegistryError(f"cannot read registry {self.path}: {exc}") from exc

    def generation(self) -> int:
        with self._lock:
            try:
                row = self._db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
            except sqlite3.Error as exc:
                raise RegistryError(f"cannot read registry {self.path}: {exc}") from exc
        if row is None:
            raise RegistryError(f"registry {self.path} has no generation counter")
        return int(row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_registry(spec: str, *, create: bool = True) -> Registry:
    """Open the registry named by ``spec``: a SQLite file path (PostgreSQL URLs come later)."""
    if spec.startswith(("postgres://", "postgresql://")):
        raise RegistryError("PostgreSQL registries are not supported yet; use a SQLite file path")
    return SqliteRegistry(Path(spec), create=create)
