"""The operator's commands against registries they must not touch, on both backends."""

from __future__ import annotations

import sqlite3

import psycopg
import pytest

from server.registry import is_postgres
from tests.conftest import MakeClient
from tests.test_registry_backends import cli, sql

# Tables another application may well have, under the names pinrpc's own tables have.
FOREIGN = {
    "clients": "CREATE TABLE clients (id INTEGER PRIMARY KEY, name TEXT, email TEXT, "
    "revoked_at TEXT); CREATE TABLE orders (id INTEGER PRIMARY KEY);"
    "INSERT INTO clients (id, name, email) VALUES (1, 'x', 'x@example.com');",
    # Flyway before version 5 kept its history in a table of that name, versions as text.
    "schema_version": "CREATE TABLE schema_version (installed_rank INTEGER, version TEXT, "
    "description TEXT); INSERT INTO schema_version VALUES (1, '1.2', 'init');"
    "CREATE TABLE users (id INTEGER PRIMARY KEY);",
}


def _snapshot(spec: str) -> object:
    """Every table, column and row of the database."""
    if is_postgres(spec):
        with psycopg.connect(spec) as conn:
            columns = conn.execute(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() ORDER BY 1, 2"
            ).fetchall()
            tables = sorted({table for table, _ in columns})
            query = "SELECT * FROM {} ORDER BY 1"  # table names from the catalog
            rows = {t: conn.execute(query.format(t).encode()).fetchall() for t in tables}
            indexes = conn.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() ORDER BY 1"
            ).fetchall()
        return columns, rows, indexes
    with open(spec, "rb") as file:
        return file.read()


@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_another_applications_tables_of_the_same_names_are_refused_and_kept(
    kind: str, spec: str, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """`migrate` turned a foreign `clients` table into a registry (new column, tables and
    indexes), and a text `schema_version` was a traceback."""
    sql(spec, FOREIGN[kind])
    before = _snapshot(spec)
    alice = str(make_client("alice").cert_path)
    for argv in (["migrate"], ["list"], ["pending"], ["enroll", alice, "--name", "alice"]):
        capsys.readouterr()
        assert cli(*argv, "--registry", spec) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert "is not a pinrpc registry: it holds another application's tables" in err
        assert "migrate --registry" not in err  # no advice that would damage it
    assert _snapshot(spec) == before
    if not is_postgres(spec):
        with sqlite3.connect(f"file:{spec}?mode=ro", uri=True) as db:
            assert db.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        db.close()
