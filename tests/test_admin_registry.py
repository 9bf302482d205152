"""The operator's commands against registries they must not touch, on both backends."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from client import cli as client_cli
from pinrpc.cli import Exit
from pinrpc.identity import cert_to_pem, generate_key, self_signed_certificate
from pinrpc.v1 import admin_pb2, admin_pb2_grpc
from server.enrollment import check_certificate
from server.registry import is_postgres, open_registry
from tests.conftest import Connect, MakeClient
from tests.test_lifecycle import ADMIN
from tests.test_registry_backends import cli, sql

OVERLAP = dt.timedelta(seconds=0.5)

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


def test_admin_says_what_the_server_admits_in_every_field(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """`active` ("admitted right now") was true for an expired certificate the server refuses;
    --json left out `active: false`, empty permissions and unset times; the text said
    "retiring" for a certificate already retired and "active" for an expired one."""
    root, bare, gone = make_client("root"), make_client("bare"), make_client("gone")
    connect.enroll(root, "root", ADMIN)
    key, past = generate_key(), dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    old = check_certificate(
        cert_to_pem(self_signed_certificate(key, "old", days=2, now=past)), "old", now=past
    )
    connect.plant(old, "old")
    connect.enroll(bare, "bare")  # no permissions
    connect.enroll(gone, "gone")
    registry = open_registry(str(connect.server_registry))
    try:  # a rotation whose overlap has ended
        successor = make_client("gone2").cert_path.read_bytes()
        registry.rotate(gone.fingerprint, check_certificate(successor, "gone2"), OVERLAP)
    finally:
        registry.close()
    time.sleep(OVERLAP.total_seconds() + 0.1)
    flags = connect.cli_flags(root)
    capsys.readouterr()
    assert client_cli.main(["admin", "list", "--json", *flags]) == Exit.OK
    rows = {r["fingerprint"]: r for r in json.loads(capsys.readouterr().out)}
    assert {tuple(sorted(r)) for r in rows.values()} == {
        ("active", "allowed_methods", "days_left", "enrolled_at", "expiring", "fingerprint",
         "name", "not_after", "retire_at", "revoked_at", "spki_sha256", "subject")
    }  # fmt: skip
    assert rows[str(old.fingerprint)]["active"] is False
    assert rows[str(bare.fingerprint)]["allowed_methods"] == []
    assert rows[str(bare.fingerprint)]["active"] is True
    assert rows[str(gone.fingerprint)]["active"] is False
    assert rows[str(gone.fingerprint)]["revoked_at"] is None
    assert client_cli.main(["admin", "list", *flags]) == Exit.OK
    lines = [line.split()[:3] for line in capsys.readouterr().out.splitlines()]
    assert ["old", str(old.fingerprint), "expired"] in lines, lines
    assert ["gone", str(gone.fingerprint), "retired"] in lines, lines


def test_replace_of_a_name_never_enrolled_is_refused(
    spec: str, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """Re-keying 'alice' after her key leaked, with a typo in the name, enrolled a new client
    'alcie' (exit 0) and left alice's leaked certificate trusted."""
    alice, new = make_client("alice"), make_client("new")
    assert cli("enroll", str(alice.cert_path), "--name", "alice", "--registry", spec) == 0
    capsys.readouterr()
    assert cli("list", "--json", "--registry", spec) == 0
    before = capsys.readouterr().out
    argv = ["enroll", str(new.cert_path), "--name", "alcie", "--replace", "--registry", spec]
    assert cli(*argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no client named 'alcie' was ever enrolled" in err, err
    assert cli("list", "--json", "--registry", spec) == 0
    assert capsys.readouterr().out == before
    # A revoked client may be enrolled again with --replace (as the troubleshooting says).
    assert cli("revoke", "alice", "--registry", spec) == 0
    assert cli(*argv[:3], "alice", *argv[4:]) == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (needs root, and a kernel that lets us mount: skipped otherwise)."""
    where = tmp_path / "small"
    where.mkdir()
    argv = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)]
    if os.geteuid() != 0 or subprocess.run(argv, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_a_full_disk_is_named_and_the_registry_kept(
    small_disk: Path, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every command, `list` too, said only "disk I/O error" (SQLite's -shm file)."""
    spec = str(small_disk / "registry.db")
    assert (
        cli("enroll", str(make_client("alice").cert_path), "--name", "alice", "--registry", spec)
        == 0
    )
    before = Path(spec).read_bytes()
    with open(small_disk / "filler", "wb", buffering=0) as filler:
        for _ in range(1024):  # 1 MiB at most: four times the disk
            try:
                filler.write(b"\0" * 1024)
            except OSError:
                break
    capsys.readouterr()
    bob = str(make_client("bob").cert_path)
    for argv in (["list"], ["enroll", bob, "--name", "bob"], ["revoke", "alice"]):
        assert cli(*argv, "--registry", spec) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "its file system is full: 0 KiB free" in err, err
    assert Path(spec).read_bytes() == before


def test_a_remote_rekey_names_who_revoked_the_old_certificate(
    connect: Connect,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`admin enroll --replace` revokes the old certificate; the server's `revoke` line for it
    names nobody, and the `admin` line did not say it was a re-key."""
    root, bob, bob2 = make_client("root"), make_client("bob"), make_client("bob2")
    connect.enroll(root, "root", ADMIN)
    flags = connect.cli_flags(root)
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        for files, extra in ((bob, []), (bob2, ["--replace"])):
            argv = ["admin", "enroll", str(files.cert_path), "--name", "bob", *extra, *flags]
            assert client_cli.main(argv) == Exit.OK
        connect.server.trust.poll()
        connect.server.audit.flush()
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "pinrpc.audit"]
    admin = [(r["by"], r["fingerprint"], r["replace"]) for r in lines if r["event"] == "admin"]
    assert admin == [("root", str(bob.fingerprint), False), ("root", str(bob2.fingerprint), True)]
    assert str(bob.fingerprint) in [r["fingerprint"] for r in lines if r["event"] == "revoke"]


def test_list_says_an_expired_certificate_is_expired(
    spec: str, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """`list` called a certificate the server refuses "active" and told the operator to
    rotate it, which an expired certificate cannot; --json had no field saying either."""
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    pem = cert_to_pem(self_signed_certificate(generate_key(), "old", days=2, now=past))
    registry = open_registry(spec)
    try:
        old = registry.enroll(check_certificate(pem, "old", now=past), "old", [])
        registry.enroll(
            check_certificate(make_client("new").cert_path.read_bytes(), "n"), "new", []
        )
    finally:
        registry.close()
    capsys.readouterr()
    assert cli("list", "--registry", spec) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("old "))
    assert f"{old.fingerprint}  expired " in line and "EXPIRED" in line, line
    assert line.endswith("<- expired: new key pair, then enroll --replace"), line
    assert cli("list", "--json", "--registry", spec) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["active"], r["expiring"]) for r in rows] == [
        ("old", False, False),
        ("new", True, False),
    ]


def test_a_registry_outage_on_the_server_is_not_a_connection_failure(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """The server answered UNAVAILABLE for its registry, and `pinrpc admin` (and `rotate`)
    said "cannot reach HOST:PORT ... check that the server is running" (exit 3)."""
    root = make_client("root")
    connect.enroll(root, "root", ADMIN)
    connect.server_registry.rename(connect.server_registry.with_name("moved.db"))
    pair = root.cert_path.read_bytes(), root.key_path.read_bytes()
    for action in (["list"], ["get", "root"], ["revoke", "root"]):
        capsys.readouterr()
        assert client_cli.main(["admin", *action, *connect.cli_flags(root)]) == Exit.RPC
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert "the server answered, but could not use its registry: registry " in err
        assert "is gone (deleted or moved)" in err and "cannot reach" not in err
    # rotate keeps its new pair aside (the outcome of a failed answer is unknown) and says so.
    assert client_cli.main(["rotate", *connect.cli_flags(root)]) == Exit.RPC
    err = capsys.readouterr().err
    assert err.startswith("pinrpc: error: the server answered, but could not use its registry")
    assert "cannot reach" not in err and "the outcome is unknown" in err
    assert (root.cert_path.read_bytes(), root.key_path.read_bytes()) == pair


def test_a_huge_reference_gets_the_answer_not_a_broken_stream(
    connect: Connect, make_client: MakeClient
) -> None:
    """The error quoted the caller's 100 KB input; gRPC refused the header and the caller got
    RESOURCE_EXHAUSTED "Stream removed" instead of NOT_FOUND or INVALID_ARGUMENT."""
    root = make_client("root")
    connect.enroll(root, "root", ADMIN)
    stub = admin_pb2_grpc.AdminStub(connect.channel(root.cert_path, root.key_path))
    huge = "x" * 100_000
    pem = root.cert_path.read_text()
    # Cut short by the Admin service, or (a name) already where names are checked.
    calls: list[tuple[Callable[[], object], grpc.StatusCode, str]] = [
        (
            lambda: stub.Get(admin_pb2.GetRequest(client=huge)),
            grpc.StatusCode.NOT_FOUND,
            "characters in all)",
        ),
        (
            lambda: stub.Revoke(admin_pb2.RevokeRequest(client=huge)),
            grpc.StatusCode.NOT_FOUND,
            "characters in all)",
        ),
        (
            lambda: stub.Enroll(admin_pb2.EnrollRequest(certificate_pem=pem, name=huge)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "(100000 characters)",
        ),
    ]
    for call, code, cut in calls:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == code, caught.value.details()
        assert cut in (caught.value.details() or "")
