"""One registry suite, run against SQLite and a real PostgreSQL 15: same rules, same messages,
same schema versions, same migrations."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
import time
from pathlib import Path

import psycopg
import pytest

from pinrpc.errors import ConflictError, NotFoundError, RegistryError
from pinrpc.identity import cert_to_pem
from server import cli as server_cli
from server.enrollment import Candidate, check_certificate
from server.registry import LATEST, Registry, is_postgres, migrate_registry, open_registry
from server.registry_schema import COLUMNS
from server.registry_sql import PAGE_AFTER, POSITION
from tests.certs import make_cert, p256
from tests.conftest import ECHO_ALL, MakeClient
from tests.ports import free_port
from tests.postgres import Postgres


def sql(spec: str, statement: str) -> None:
    """Change the registry behind pinrpc's back, as an operator or a restore would."""
    if is_postgres(spec):
        with psycopg.connect(spec, autocommit=True) as conn:
            conn.execute(statement.encode())
    else:
        with sqlite3.connect(spec) as db:
            db.executescript(statement)
        db.close()


def cli(*argv: str) -> int:
    return server_cli.main(list(argv))


def candidate(make_client: MakeClient, name: str) -> Candidate:
    files = make_client(name)
    return check_certificate(files.cert_path.read_bytes(), str(files.cert_path))


