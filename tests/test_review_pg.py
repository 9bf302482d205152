"""PostgreSQL registries whose database-side settings differ from the ones pinrpc was tested
with: a TimeZone east of UTC (a certificate valid "forever" ends in year 10000 there), a
database in SQL_ASCII encoding (initdb's default in the C locale), and a stricter default
transaction isolation, against a real cluster."""

from __future__ import annotations

import datetime as dt
import itertools
import threading

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from server.enrollment import Candidate, check_certificate
from server.registry_pg import PostgresRegistry
from tests.certs import make_cert, name, p256
from tests.conftest import eventually
from tests.postgres import Postgres

_dbs = itertools.count()

# RFC 5280 4.1.2.5: the notAfter of a certificate with no well-defined expiration date.
FOREVER = dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC)


def candidate(cn: str, not_after: dt.datetime | None = None) -> Candidate:
    key = p256()
    if not_after is None:
        cert = make_cert(key, cn, ca=None, key_cert_sign=False)
    else:
        usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(usage, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
    return check_certificate(cert.public_bytes(Encoding.PEM), cn)


def database(pg: Postgres, *settings: str) -> str:
    """A new database; ``settings`` are ALTER DATABASE ... SET clauses or CREATE options."""
    db = f"review{next(_dbs)}"
    create = [s for s in settings if not s.startswith("SET ")]
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db} {' '.join(create)}")
        for setting in (s for s in settings if s.startswith("SET ")):
            conn.execute(f"ALTER DATABASE {db} {setting}")
    return pg.url(db)


@pytest.mark.parametrize("zone", ["Asia/Tokyo", "America/New_York", "UTC"])
def test_a_certificate_valid_forever_reads_in_any_session_time_zone(
    pg: Postgres, zone: str
) -> None:
    # Before the fix, a session east of UTC got '10000-01-01 08:59:59+09' for it, which
    # Python cannot hold: every read of the registry failed (list, enroll, serve).
    url = database(pg, f"SET timezone = '{zone}'")
    registry = PostgresRegistry(url)
    try:
        registry.enroll(candidate("forever", FOREVER), "forever", ["/pinrpc.v1.Echo/*"])
        registry.enroll(candidate("later"), "later", [])
        revoked = registry.revoke("later")[0].revoked_at
        clients = {c.name: c for c in registry.clients()}
        assert clients["forever"].not_after == FOREVER
        assert clients["later"].revoked_at == revoked
        assert revoked is not None and revoked.utcoffset() == dt.timedelta(0)
    finally:
        registry.close()


def test_an_sql_ascii_database_holds_text_not_bytes(pg: Postgres) -> None:
    # Before the fix psycopg handed back bytes for every text column of such a database, so
    # the first read after the first enrollment called its row malformed.
    url = database(pg, "ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    registry = PostgresRegistry(url)
    try:
        enrolled = registry.enroll(candidate("alice"), "alice", ["/pinrpc.v1.Echo/*"])
        assert [c.name for c in registry.clients()] == ["alice"]
        assert registry.find("alice").fingerprint == enrolled.fingerprint
        assert registry.clients()[0].allowed_methods == ("/pinrpc.v1.Echo/*",)
    finally:
        registry.close()


@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
def test_a_change_waiting_for_another_goes_ahead_whatever_the_default_isolation(
    pg: Postgres, isolation: str
) -> None:
    # Every change waits for the one before it on the generation row (FOR UPDATE), then reads
    # what it left: that needs READ COMMITTED. Before the fix, a database defaulting to a
    # stricter level failed the waiting change with "could not serialize access" instead.
    url = database(pg, f"SET default_transaction_isolation = '{isolation}'")
    registry = PostgresRegistry(url)
    errors: list[Exception] = []

    def enroll() -> None:
        try:
            registry.enroll(candidate("second"), "second", [])
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    waiter = threading.Thread(target=enroll)
    try:
        with psycopg.connect(url) as other:  # another admin's change, not yet committed
            other.execute("SELECT value FROM meta WHERE key = 'generation' FOR UPDATE")
            other.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
            waiter.start()
            eventually(lambda: waiting_for_a_lock(url), 10)
        waiter.join(10)
        assert not waiter.is_alive() and errors == []
        assert [c.name for c in registry.clients()] == ["second"]
    finally:
        waiter.join(10)
        registry.close()


def waiting_for_a_lock(url: str) -> bool:
    """Whether a session of this database waits for a lock (read in a transaction of its
    own: pg_stat_activity stays as first read for the rest of one)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = "
            "current_database()"
        ).fetchall()
    return bool(rows)


@pytest.mark.parametrize("style", ["SQL, DMY", "German", "Postgres, MDY"])
def test_times_read_whatever_the_database_date_style(pg: Postgres, style: str) -> None:
    # psycopg parses timestamptz in the ISO DateStyle only: before the fix every read of such
    # a database failed ("can't parse timestamptz with DateStyle 'German, DMY'").
    url = database(pg, f"SET DateStyle = '{style}'")
    registry = PostgresRegistry(url)
    try:
        enrolled = registry.enroll(candidate("alice"), "alice", [])
        assert registry.clients()[0].enrolled_at == enrolled.enrolled_at
    finally:
        registry.close()
