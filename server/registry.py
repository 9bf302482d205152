"""Enrolled clients: one interface, two backends (SQLite by default, PostgreSQL for replicas).

Nothing is ever deleted: revoking sets ``revoked_at`` and keeps the row, so history stays and
a revoked certificate can never be enrolled again. Every change bumps a generation counter in
the same transaction; the server polls that one integer to know when to reload. The schema is
versioned; ``migrate_registry`` (``pinrpc-server migrate``) applies forward migrations.

Modules: registry_model (Client, the Registry protocol, the enrollment rules), registry_schema
(schema and migrations) and registry_sql (transactions), both shared by the two backends,
registry_sqlite, registry_pg.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pinrpc.errors import RegistryError
from server.registry_model import (
    ChangeNotifier,
    Client,
    Pending,
    Registry,
    check_enrollment,
    now_utc,
    subject_clash,
)
from server.registry_schema import LATEST, Migration
from server.registry_sql import SqlRegistry
from server.registry_sqlite import SqliteRegistry

if TYPE_CHECKING:
    from server.registry_pg import PostgresRegistry

__all__ = [
    "LATEST",
    "ChangeNotifier",
    "Client",
    "MigrationResult",
    "Pending",
    "Registry",
    "SqliteRegistry",
    "check_enrollment",
    "is_postgres",
    "migrate_registry",
    "now_utc",
    "open_registry",
    "subject_clash",
]


def is_postgres(spec: str) -> bool:
    return spec.startswith(("postgres://", "postgresql://"))


def postgres_backend() -> type[PostgresRegistry]:
    """Imported when asked for: psycopg is needed only by those who use PostgreSQL."""
    try:
        from server.registry_pg import PostgresRegistry
    except ImportError as exc:
        raise RegistryError(
            f"a postgresql:// registry needs psycopg ({exc}): pip install 'pinrpc[postgres]'"
        ) from exc
    return PostgresRegistry


def _open(spec: str, *, create: bool, migrate: bool, readonly: bool = False) -> SqlRegistry:
    if is_postgres(spec):
        return postgres_backend()(spec, create=create, migrate=migrate)
    return SqliteRegistry(Path(spec), create=create, migrate=migrate, readonly=readonly)


def open_registry(spec: str, *, create: bool = True, readonly: bool = False) -> Registry:
    """Open ``spec``: a SQLite file path or a postgresql:// URL (libpq syntax).

    ``create`` lays out the schema in a new, empty registry; an existing registry with an older
    schema is refused with a pointer to ``pinrpc-server migrate``. ``readonly`` (SQLite) opens
    the file read-only, so that reading commands work without write access and never write.
    """
    return _open(spec, create=create and not readonly, migrate=False, readonly=readonly)


@dataclass(frozen=True, slots=True)
class MigrationResult:
    where: str
    version: int
    applied: tuple[Migration, ...]


def migrate_registry(spec: str) -> MigrationResult:
    """Bring the registry's schema to the latest version (creating it if empty)."""
    registry = _open(spec, create=True, migrate=True)
    try:
        return MigrationResult(registry.where, LATEST, tuple(registry.applied))
    finally:
        registry.close()