def test_cli_enroll_list_revoke(
    spec: str, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    assert cli("enroll", str(alice.cert_path), "--name", "alice", "--registry", spec) == 0
    assert cli("enroll", str(bob.cert_path), "--name", "bob", "--allow", ECHO_ALL,
               "--registry", spec) == 0  # fmt: skip
    assert cli("revoke", "alice", "--registry", spec) == 0
    capsys.readouterr()
    assert cli("list", "--json", "--registry", spec) == 0
    listed = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert listed["alice"]["revoked_at"] is not None
    assert listed["bob"]["revoked_at"] is None
    assert listed["bob"]["allowed_methods"] == [ECHO_ALL]
    assert listed["bob"]["fingerprint"] == str(bob.fingerprint)
    # A revoked certificate never comes back, on either backend, with the same message.
    assert cli("enroll", str(alice.cert_path), "--name", "alice2", "--registry", spec) == 1
    assert "was revoked on" in capsys.readouterr().err


def test_generation_changes_with_every_change_and_only_then(
    spec: str, make_client: MakeClient
) -> None:
    registry = open_registry(spec)
    try:
        g0 = registry.generation()
        registry.clients()
        assert registry.generation() == g0
        alice = candidate(make_client, "alice")
        registry.enroll(alice, "alice", [])
        g1 = registry.generation()
        assert g1 != g0
        with pytest.raises(ConflictError, match="already enrolled"):
            registry.enroll(alice, "alice-again", [])
        assert registry.generation() == g1  # a refused change changes nothing
        registry.revoke("alice")
        assert registry.generation() not in (g0, g1)
    finally:
        registry.close()


def test_replace_rekeys_and_revokes_the_old_certificate(spec: str, make_client: MakeClient) -> None:
    registry = open_registry(spec)
    try:
        old, new = candidate(make_client, "old"), candidate(make_client, "new")
        registry.enroll(old, "svc", [ECHO_ALL])
        with pytest.raises(ConflictError, match="pass --replace"):
            registry.enroll(new, "svc", [ECHO_ALL])
        registry.enroll(new, "svc", [ECHO_ALL], replace=True)
        by_fp = {c.fingerprint: c for c in registry.clients()}
        assert not by_fp[old.fingerprint].active
        assert by_fp[new.fingerprint].active
        assert by_fp[new.fingerprint].enrolled_at.tzinfo is not None
    finally:
        registry.close()


def test_a_rekey_without_permissions_keeps_the_replaced_ones(
    spec: str, make_client: MakeClient
) -> None:
    """In the registry, so `enroll --replace`, `approve --replace` and the Admin API agree."""
    registry = open_registry(spec)
    try:
        registry.enroll(candidate(make_client, "v1"), "svc", [ECHO_ALL])
        assert registry.enroll(
            candidate(make_client, "v2"), "svc", [], replace=True
        ).allowed_methods == (ECHO_ALL,)
        narrower = "/pinrpc.v1.Echo/Echo"
        assert registry.enroll(
            candidate(make_client, "v3"), "svc", [narrower], replace=True
        ).allowed_methods == (narrower,)
        # A first enrollment without permissions gets none: nothing is replaced.
        assert registry.enroll(candidate(make_client, "other"), "other", []).allowed_methods == ()
    finally:
        registry.close()


def test_concurrent_enrollments_are_serialized(spec: str, make_client: MakeClient) -> None:
    """Two admins enrolling the same name at once: exactly one wins, the other gets the rule."""
    open_registry(spec).close()
    for round_ in range(3):
        candidates = [candidate(make_client, f"c{round_}{i}") for i in range(2)]
        outcomes: list[str] = []

        def enroll(c: Candidate, name: str, outcomes: list[str]) -> None:
            registry = open_registry(spec)
            try:
                registry.enroll(c, name, [])
                outcomes.append("ok")
            except ConflictError:
                outcomes.append("conflict")
            finally:
                registry.close()

        threads = [
            threading.Thread(target=enroll, args=(c, f"same{round_}", outcomes)) for c in candidates
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(outcomes) == ["conflict", "ok"]


def _versions(spec: str) -> list[int]:
    if is_postgres(spec):
        with psycopg.connect(spec) as conn:
            rows = conn.execute("SELECT version FROM schema_version ORDER BY 1").fetchall()
    else:
        with sqlite3.connect(spec) as db:
            rows = db.execute("SELECT version FROM schema_version ORDER BY 1").fetchall()
        db.close()
    return [int(r[0]) for r in rows]


def test_new_registry_is_at_the_latest_schema(spec: str) -> None:
    open_registry(spec).close()
    assert _versions(spec) == list(range(1, LATEST + 1))
    result = migrate_registry(spec)
    assert result.applied == ()
    assert result.version == LATEST


# Undo what migrations 2 and 3 did to the data, leaving a first-release registry.
BACK_TO_V1 = (
    "DELETE FROM schema_version WHERE version >= 2;"
    "DELETE FROM meta WHERE key = 'registry_id';"
    "DROP INDEX clients_current_name;"
    "ALTER TABLE clients DROP COLUMN retire_at;"
    "CREATE UNIQUE INDEX clients_active_name ON clients(name) WHERE revoked_at IS NULL;"
)


def test_older_schema_is_refused_until_migrated(spec: str, make_client: MakeClient) -> None:
    registry = open_registry(spec)
    registry.enroll(candidate(make_client, "alice"), "alice", [ECHO_ALL])
    registry.close()
    # Back to version 1, as a registry written by the first release looks.
    sql(spec, BACK_TO_V1)
    with pytest.raises(RegistryError, match=f"schema version 1, this pinrpc needs {LATEST}; "
                       "back it up, then run `pinrpc-server migrate"):  # fmt: skip
        open_registry(spec)
    result = migrate_registry(spec)
    assert [m.version for m in result.applied] == list(range(2, LATEST + 1))
    registry = open_registry(spec, create=False)
    try:
        assert [c.name for c in registry.clients()] == ["alice"]
    finally:
        registry.close()
    assert _versions(spec) == list(range(1, LATEST + 1))


def test_newer_schema_is_refused(spec: str) -> None:
    open_registry(spec).close()
    sql(spec, "INSERT INTO schema_version VALUES (99, 'future', '2099-01-01T00:00:00+00:00');")
    with pytest.raises(RegistryError, match="schema version 99, newer than this pinrpc"):
        open_registry(spec)
    with pytest.raises(RegistryError, match="upgrade pinrpc"):
        migrate_registry(spec)


def test_reading_an_empty_registry_is_refused(
    spec: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli("list", "--registry", spec) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "enroll a client first" in err


def test_legacy_unversioned_sqlite_file_migrates(tmp_path: Path, make_client: MakeClient) -> None:
    """A file written before schema versions existed is version 0 and keeps its clients."""
    path = tmp_path / "old.db"
    spec = str(path)
    registry = open_registry(spec)
    registry.enroll(candidate(make_client, "alice"), "alice", [])
    registry.close()
    sql(spec, BACK_TO_V1)
    sql(spec, "DROP TABLE schema_version;")
    with pytest.raises(RegistryError, match="schema version 0"):
        open_registry(spec)
    assert [m.version for m in migrate_registry(spec).applied] == list(range(1, LATEST + 1))
    registry = open_registry(spec)
    try:
        assert [c.name for c in registry.clients()] == ["alice"]
    finally:
        registry.close()


def test_postgres_url_errors_are_one_line_without_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    closed = f"postgresql://pinrpc:s3cret@127.0.0.1:{free_port()}/x"
    assert cli("list", "--registry", closed) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "cannot connect to PostgreSQL postgresql://pinrpc@127.0.0.1" in err
    assert "s3cret" not in err
    assert cli("list", "--registry", "postgresql://x@[::1:bad/db?sslmode=nonsense") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "PostgreSQL" in err


def test_cli_migrate(spec: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`pinrpc-server migrate`: applies what is missing, then nothing; refuses a newer schema."""
    open_registry(spec).close()
    sql(spec, BACK_TO_V1)
    capsys.readouterr()
    assert cli("migrate", "--registry", spec) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == ["applied 2: registry identity", "applied 3: rotation overlap (retire_at)"]
    assert out[-1].endswith(f"is at schema version {LATEST}")
    assert cli("migrate", "--registry", spec) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    sql(spec, "INSERT INTO schema_version VALUES (99, 'future', '2099-01-01T00:00:00+00:00');")
    assert cli("migrate", "--registry", spec) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "newer than this pinrpc supports" in err


def test_rotation_overlap(
    spec: str, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = open_registry(spec)
    try:
        old = registry.enroll(candidate(make_client, "alice"), "alice", [ECHO_ALL])
        new, _ = registry.rotate(
            old.fingerprint, candidate(make_client, "alice2"), dt.timedelta(hours=1)
        )
        assert (new.name, new.allowed_methods, new.current) == ("alice", (ECHO_ALL,), True)
        retiring = registry.find(old.fingerprint.hex)
        assert retiring.active and not retiring.current and retiring.retire_at is not None
        assert registry.find("alice").fingerprint == new.fingerprint  # the name means the newest
        listed = server_cli.main(["list", "--registry", spec])
        assert (
            listed == 0
            and f"retiring {retiring.retire_at:%Y-%m-%d %H:%M}" in capsys.readouterr().out
        )
        with pytest.raises(ConflictError, match="already being retired"):
            registry.rotate(old.fingerprint, candidate(make_client, "alice3"), dt.timedelta(0))
        registry.revoke("alice")  # by name: every usable certificate of the client
        assert [c.revoked_at is not None for c in registry.clients()] == [True, True]
    finally:
        registry.close()


def test_rotation_without_overlap_revokes_at_once(spec: str, make_client: MakeClient) -> None:
    registry = open_registry(spec)
    try:
        old = registry.enroll(candidate(make_client, "alice"), "alice", [])
        registry.rotate(old.fingerprint, candidate(make_client, "alice2"), dt.timedelta(0))
        assert registry.find(old.fingerprint.hex).revoked_at is not None
        assert [c.active for c in registry.clients()] == [False, True]
    finally:
        registry.close()


def _look_alike(cn: str) -> Candidate:
    pem = cert_to_pem(make_cert(p256(), cn, key_ids=False, key_cert_sign=False))
    return check_certificate(pem, cn)


def test_rotation_overlap_keeps_the_retiring_certificate_in_the_look_alike_check(
    spec: str,
) -> None:
    registry = open_registry(spec)
    try:
        registry.enroll(_look_alike("svc"), "svc", [])
        current = registry.find("svc").fingerprint
        with pytest.raises(ConflictError, match="could not tell them apart"):
            registry.rotate(current, _look_alike("svc"), dt.timedelta(hours=1))
        assert [c.fingerprint for c in registry.clients()] == [current]
        # Without an overlap the old certificate leaves the trusted set at once: no clash.
        successor = _look_alike("SVC")
        registry.rotate(current, successor, dt.timedelta(0))
        assert [c.fingerprint for c in registry.clients() if c.active] == [successor.fingerprint]
    finally:
        registry.close()


def test_revoke_by_a_fingerprint_shaped_name_revokes_every_certificate_of_it(
    spec: str, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "ab" * 32  # a valid name that parses as a fingerprint (older pinrpc enrolled it)
    registry = open_registry(spec)
    try:
        old = candidate(make_client, "old")
        registry.enroll(old, "legacy", [])
    finally:
        registry.close()
    sql(spec, f"UPDATE clients SET name = '{name}'")  # noqa: S608
    registry = open_registry(spec)
    try:
        registry.rotate(old.fingerprint, candidate(make_client, "new"), dt.timedelta(hours=1))
    finally:
        registry.close()
    assert cli("revoke", name, "--registry", spec) == 0
    capsys.readouterr()
    assert cli("list", "--json", "--registry", spec) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [c["revoked_at"] is not None for c in listed] == [True, True]
    # Twice, by name as by fingerprint: "already revoked".
    for ref in (name, listed[1]["fingerprint"]):
        assert cli("revoke", ref, "--registry", spec) == 1
        assert "was already revoked on" in capsys.readouterr().err


def _request(spec: str, files_of: MakeClient, name: str, ttl: float = 3600) -> str:
    """Queue an enrollment request for a new key pair; return its fingerprint."""
    registry = open_registry(spec)
    try:
        waiting = registry.request_enrollment(
            candidate(files_of, name), name, "ipv4:127.0.0.1:1", dt.timedelta(seconds=ttl), 10
        )
    finally:
        registry.close()
    return str(waiting.fingerprint)


def _names(spec: str, capsys: pytest.CaptureFixture[str]) -> list[str]:
    capsys.readouterr()
    assert cli("list", "--json", "--registry", spec) == 0
    return [c["name"] for c in json.loads(capsys.readouterr().out) if c["revoked_at"] is None]


def test_approve_enrolls_and_removes_the_request_or_leaves_it_waiting(
    spec: str, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = _request(spec, make_client, "carol"), _request(spec, make_client, "carol2")
    assert cli("approve", first, "--allow", ECHO_ALL, "--registry", spec) == 0
    # The name is taken: refused with what --replace would do and when to pass it, and the
    # request stays.
    assert cli("approve", second, "--name", "carol", "--registry", spec) == 1
    assert "--replace would retire that client's certificate" in capsys.readouterr().err
    assert cli("approve", second, "--name", "carol", "--replace", "--registry", spec) == 0
    said = capsys.readouterr().out  # as enroll says it: the kept permissions, the expiry
    assert f"allowed      {ECHO_ALL}  (kept from the replaced certificate)" in said
    assert "expires" in said
    assert cli("pending", "--json", "--registry", spec) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert _names(spec, capsys) == ["carol"]
    expired = _request(spec, make_client, "dave", ttl=0.001)
    assert cli("approve", expired, "--registry", spec) == 1
    assert "expired, or already handled" in capsys.readouterr().err
    assert _names(spec, capsys) == ["carol"]


def test_a_request_rejected_during_approval_is_not_enrolled(
    pg: Postgres, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """Reject holds the request's row; approve waits for it, then finds it gone."""
    spec = pg.create_database("rejected_during_approval")
    fingerprint = _request(spec, make_client, "erin")
    codes: list[int] = []
    with psycopg.connect(spec) as rejecting:
        rejecting.execute("DELETE FROM pending")  # uncommitted: the row stays locked
        approving = threading.Thread(
            target=lambda: codes.append(cli("approve", fingerprint, "--registry", spec))
        )
        approving.start()
        waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted"
        with psycopg.connect(spec, autocommit=True) as watch:
            for _ in range(100):  # 5 s at most
                if watch.execute(waiting).fetchone() != (0,):
                    break
                time.sleep(0.05)
            else:
                pytest.fail("approve never waited for the rejecting transaction")
        rejecting.commit()
    approving.join(timeout=10)
    assert codes == [1]
    assert "already handled" in capsys.readouterr().err
    assert _names(spec, capsys) == []


def test_no_tables_are_added_to_another_applications_database(
    spec: str, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    sql(spec, "CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    alice = str(make_client("alice").cert_path)
    assert cli("enroll", alice, "--name", "alice", "--registry", spec) == 1
    assert "is not a pinrpc registry" in capsys.readouterr().err
    if is_postgres(spec):
        with psycopg.connect(spec) as conn:
            query = "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
            found = conn.execute(query).fetchall()
    else:
        with sqlite3.connect(spec) as db:
            found = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        db.close()
    assert found == [("invoices",)]


def _request_at_once(spec: str, candidates: list[Candidate], limit: int) -> list[str]:
    """Each candidate's request from its own connection (replicas), all released together."""
    registries = [open_registry(spec) for _ in candidates]
    start, outcomes = threading.Barrier(len(candidates)), []

    def request(registry: Registry, c: Candidate) -> None:
        start.wait(10)
        try:
            registry.request_enrollment(c, "x", "peer", dt.timedelta(hours=1), limit)
            outcomes.append("ok")
        except RegistryError as exc:
            outcomes.append(type(exc).__name__)

    pairs = zip(registries, candidates, strict=True)
    threads = [threading.Thread(target=request, args=pair) for pair in pairs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for registry in registries:
        registry.close()
    return sorted(outcomes)


def test_concurrent_requests_keep_the_limit_and_the_conflict(
    spec: str, make_client: MakeClient
) -> None:
    """PostgreSQL ran them side by side: 9 waited under a limit of 2, and a duplicate failed
    as a database error (UNAVAILABLE to the client) instead of a conflict."""
    open_registry(spec).close()
    distinct = [candidate(make_client, f"c{i}") for i in range(6)]
    assert _request_at_once(spec, distinct, 2) == ["CapacityError"] * 4 + ["ok"] * 2
    same = [candidate(make_client, "same")] * 4
    assert _request_at_once(spec, same, 100) == ["ConflictError"] * 3 + ["ok"]


def test_a_request_does_not_read_every_client(tmp_path: Path, make_client: MakeClient) -> None:
    """Strangers send requests, each in a write transaction: decoding all 10,000 clients took
    0.15 s of it here, and a few request loops made `pinrpc-server revoke` time out. A row
    that cannot be decoded shows whether a request reads other clients' rows."""
    spec = str(tmp_path / "registry.db")
    registry = open_registry(spec)
    try:
        registry.enroll(candidate(make_client, "first"), "first", [ECHO_ALL])
        sql(spec, f"""
            INSERT INTO clients ({COLUMNS})
            SELECT 'unreadable', printf('%064x', 1), cert_pem, spki_sha256, subject,
                   has_key_ids, 'not JSON', enrolled_at, not_after, NULL, NULL
            FROM clients WHERE name = 'first';
        """)  # noqa: S608  # fmt: skip
        with pytest.raises(RegistryError, match="malformed row"):
            registry.clients()  # the row is unreadable indeed
        stranger = candidate(make_client, "stranger")
        pending = registry.request_enrollment(stranger, "s", "peer", dt.timedelta(hours=1), 1)
        assert pending.fingerprint == stranger.fingerprint
    finally:
        registry.close()


def test_permit_replaces_the_permissions_of_every_usable_certificate_of_the_client(
    spec: str, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """During a rotation's overlap the client has two certificates: both get the new set,
    whichever one names it; its revoked history and other clients keep theirs."""
    registry = open_registry(spec)
    try:
        revoked = registry.enroll(candidate(make_client, "a0"), "alice", [ECHO_ALL])
        retiring = registry.enroll(candidate(make_client, "a1"), "alice", [], replace=True)
        current, _ = registry.rotate(
            retiring.fingerprint, candidate(make_client, "a2"), dt.timedelta(hours=1)
        )
        bob = registry.enroll(candidate(make_client, "bob"), "bob", [ECHO_ALL])
        before = registry.generation()
        changed = registry.permit(str(retiring.fingerprint), ["/x/*"])
        assert (changed.fingerprint, changed.allowed_methods) == (retiring.fingerprint, ("/x/*",))
        assert registry.generation() != before
    finally:
        registry.close()
    assert cli("permit", "alice", "--allow", "/y/*", "--allow", "/z/A", "--registry", spec) == 0
    capsys.readouterr()
    assert cli("list", "--json", "--registry", spec) == 0
    listed = {c["fingerprint"]: c["allowed_methods"] for c in json.loads(capsys.readouterr().out)}
    assert listed == {
        str(revoked.fingerprint): [ECHO_ALL],
        str(retiring.fingerprint): ["/y/*", "/z/A"],
        str(current.fingerprint): ["/y/*", "/z/A"],
        str(bob.fingerprint): [ECHO_ALL],
    }
    assert cli("permit", "bob", "--none", "--registry", spec) == 0
    capsys.readouterr()
    assert cli("list", "--registry", spec) == 0
    bob_line = next(line for line in capsys.readouterr().out.splitlines() if "bob" in line)
    assert bob_line.endswith("  -")


def test_permit_refuses_unknown_revoked_retired_clients_and_bad_patterns(
    spec: str, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = open_registry(spec)
    try:
        gone = registry.enroll(candidate(make_client, "gone"), "gone", [ECHO_ALL])
        registry.revoke("gone")
        old = registry.enroll(candidate(make_client, "old"), "carol", [ECHO_ALL])
        registry.rotate(old.fingerprint, candidate(make_client, "new"), dt.timedelta(0))
        registry.enroll(candidate(make_client, "dave"), "dave", [ECHO_ALL])
    finally:
        registry.close()
    # A retired certificate: the end of an overlap, not a revocation.
    retired = f"WHERE fingerprint = '{old.fingerprint.hex}'"
    sql(spec, f"UPDATE clients SET revoked_at = NULL, retire_at = enrolled_at {retired}")  # noqa: S608
    capsys.readouterr()
    assert cli("list", "--json", "--registry", spec) == 0
    before = capsys.readouterr().out
    for argv, expected in [
        (["nobody", "--none"], "no enrolled client named or with fingerprint 'nobody'"),
        (["gone", "--allow", ECHO_ALL], "'gone' (" + str(gone.fingerprint) + ") was revoked on"),
        ([str(gone.fingerprint), "--none"], "was revoked on"),
        ([str(old.fingerprint), "--none"], "was retired on"),
        (["dave", "--allow", "/a b"], "holds characters no method name has"),
        (["dave", "--allow", "Echo"], "must start with '/'"),
        (["dave"], "pass --allow PATTERN (repeatable), or --none"),
        (["dave", "--none", "--allow", ECHO_ALL], "not both"),
    ]:
        assert cli("permit", *argv, "--registry", spec) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err, err
    assert cli("list", "--json", "--registry", spec) == 0
    assert capsys.readouterr().out == before


def test_a_name_that_differs_only_in_case_is_suggested_when_nothing_matches(
    spec: str, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = open_registry(spec)
    try:
        registry.enroll(candidate(make_client, "dave"), "dave", [ECHO_ALL])
        registry.enroll(candidate(make_client, "gone"), "gone", [ECHO_ALL])
        registry.revoke("gone")
        with pytest.raises(NotFoundError, match=r"'Dave' .*; did you mean 'dave'\?"):
            registry.find("Dave")
    finally:
        registry.close()
    capsys.readouterr()
    assert cli("list", "--json", "--registry", spec) == 0
    before = capsys.readouterr().out
    for argv, hint in [
        (["permit", "DAVE", "--none"], "did you mean 'dave'? (names are case-sensitive)"),
        (["revoke", "Dave"], "did you mean 'dave'?"),
        (["permit", "Gone", "--none"], None),  # revoked: nothing to suggest
        (["revoke", "davey"], None),
    ]:
        assert cli(*argv, "--registry", spec) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no enrolled client named" in err, err
        assert (hint in err) if hint else ("did you mean" not in err), err
    assert cli("list", "--json", "--registry", spec) == 0
    assert capsys.readouterr().out == before


def _has_name_index(spec: str) -> bool:
    if is_postgres(spec):
        with psycopg.connect(spec) as conn:
            rows = conn.execute("SELECT 1 FROM pg_indexes WHERE indexname = 'clients_name'")
            return rows.fetchone() is not None
    with sqlite3.connect(spec) as db:
        found = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'clients_name'").fetchone()
    db.close()
    return found is not None


def test_a_version_4_registry_gets_its_name_index_from_migrate(
    spec: str, make_client: MakeClient
) -> None:
    registry = open_registry(spec)
    alice = registry.enroll(candidate(make_client, "alice"), "alice", [])
    registry.close()
    assert _has_name_index(spec)
    sql(spec, "DELETE FROM schema_version WHERE version = 5; DROP INDEX clients_name;")
    with pytest.raises(RegistryError, match=f"schema version 4, this pinrpc needs {LATEST}"):
        open_registry(spec)
    assert [m.description for m in migrate_registry(spec).applied] == ["index on client names"]
    assert _has_name_index(spec)
    registry = open_registry(spec, create=False)
    try:
        assert registry.find("alice").fingerprint == alice.fingerprint
    finally:
        registry.close()


def test_a_new_name_equal_to_an_active_one_but_for_case_is_refused(
    spec: str, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = open_registry(spec)
    try:
        registry.enroll(candidate(make_client, "gone"), "Gone", [])
        registry.revoke("Gone")
        # Allowed: a revoked client's name in another case, and names that differ otherwise.
        registry.enroll(candidate(make_client, "gone2"), "gone", [])
        alice = registry.enroll(candidate(make_client, "alice"), "Alice", [ECHO_ALL])
        registry.enroll(candidate(make_client, "alice2"), "Alice2", [])
    finally:
        registry.close()
    assert cli("list", "--json", "--registry", spec) == 0
    before = capsys.readouterr().out
    for name in ("alice", "ALICE", "GONE"):
        files = make_client(f"new-{name}")
        for replace in ([], ["--replace"]):
            argv = ["enroll", str(files.cert_path), "--name", name, *replace, "--registry", spec]
            assert cli(*argv) == 1
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "differs from it only in case" in err, err
    request = _request(spec, make_client, "ALICE")
    assert cli("approve", request, "--registry", spec) == 1
    assert f"'Alice' is already enrolled ({alice.fingerprint})" in capsys.readouterr().err
    assert cli("list", "--json", "--registry", spec) == 0
    assert capsys.readouterr().out == before
    assert cli("pending", "--json", "--registry", spec) == 0  # the request still waits
    assert [p["name"] for p in json.loads(capsys.readouterr().out)] == ["ALICE"]


def test_a_registry_that_already_holds_names_differing_in_case_keeps_working(
    spec: str, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = open_registry(spec)
    try:
        registry.enroll(candidate(make_client, "upper"), "Alice", [])
        lower = registry.enroll(candidate(make_client, "lower"), "lower", [])
    finally:
        registry.close()
    sql(spec, "UPDATE clients SET name = 'alice' WHERE name = 'lower'")  # an older pinrpc's pair
    registry = open_registry(spec)
    try:
        new, _ = registry.rotate(lower.fingerprint, candidate(make_client, "l2"), dt.timedelta(0))
        assert new.name == "alice"
        rekeyed = registry.enroll(candidate(make_client, "l3"), "alice", [ECHO_ALL], replace=True)
        assert registry.permit("alice", ["/x/*"]).fingerprint == rekeyed.fingerprint
        assert registry.find("Alice").allowed_methods == ()
        registry.revoke("alice")
        assert [c.name for c in registry.clients() if c.active] == ["Alice"]
    finally:
        registry.close()


def test_a_name_held_only_by_a_retiring_certificate_is_not_given_to_another_key_pair(
    spec: str, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """alice rotated, then her new certificate was revoked: her old one stays trusted until
    the overlap ends. A stranger enrolled as 'alice' meanwhile would share its name, and
    `permit alice` (or by the stranger's fingerprint) would change both."""
    registry = open_registry(spec)
    try:
        old = registry.enroll(candidate(make_client, "a1"), "alice", [ECHO_ALL])
        new, _ = registry.rotate(
            old.fingerprint, candidate(make_client, "a2"), dt.timedelta(hours=1)
        )
        registry.revoke(str(new.fingerprint))
        assert registry.find("alice").fingerprint == old.fingerprint  # retiring, still trusted
    finally:
        registry.close()
    capsys.readouterr()
    assert cli("list", "--json", "--registry", spec) == 0
    before = capsys.readouterr().out
    stranger = make_client("stranger")
    argv = ["enroll", str(stranger.cert_path), "--name", "alice", "--registry", spec]
    assert cli(*argv, "--allow", "/x/*") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'alice' is already enrolled ({old.fingerprint})" in err
    assert "pass --replace" in err
    assert cli("list", "--json", "--registry", spec) == 0
    assert capsys.readouterr().out == before
    # A re-key may take the name: the retiring certificate is revoked with it.
    assert cli(*argv, "--replace") == 0
    registry = open_registry(spec)
    try:
        assert [c.fingerprint for c in registry.clients() if c.active] == [stranger.fingerprint]
        assert registry.find("alice").allowed_methods == (ECHO_ALL,)  # kept, as re-keys do
    finally:
        registry.close()


def test_permit_or_revoke_of_a_pending_request_changes_nothing_and_says_what_it_is(
    spec: str, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = open_registry(spec)
    try:
        registry.enroll(candidate(make_client, "alice"), "alice", [ECHO_ALL])
    finally:
        registry.close()
    waiting = _request(spec, make_client, "carol")
    capsys.readouterr()
    assert cli("list", "--json", "--registry", spec) == 0
    before = capsys.readouterr().out
    ref = waiting.replace(":", "").lower()  # any spelling
    for argv in (["permit", ref, "--allow", ECHO_ALL], ["revoke", ref]):
        assert cli(*argv, "--registry", spec) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert f"{waiting} is a pending enrollment request, not an enrolled client" in err
    assert cli("list", "--json", "--registry", spec) == 0
    assert capsys.readouterr().out == before
    assert cli("pending", "--json", "--registry", spec) == 0
    assert [p["fingerprint"] for p in json.loads(capsys.readouterr().out)] == [waiting]
    assert cli("approve", waiting, "--allow", ECHO_ALL, "--registry", spec) == 0


def test_a_new_name_that_reads_as_a_fingerprint_is_refused(
    spec: str, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """A stranger asks to join under alice's fingerprint as its name: once approved, `revoke`
    or `permit` by that name would have reached alice, whose fingerprint matches first."""
    registry = open_registry(spec)
    try:
        alice = registry.enroll(candidate(make_client, "alice"), "alice", [ECHO_ALL])
    finally:
        registry.close()
    name = alice.fingerprint.hex
    request = _request(spec, make_client, name)
    capsys.readouterr()
    assert cli("list", "--json", "--registry", spec) == 0
    before = capsys.readouterr().out
    stranger = make_client("stranger")
    for argv in (
        ["approve", request],
        ["enroll", str(stranger.cert_path), "--name", name],
        ["enroll", str(stranger.cert_path), "--name", name.upper()[:64]],
    ):
        assert cli(*argv, "--registry", spec) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "reads as a certificate fingerprint" in err, err
    assert cli("list", "--json", "--registry", spec) == 0
    assert capsys.readouterr().out == before
    assert cli("approve", request, "--name", "stranger", "--registry", spec) == 0


def test_clients_after_reads_a_range_in_enrollment_order(
    spec: str, make_client: MakeClient
) -> None:
    """Admin.List's pages: clients()'s order, whatever revokes, permits and rotations change
    in place; new certificates at the end; a position the registry does not hold refused."""
    registry = open_registry(spec)
    try:
        first = [registry.enroll(candidate(make_client, f"c{i}"), f"c{i}", []) for i in range(5)]
        registry.revoke("c1")
        registry.permit("c3", [ECHO_ALL])
        registry.rotate(first[2].fingerprint, candidate(make_client, "c2b"), dt.timedelta(0))
        everyone = registry.clients()
        assert [c.fingerprint for c in everyone[:5]] == [c.fingerprint for c in first]
        paged, after = [], None
        for _ in range(10):
            page = registry.clients_after(after, 2)
            assert len(page) <= 2
            if not page:
                break
            paged += page
            after = page[-1].fingerprint
        assert paged == everyone and len(everyone) == 6  # the rows as clients() decodes them
        assert registry.clients_after(None, 1) == everyone[:1]
        assert registry.clients_after(everyone[0].fingerprint, 10) == everyone[1:]
        with pytest.raises(NotFoundError, match="holds no certificate"):
            registry.clients_after(candidate(make_client, "stranger").fingerprint, 2)
    finally:
        registry.close()


def test_clients_after_uses_the_primary_key_and_the_fingerprint_index(spec: str) -> None:
    """A page costs the same at 10 or 200,000 clients: no scan of the table. PostgreSQL picks a
    scan for a tiny table anyway, so it is asked whether an index can serve at all."""
    open_registry(spec).close()
    plans = []
    for statement in (POSITION, PAGE_AFTER):
        explain = "EXPLAIN " + ("" if is_postgres(spec) else "QUERY PLAN ")
        literal = statement.replace("fingerprint = ?", "fingerprint = 'ab'").replace("?", "1")
        if is_postgres(spec):
            with psycopg.connect(spec, autocommit=True) as conn:
                conn.execute("SET enable_seqscan = off")
                rows = conn.execute((explain + literal).encode()).fetchall()
        else:
            with sqlite3.connect(spec) as db:
                rows = db.execute(explain + literal).fetchall()
            db.close()
        plans.append(" ".join(str(value) for row in rows for value in row))
    if is_postgres(spec):
        assert "Index" in plans[0] and "clients_fingerprint_key" in plans[0], plans
        assert "Index Scan using clients_pkey" in plans[1], plans
    else:
        assert "USING COVERING INDEX sqlite_autoindex_clients_1 (fingerprint=?)" in plans[0]
        assert "USING INTEGER PRIMARY KEY (rowid>?)" in plans[1], plans
