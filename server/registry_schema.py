"""The SQL registry's schema and its forward migrations, shared by the SQLite and PostgreSQL
backends.

One schema, written once with a few type placeholders (``Dialect`` fills them per backend);
forward migrations recorded in a ``schema_version`` table; and the check that a database is a
pinrpc registry at all. Separate from registry_sql so the schema's history reads on its own,
apart from the transactions that use it.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server.registry_model import now_utc

Row = tuple[Any, ...]
Query = Callable[[str, Sequence[object]], list[Row]]
"""Run one statement (``?`` placeholders) and return its rows ([] for statements without)."""


@dataclass(frozen=True, slots=True)
class Dialect:
    """Everything that differs between the SQL the two backends speak."""

    name: str
    types: Mapping[str, str]  # fills {id}, {int}, {ts} in the schema
    placeholder: str
    tables: str  # no parameters; the names of the tables a new registry would share space with
    columns: str  # one parameter, a table's name; the names of its columns
    change_lock: str | None  # first statement of every change: serializes writers
    migration_lock: str | None  # first statement of a migration
    bump_generation: str  # the last statement of every change
    encode_time: Callable[[dt.datetime], object]
    decode_time: Callable[[Any], dt.datetime]

    def sql(self, statement: str) -> str:
        return statement.replace("?", self.placeholder)

    def ddl(self, statement: str) -> str:
        return statement.format(**self.types, registry_id=secrets.randbits(62))


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version ("
    "version {int} PRIMARY KEY, description TEXT NOT NULL, applied_at {ts} NOT NULL)"
)

MIGRATIONS: tuple[Migration, ...] = (
    # Version 1 is the schema of the first release (IF NOT EXISTS adopts its files as they are).
    Migration(
        1,
        "clients and the generation counter",
        (
            """CREATE TABLE IF NOT EXISTS clients (
                id              {id},
                name            TEXT NOT NULL,
                fingerprint     TEXT NOT NULL UNIQUE,
                cert_pem        TEXT NOT NULL,
                spki_sha256     TEXT NOT NULL,
                subject         TEXT NOT NULL,
                has_key_ids     {int} NOT NULL,
                allowed_methods TEXT NOT NULL,
                enrolled_at     {ts} NOT NULL,
                not_after       {ts} NOT NULL,
                revoked_at      {ts}
            )""",
            "CREATE UNIQUE INDEX IF NOT EXISTS clients_active_name ON clients(name) "
            "WHERE revoked_at IS NULL",
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value {int} NOT NULL)",
            "INSERT INTO meta (key, value) VALUES ('generation', 0) ON CONFLICT (key) DO NOTHING",
        ),
    ),
    # A random identity, so a server notices when its registry is swapped for another one.
    Migration(
        2,
        "registry identity",
        (
            "INSERT INTO meta (key, value) VALUES ('registry_id', {registry_id}) "
            "ON CONFLICT (key) DO NOTHING",
        ),
    ),
    # Key rotation with an overlap: the old certificate stays valid until retire_at, so during
    # the overlap a name has two usable certificates and only one "current" one.
    Migration(
        3,
        "rotation overlap (retire_at)",
        (
            "ALTER TABLE clients ADD COLUMN retire_at {ts}",
            "DROP INDEX IF EXISTS clients_active_name",
            "CREATE UNIQUE INDEX IF NOT EXISTS clients_current_name ON clients(name) "
            "WHERE revoked_at IS NULL AND retire_at IS NULL",
        ),
    ),
    # Enrollment requests waiting for an operator; never part of the trusted set.
    Migration(
        4,
        "pending enrollment requests",
        (
            """CREATE TABLE IF NOT EXISTS pending (
                fingerprint  TEXT PRIMARY KEY,
                name         TEXT NOT NULL,
                cert_pem     TEXT NOT NULL,
                peer         TEXT NOT NULL,
                requested_at {ts} NOT NULL,
                expires_at   {ts} NOT NULL
            )""",
        ),
    ),
    # Lookups by name or fingerprint (find, revoke, permit) are "fingerprint = ? OR name = ?":
    # without an index on every name (clients_current_name covers current ones only) both
    # backends scanned the table: 2 ms on SQLite, 0.7 ms on PostgreSQL at 10,000 clients, and
    # 0.02 and 0.06 ms with it (bench/registry_lookup.py).
    Migration(
        5,
        "index on client names",
        ("CREATE INDEX IF NOT EXISTS clients_name ON clients(name)",),
    ),
)
LATEST = MIGRATIONS[-1].version

COLUMNS = (
    "name, fingerprint, cert_pem, spki_sha256, subject, has_key_ids, allowed_methods, "
    "enrolled_at, not_after, revoked_at, retire_at"
)

# What the first release's clients table held: a database whose tables lack any of these is
# another application's, whatever it calls its tables (clients, schema_version, meta are common).
V1_COLUMNS = frozenset(COLUMNS.replace(",", " ").split()) - {"retire_at"}


class ForeignDatabase(Exception):
    """The database holds tables, and they are not a pinrpc registry's."""

    def __init__(self, tables: Sequence[str]) -> None:
        super().__init__(", ".join(sorted(tables)[:5]))


def schema_version(q: Query, dialect: Dialect) -> int | None:
    """The recorded schema version (0: the first release's, unversioned), None for a database
    without tables; ForeignDatabase for one whose tables are another application's."""
    tables = {row[0] for row in q(dialect.tables, ())}
    if not tables:
        return None
    columns = {row[0] for row in q(dialect.columns, ("clients",))}
    if not columns >= V1_COLUMNS or "meta" not in tables:
        raise ForeignDatabase(sorted(tables))
    if "schema_version" not in tables:
        return 0
    value = q("SELECT MAX(version) FROM schema_version", ())[0][0]
    try:
        return int(value or 0)
    except ValueError:  # a text version ("1.2"): another tool's table of that name
        raise ForeignDatabase(sorted(tables)) from None


def apply_migrations(q: Query, dialect: Dialect) -> list[Migration]:
    """Bring the schema to LATEST inside the caller's transaction; return what was applied."""
    if dialect.migration_lock:
        q(dialect.migration_lock, ())
    current = schema_version(q, dialect) or 0  # before adding a table of our own
    q(dialect.ddl(VERSION_TABLE), ())
    applied = [m for m in MIGRATIONS if m.version > current]
    for migration in applied:
        for statement in migration.statements:
            q(dialect.ddl(statement), ())
        q(
            "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
            (migration.version, migration.description, dialect.encode_time(now_utc())),
        )
    return applied
