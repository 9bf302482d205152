"""Copy a registry to another one, SQLite or PostgreSQL either way: `pinrpc-server copy-registry`.

SOURCE is opened as the reading commands open it (read-only where the backend allows) and read
in one snapshot. DEST gets every row of every table in one change transaction (an empty
database its schema too), so a copy that fails or is interrupted leaves DEST as it was, and
DEST must hold no clients and no requests: nothing is ever merged or overwritten. Two tables
describe the database rather than what it holds and stay DEST's own: ``schema_version`` (its
schema's history) and ``meta`` (its identity and generation). The generation moves past both
sides' numbers, so a server watching DEST reloads and no server sees it go back; the change
announces itself like any other.
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
from collections.abc import Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from pinrpc.errors import ConflictError, RegistryError
from server.registry import _open, is_postgres, postgres_backend
from server.registry_model import Client, Pending
from server.registry_schema import MIGRATIONS, VERSION_TABLE, Dialect, Query, Row
from server.registry_sql import GENERATION_QUERY, SqlRegistry
from server.registry_sqlite import SqliteRegistry

KEPT = frozenset({"meta", "schema_version"})
# Renumbered on DEST, in SOURCE's order (the only order anything relies on): nothing refers to
# it, and PostgreSQL's identity sequence does not follow ids inserted explicitly, so the next
# enrollment on a PostgreSQL copy would collide with a copied row.
SURROGATE = "id"
# The columns the schema declares as timestamps: each backend stores them its own way.
TIMES = frozenset(
    re.findall(
        r"(\w+)\s+\{ts\}", " ".join([VERSION_TABLE, *(s for m in MIGRATIONS for s in m.statements)])
    )
)
# One snapshot of SOURCE, so that its tables agree; PostgreSQL's refuses writes too.
SNAPSHOT = {"sqlite": "BEGIN", "postgresql": "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"}
# Rows per INSERT: a round trip per row would take 10 s for 10,000 clients on a 1 ms link, past
# the 7 s a PostgreSQL change may take (registry_pg.ANSWER_LIMIT). On 127.0.0.1 either way
# copies 10,000 clients in under 1 s.
BATCH = 100


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    columns: tuple[str, ...]
    rows: list[Row]


@dataclass(frozen=True, slots=True)
class CopyResult:
    source: str
    dest: str
    clients: list[Client]
    waiting: list[Pending]
    requests: int  # rows copied, expired ones included (the next request on DEST drops them)


def copy_registry(source_spec: str, dest_spec: str) -> CopyResult:
    """Copy SOURCE into DEST, a new or empty registry; RegistryError leaves DEST as it was."""
    # SOURCE first: a SOURCE refused (old schema, not a registry, in use) creates no DEST.
    if not is_postgres(source_spec):
        refuse_open_source(Path(source_spec))
    with closing(_opened("SOURCE", source_spec, create=False, readonly=True)) as source:
        refuse_served_source(source)
        with closing(_opened("DEST", dest_spec, create=True)) as dest:
            return _copy(source, dest)


def _copy(source: SqlRegistry, dest: SqlRegistry) -> CopyResult:
    meta, tables = source._read(lambda q: _snapshot(q, source.dialect))
    dest._change(lambda q: _fill(q, source, dest, meta, tables))
    requests = sum(len(t.rows) for t in tables if t.name == "pending")
    return CopyResult(source.where, dest.where, dest.clients(), dest.pending(), requests)


# Why a SOURCE in use is refused, whichever backend: a server running on it goes on changing
# it (a client's rotate, enrollment requests, `pinrpc admin`, revocations included).
IN_USE = (
    "a server running on it would go on changing it after the copy, and DEST would miss "
    "those changes; stop every server on it, then copy"
)


def refuse_served_source(source: SqlRegistry) -> None:
    """A PostgreSQL SOURCE a running server watches: each holds registry_pg.SERVER_LOCK_KEY
    on its LISTEN connection. Servers cut off from PostgreSQL, or older ones, hold nothing."""
    if source.dialect.name != "postgresql":
        return  # and psycopg, which postgres_backend() imports, may be missing
    backend = postgres_backend()
    if isinstance(source, backend) and (servers := source.servers()):
        s = "s" if len(servers) > 1 else ""
        raise ConflictError(
            f"registry {source.where} is in use by {len(servers)} running pinrpc server{s} "
            f"(PostgreSQL connection{s} {'; '.join(servers)}): {IN_USE}"
        )


def refuse_open_source(path: Path) -> None:
    """A SQLite SOURCE another process (a server) has open: see IN_USE."""
    path = path.resolve()  # SQLite follows a symlink: its -shm file is beside the target
    pid = sqlite_user(path)
    if pid is not None:
        who = f"process {pid}" if pid > 0 else "another process"
        raise ConflictError(f"registry {path} is open in {who}: {IN_USE}")


# SQLite's unix VFS: each connection to a WAL database holds a read lock on this byte of the
# -shm file (its "DMS" byte) for as long as it is open, and a killed one holds nothing. The
# -wal file says less: a read-only reader (`list`) or a killed server leaves it behind.
SHM_DMS_BYTE = 128
FLOCK = "hhqqi"  # Linux's struct flock: type, whence, start, length, pid


def sqlite_user(path: Path) -> int | None:
    """The PID of another process that has the SQLite database ``path`` open (0 when the
    lock's owner is in another PID namespace), or None. Our own locks never show, so this
    runs before we open it."""
    try:
        fd = os.open(f"{path}-shm", os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None  # no -shm file: nobody has it open in WAL mode (else SQLite says why)
    try:
        query = struct.pack(FLOCK, fcntl.F_WRLCK, os.SEEK_SET, SHM_DMS_BYTE, 1, 0)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, query)
    finally:
        os.close(fd)
    kind, _, _, _, pid = struct.unpack(FLOCK, answer[: struct.calcsize(FLOCK)])
    return None if kind == fcntl.F_UNLCK else max(pid, 0)


def _opened(what: str, spec: str, *, create: bool, readonly: bool = False) -> SqlRegistry:
    """The registry layer's own opening and refusals, pointed at the argument to fix."""
    try:
        # An empty database's or file's schema goes in with the rows: a failed copy leaves none.
        if create and is_postgres(spec):
            return postgres_backend()(spec, lay_out_late=True)
        if create:
            return SqliteRegistry(Path(spec), lay_out_late=True)
        return _open(spec, create=create, migrate=False, readonly=readonly)
    except RegistryError as exc:
        raise RegistryError(str(exc).replace("check --registry", f"check {what}")) from exc


Layout = dict[str, tuple[tuple[str, ...], bool]]


def _layout(q: Query, dialect: Dialect) -> Layout:
    """The tables to copy: their columns as the current schema has them, and whether they
    have the surrogate key (their order)."""
    layout: Layout = {}
    for name in sorted(row[0] for row in q(dialect.tables, ()) if row[0] not in KEPT):
        columns = [c for (c,) in q(dialect.columns, (name,))]
        layout[name] = tuple(c for c in columns if c != SURROGATE), SURROGATE in columns
    return layout


def _snapshot(q: Query, dialect: Dialect) -> tuple[dict[str, int], list[Table]]:
    """SOURCE's generation and identity, and the rows of every table, as of one moment."""
    q(SNAPSHOT[dialect.name], ())
    meta = {key: int(value) for key, value in q(GENERATION_QUERY, ())}
    tables = []
    # SOURCE's own tables and columns: both sides are at this version's schema (SOURCE is
    # refused otherwise, DEST is laid out or migrated), and DEST's may not exist yet.
    for name, (columns, ordered) in _layout(q, dialect).items():
        order = f" ORDER BY {SURROGATE}" if ordered else ""
        rows = q(f"SELECT {', '.join(columns)} FROM {name}{order}", ())  # noqa: S608
        tables.append(Table(name, columns, rows))
    q("COMMIT", ())
    return meta, tables


def _fill(
    q: Query, source: SqlRegistry, dest: SqlRegistry, meta: dict[str, int], tables: list[Table]
) -> None:
    """Inside DEST's change transaction, its writers held off: refuse, or copy."""
    own = {key: int(value) for key, value in q(GENERATION_QUERY, ())}
    if own["registry_id"] == meta["registry_id"]:
        raise ConflictError(
            f"{source.where} and {dest.where} are the same registry; give a new file or an "
            "empty database as DEST"
        )
    held = {t.name: int(q(f"SELECT COUNT(*) FROM {t.name}", ())[0][0]) for t in tables}  # noqa: S608
    if any(held.values()):
        raise ConflictError(
            f"registry {dest.where} already holds {held.get('clients', 0)} client certificates "
            f"and {held.get('pending', 0)} enrollment requests; copy-registry fills only an "
            "empty registry (it never merges or overwrites): give a new file or an empty database"
        )
    for table in tables:
        times = [i for i, c in enumerate(table.columns) if c in TIMES]
        rows = [_converted(row, times, source.dialect, dest.dialect) for row in table.rows]
        marks = f"({', '.join('?' * len(table.columns))})"
        for start in range(0, len(rows), BATCH):
            batch = rows[start : start + BATCH]
            q(
                f"INSERT INTO {table.name} ({', '.join(table.columns)}) "  # noqa: S608
                f"VALUES {', '.join([marks] * len(batch))}",
                [value for row in batch for value in row],
            )
    # _change bumps it next, past both numbers: no server sees either registry's go back.
    q(
        "UPDATE meta SET value = ? WHERE key = 'generation'",
        (max(own["generation"], meta["generation"]),),
    )


def _converted(row: Row, times: Sequence[int], source: Dialect, dest: Dialect) -> Row:
    values = list(row)
    for i in times:
        if values[i] is not None:
            values[i] = dest.encode_time(source.decode_time(values[i]))
    return tuple(values)
