"""PostgreSQL as the registry in operation, against a real cluster: roles that may not read or
write are told what to grant."""

from __future__ import annotations

import itertools

import psycopg
import pytest

from pinrpc.identity import KeyPairFiles
from server import cli as server_cli
from server.app import start_server
from server.config import ServerConfig
from tests.conftest import MakeClient, ServerFiles, admitted
from tests.postgres import Postgres
from tests.test_replicas import stub

_dbs = itertools.count()


@pytest.fixture
def url(pg: Postgres) -> str:
    return pg.create_database(f"pgops{next(_dbs)}")


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    """Exit code and stderr lines of one pinrpc-server command."""
    capsys.readouterr()
    code = server_cli.main(list(argv))
    return code, capsys.readouterr().err.splitlines()


def enroll(url: str, files: KeyPairFiles, name: str) -> None:
    assert server_cli.main(["enroll", str(files.cert_path), "--name", name, "--registry", url]) == 0


def snapshot(url: str) -> list[tuple[object, ...]]:
    """Everything a change could touch, read as the superuser."""
    with psycopg.connect(url) as conn:
        clients = conn.execute("SELECT fingerprint, revoked_at, retire_at FROM clients").fetchall()
        meta = conn.execute("SELECT key, value FROM meta ORDER BY key").fetchall()
        pending = conn.execute("SELECT fingerprint FROM pending").fetchall()
    return [*sorted(clients), *meta, ("pending", *sorted(pending))]


def role(url: str, name: str, *grants: str) -> str:
    """A login role with these statements run for it; its URL to the same database."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN")
        for grant in grants:
            conn.execute(grant.format(role=name))
    return url.replace("pinrpc@", f"{name}@")


def test_a_role_without_privileges_is_told_what_to_grant(
    url: str, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    enroll(url, make_client("alice"), "alice")
    before = snapshot(url)
    nothing = role(url, "nopriv")
    code, err = cli(capsys, "list", "--registry", nothing)
    assert code == 1
    assert len(err) == 1
    # It used to call its own registry "another application's tables".
    assert "another application" not in err[0]
    assert "permission denied for table" in err[0]
    assert "grant the role SELECT" in err[0]
    reader = role(url, "selonly", "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    assert cli(capsys, "list", "--registry", reader)[0] == 0
    code, err = cli(capsys, "revoke", "alice", "--registry", reader)
    assert code == 1
    assert len(err) == 1
    assert "permission denied for table meta; grant the role" in err[0]
    assert snapshot(url) == before


def test_a_read_only_role_serves_but_changes_are_sent_to_the_primary(
    url: str, make_client: MakeClient, devca: ServerFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = make_client("alice")
    enroll(url, alice, "alice")
    before = snapshot(url)
    readonly = role(
        url,
        "ro",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}",
        "ALTER ROLE {role} SET default_transaction_read_only = on",
    )
    config = ServerConfig(listen="127.0.0.1:0", cert=devca.cert, key=devca.key, registry=readonly)
    with start_server(config) as running:
        assert admitted(stub(f"127.0.0.1:{running.port}", alice, devca))
    code, err = cli(capsys, "revoke", "alice", "--registry", readonly)
    assert code == 1
    assert len(err) == 1
    assert "read-only transaction" in err[0]
    assert "point --registry at the primary" in err[0]
    assert snapshot(url) == before
