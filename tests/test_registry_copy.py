"""`pinrpc-server copy-registry`: SQLite to a real PostgreSQL and back keeps every certificate,
revoked ones included, with their permissions, rotations and pending requests; servers on the
copy admit and refuse as on the original; every refusal, and a copy cut off half-way, leaves
both sides as they were."""

from __future__ import annotations

import datetime as dt
import itertools
import os
import signal
import sqlite3
import subprocess
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import psycopg
import pytest

from pinrpc.identity import KeyPairFiles
from server import cli as server_cli
from server.app import start_server
from server.config import ServerConfig
from server.enrollment import Candidate, check_certificate
from server.registry import is_postgres, open_registry
from tests.conftest import ECHO_ALL, MakeClient, ServerFiles, admitted, eventually
from tests.ports import free_port
from tests.postgres import Postgres
from tests.security.attacker import BIN, serve_process
from tests.test_registry_backends import sql
from tests.test_replicas import stub
from tests.test_revoked_keys import same_key

HOUR = dt.timedelta(hours=1)
_dbs = itertools.count()


def empty_pg(pg: Postgres) -> str:
    return pg.create_database(f"copy{next(_dbs)}")


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, list[str]]:
    """Exit code, stdout and stderr lines of one pinrpc-server command."""
    capsys.readouterr()
    code = server_cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def state(spec: str) -> object:
    """Everything a copy could change, read beside pinrpc: a SQLite file's bytes (None: no
    file), a database's tables and rows."""
    if not is_postgres(spec):
        path = Path(spec)
        return path.read_bytes() if path.exists() else None
    with psycopg.connect(spec) as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables "
                                             "WHERE schemaname = 'public' ORDER BY 1")]  # fmt: skip
        return {t: sorted(map(repr, conn.execute(f"SELECT * FROM {t}"))) for t in tables}  # noqa: S608


Contents = tuple[list[dict[str, object]], list[dict[str, object]], int]


def contents(spec: str) -> Contents:
    """What pinrpc reads from a registry: every certificate, every request, the generation."""
    registry = open_registry(spec, create=False)
    try:
        return (
            [c.as_json() for c in registry.clients()],
            [p.as_json() for p in registry.pending()],
            registry.generation(),
        )
    finally:
        registry.close()


def populate(spec: str, make_client: MakeClient) -> dict[str, KeyPairFiles]:
    """Active, revoked, rotating (two certificates in an overlap) and waiting: one of each."""
    files = {name: make_client(name) for name in ("alice", "bob", "carol", "carol2", "dave")}
    read = {name: candidate_of(f) for name, f in files.items()}
    registry = open_registry(spec)
    try:
        registry.enroll(read["alice"], "alice", [ECHO_ALL])
        registry.enroll(read["bob"], "bob", [ECHO_ALL])
        registry.revoke("bob")
        registry.enroll(read["carol"], "carol", ["/pinrpc.v1.Echo/Echo"])
        registry.rotate(read["carol"].fingerprint, read["carol2"], HOUR)
        registry.request_enrollment(read["dave"], "dave", "ipv4:127.0.0.1:1", HOUR, 10)
    finally:
        registry.close()
    return files


def candidate_of(files: KeyPairFiles) -> Candidate:
    return check_certificate(files.cert_path.read_bytes(), str(files.cert_path))


def test_sqlite_to_postgresql_and_back_keeps_everything(
    tmp_path: Path, pg: Postgres, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    source, url, back = str(tmp_path / "one.db"), empty_pg(pg), str(tmp_path / "back.db")
    populate(source, make_client)
    before = contents(source)
    original = state(source)

    code, out, err = cli(capsys, "copy-registry", source, url)
    assert (code, err) == (0, [])
    assert out.splitlines() == [
        f"copied registry {source} to {url}",
        "  certificates  4: 2 active, 1 retiring, 0 retired, 1 revoked",
        "  requests      1 waiting, 0 expired",
        f"next: start the servers with --registry {url} (or PINRPC_REGISTRY); keep {source} "
        "as a backup, unchanged: a change made to it now is not in the copy",
    ]
    code, _, err = cli(capsys, "copy-registry", url, back)
    assert (code, err) == (0, [])

    copies = [contents(url), contents(back)]
    for copy in copies:
        assert copy[:2] == before[:2]  # certificates, permissions, times, requests: all equal
    # Each copy's generation is past its source's: nothing that watched one sees it go back.
    assert before[2] < copies[0][2] < copies[1][2]
    assert state(source) == original  # only read


def test_servers_on_the_copies_admit_the_enrolled_and_refuse_the_revoked(
    tmp_path: Path,
    pg: Postgres,
    devca: ServerFiles,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source, url, back = str(tmp_path / "one.db"), empty_pg(pg), str(tmp_path / "back.db")
    files = populate(source, make_client)
    assert cli(capsys, "copy-registry", source, url)[0] == 0
    assert cli(capsys, "copy-registry", url, back)[0] == 0

    # The revoked key stays refused by enroll on the copy, under any certificate or name.
    stolen = same_key(files["bob"], "thief")
    for spec in (url, back):
        code, _, err = cli(capsys, "enroll", str(stolen), "--name", "mallory", "--registry", spec)
        assert code == 1
        assert "revoked" in err[0]
        # A new client gets the next row: the copied ones' ids do not collide (PostgreSQL's
        # identity sequence would have, had the ids been copied).
        erin = make_client(f"erin{len(spec)}")
        assert (
            cli(capsys, "enroll", str(erin.cert_path), "--name", "erin", "--registry", spec)[0] == 0
        )

    config = ServerConfig(listen="127.0.0.1:0", cert=devca.cert, key=devca.key, registry=url,
                          poll_interval=0.1, grace=1.0)  # fmt: skip
    with start_server(config) as running:
        target = f"127.0.0.1:{running.port}"
        assert admitted(stub(target, files["alice"], devca))
        assert admitted(stub(target, files["carol"], devca))  # retiring, in its overlap
        assert not admitted(stub(target, files["bob"], devca))
        assert not admitted(stub(target, files["dave"], devca))  # only requested
    with serve_process(devca.cert, devca.key, Path(back), tmp_path / "serve.log") as server:
        target = f"127.0.0.1:{server.port}"
        assert admitted(stub(target, files["alice"], devca))
        assert not admitted(stub(target, files["bob"], devca))


def test_a_copy_into_a_registry_a_server_watches_reaches_it(
    tmp_path: Path, pg: Postgres, devca: ServerFiles, make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    source, url = str(tmp_path / "one.db"), empty_pg(pg)
    files = populate(source, make_client)
    assert cli(capsys, "migrate", "--registry", url)[0] == 0
    config = ServerConfig(listen="127.0.0.1:0", cert=devca.cert, key=devca.key, registry=url,
                          poll_interval=0.1, grace=1.0)  # fmt: skip
    with start_server(config) as running:
        alice = stub(f"127.0.0.1:{running.port}", files["alice"], devca)
        assert not admitted(alice)
        assert cli(capsys, "copy-registry", source, url)[0] == 0
        eventually(lambda: admitted(alice), timeout=3.0)


def test_a_source_a_running_server_has_open_is_refused_until_it_stops(
    tmp_path: Path, devca: ServerFiles, make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """Copied under a running server, DEST missed what the server did next: a client that
    rotated in between was refused by the servers started on DEST (as the old "next" line
    said: stop the servers after the copy)."""
    source, dest = tmp_path / "one.db", str(tmp_path / "new.db")
    populate(str(source), make_client)
    with serve_process(devca.cert, devca.key, source, tmp_path / "serve.log") as server:
        code, out, err = cli(capsys, "copy-registry", str(source), dest)
        assert (code, out, len(err)) == (1, "", 1), err
        assert f"is open in process {server.process.pid}:" in err[0], err
        assert "stop every server on it" in err[0]
        assert not Path(dest).exists()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=15) == 0
    assert cli(capsys, "copy-registry", str(source), dest)[0] == 0  # allowed once it stopped


def test_a_source_a_killed_server_left_is_copied_with_its_last_changes(
    tmp_path: Path, devca: ServerFiles, make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """A killed server holds no lock but leaves its -wal file, which may hold its last
    commits: the copy reads them (it used to be refused until `migrate` closed the file)."""
    source, dest = tmp_path / "one.db", str(tmp_path / "new.db")
    populate(str(source), make_client)
    with serve_process(devca.cert, devca.key, source, tmp_path / "serve.log") as server:
        assert cli(capsys, "revoke", "alice", "--registry", str(source))[0] == 0
        server.process.kill()
        server.process.wait(timeout=10)
    assert Path(f"{source}-wal").exists()
    assert cli(capsys, "copy-registry", str(source), dest)[0] == 0
    copy = open_registry(dest, create=False)
    try:
        assert "alice" in {c.name for c in copy.clients() if c.revoked_at}
    finally:
        copy.close()


def test_a_source_listed_before_is_copied(
    tmp_path: Path, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """`list` reads read-only and leaves the -wal file behind: that is no server (found by
    following the docs: a `list` before the copy made every copy refuse)."""
    source, dest = tmp_path / "one.db", str(tmp_path / "new.db")
    populate(str(source), make_client)
    assert cli(capsys, "list", "--registry", str(source))[0] == 0
    assert Path(f"{source}-wal").exists()
    assert cli(capsys, "copy-registry", str(source), dest)[0] == 0
    assert cli(capsys, "copy-registry", str(source), str(tmp_path / "again.db"))[0] == 0


def refused(capsys: pytest.CaptureFixture[str], source: str, dest: str) -> str:
    """Run a copy that must be refused: one line, exit 1, both sides as they were."""
    before = state(source), state(dest)
    code, out, err = cli(capsys, "copy-registry", source, dest)
    assert (code, out, len(err)) == (1, "", 1), err
    assert (state(source), state(dest)) == before
    return err[0]


def test_a_source_at_an_older_schema_is_refused(
    tmp_path: Path, spec: str, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    source = str(tmp_path / "old.db")
    populate(source, make_client)
    sql(source, "DELETE FROM schema_version WHERE version = 5; DROP INDEX clients_name;")
    message = refused(capsys, source, spec)
    assert f"run `pinrpc-server migrate --registry {source}`" in message
    assert state(spec) in (None, {})  # no DEST was created, not even an empty one


@pytest.mark.parametrize("holds", ["a client", "a request"])
def test_a_dest_that_holds_clients_or_requests_is_refused(
    tmp_path: Path,
    spec: str,
    holds: str,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    source = str(tmp_path / "one.db")
    populate(source, make_client)
    registry = open_registry(spec)
    try:
        erin = candidate_of(make_client("erin"))
        if holds == "a client":
            registry.enroll(erin, "erin", [])
        else:
            registry.request_enrollment(erin, "erin", "ipv4:127.0.0.1:1", HOUR, 10)
    finally:
        registry.close()
    message = refused(capsys, source, spec)
    counts = "1 client certificates and 0" if holds == "a client" else "0 client certificates and 1"
    assert f"already holds {counts} enrollment requests" in message
    assert "never merges or overwrites" in message


@pytest.mark.parametrize("alias", ["same path", "symlink", "postgresql"])
def test_the_same_registry_on_both_sides_is_refused(
    tmp_path: Path, pg: Postgres, alias: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # An empty registry: the refusal must not rest on DEST holding clients.
    if alias == "postgresql":
        source = empty_pg(pg)
        dest = source.replace("127.0.0.1", "localhost")
    else:
        source = dest = str(tmp_path / "one.db")
        if alias == "symlink":
            dest = str(tmp_path / "link.db")
            Path(dest).symlink_to(source)
    assert cli(capsys, "migrate", "--registry", source)[0] == 0
    assert "are the same registry" in refused(capsys, source, dest)


def _unreachable(pg: Postgres) -> str:
    return f"postgresql://pinrpc:s3cret@127.0.0.1:{free_port()}/nowhere"


# What SOURCE is, and what the one line says about it.
SOURCES: dict[str, tuple[Callable[[Path, Postgres], str], str]] = {
    "unreachable postgresql": (lambda tmp, pg: _unreachable(pg), "cannot connect to PostgreSQL"),
    "missing file": (lambda tmp, pg: str(tmp / "missing.db"), "does not exist"),
    "not a database": (
        lambda tmp, pg: _written(tmp / "junk.db", b"not sqlite " * 100),
        "file is not a database",
    ),
    "another application's": (
        lambda tmp, pg: _foreign(tmp / "app.db"),
        "is not a pinrpc registry: it holds another application's tables (clients); check SOURCE",
    ),
    "empty file": (lambda tmp, pg: _written(tmp / "empty.db", b""), "holds no clients yet"),
    "fifo": (lambda tmp, pg: _fifo(tmp / "fifo.db"), "is not a regular file; check SOURCE"),
}


def _written(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _foreign(path: Path) -> str:
    sql(str(path), "CREATE TABLE clients (id INTEGER PRIMARY KEY, email TEXT);")
    return str(path)


def _fifo(path: Path) -> str:
    os.mkfifo(path)
    return str(path)


@pytest.mark.parametrize("kind", list(SOURCES))
def test_a_source_that_cannot_be_read_as_a_registry_is_refused(
    tmp_path: Path, spec: str, pg: Postgres, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    make, says = SOURCES[kind]
    source = make(tmp_path, pg)
    readable = kind not in ("fifo", "unreachable postgresql")
    before = state(source) if readable else None
    code, out, err = cli(capsys, "copy-registry", source, spec)
    assert (code, out, len(err)) == (1, "", 1), err
    assert says in err[0]
    assert "s3cret" not in err[0]
    assert state(spec) in (None, {})  # no DEST was created
    if readable:
        assert state(source) == before


def test_an_unreachable_dest_is_refused_without_its_password(
    tmp_path: Path, pg: Postgres, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    source = str(tmp_path / "one.db")
    populate(source, make_client)
    dest = _unreachable(pg)
    before = state(source)
    code, out, err = cli(capsys, "copy-registry", source, dest)
    assert (code, out, len(err)) == (1, "", 1), err
    assert "cannot connect to PostgreSQL postgresql://pinrpc@127.0.0.1:" in err[0]
    assert "s3cret" not in err[0]
    assert state(source) == before


# A row DEST's own rules refuse: the request, copied after every client went in.
REFUSE_DAVE = {
    "sqlite": "CREATE TRIGGER no_dave BEFORE INSERT ON pending WHEN NEW.name = 'dave' "
    "BEGIN SELECT RAISE(ABORT, 'no_dave'); END;",
    "postgresql": "ALTER TABLE pending ADD CONSTRAINT no_dave CHECK (name <> 'dave')",
}


def test_a_copy_that_fails_half_way_leaves_dest_as_it_was(
    tmp_path: Path, spec: str, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    source = str(tmp_path / "one.db")
    populate(source, make_client)
    assert cli(capsys, "migrate", "--registry", spec)[0] == 0
    sql(spec, REFUSE_DAVE["postgresql" if is_postgres(spec) else "sqlite"])
    before = contents(spec)
    message = refused(capsys, source, spec)
    assert "no_dave" in message
    assert contents(spec) == before  # no client, no request, the same generation


def test_a_copy_killed_half_way_leaves_dest_as_it_was(
    tmp_path: Path, pg: Postgres, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    source, url = str(tmp_path / "one.db"), empty_pg(pg)
    populate(source, make_client)
    assert cli(capsys, "migrate", "--registry", url)[0] == 0
    # The copy's inserts pause here, inside its transaction, long enough to kill it.
    sql(url, "CREATE FUNCTION pause() RETURNS trigger LANGUAGE plpgsql AS "
             "$$ BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$; "
             "CREATE TRIGGER pause BEFORE INSERT ON clients FOR EACH STATEMENT "
             "EXECUTE FUNCTION pause();")  # fmt: skip
    before = state(url), contents(url)
    copy = subprocess.Popen([str(BIN / "pinrpc-server"), "copy-registry", source, url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:

        def pausing() -> bool:
            with psycopg.connect(pg.url()) as conn:
                rows = conn.execute("SELECT 1 FROM pg_stat_activity "
                                    "WHERE wait_event = 'PgSleep'").fetchall()  # fmt: skip
            return bool(rows)

        eventually(pausing, timeout=15.0)
        copy.send_signal(signal.SIGKILL)
        copy.wait(timeout=10)
    finally:
        if copy.poll() is None:
            copy.kill()
            copy.wait(timeout=10)
    eventually(lambda: not pausing(), timeout=10.0)  # its backend rolled back and ended
    assert (state(url), contents(url)) == before


# A row SOURCE holds that DEST's schema refuses, without preparing DEST (a new file or an empty
# database has no table to prepare): SQLite kept a text in an integer column, or took a second
# current certificate for a name once the index that forbids it was dropped.
TEXT_IN_AN_INTEGER = "UPDATE clients SET has_key_ids = 'yes' WHERE name = 'alice'"
TWO_CURRENT_ALICES = (
    "DROP INDEX clients_current_name; INSERT INTO clients (name, fingerprint, cert_pem, "
    "spki_sha256, subject, has_key_ids, allowed_methods, enrolled_at, not_after) SELECT name, "
    "lower(hex(randomblob(32))), cert_pem, spki_sha256, subject, has_key_ids, allowed_methods, "
    "enrolled_at, not_after FROM clients WHERE name = 'alice';"
)


def test_a_failed_copy_leaves_an_empty_database_without_a_schema(
    tmp_path: Path, pg: Postgres, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    source, url = str(tmp_path / "one.db"), empty_pg(pg)
    populate(source, make_client)
    sql(source, TEXT_IN_AN_INTEGER)
    assert state(url) == {}
    message = refused(capsys, source, url)  # DEST's state unchanged: no table at all
    assert "bigint" in message
    assert "nothing was changed" in message
    # Still an empty database: a good copy goes in, schema and rows together.
    sql(source, "UPDATE clients SET has_key_ids = 1 WHERE name = 'alice'")
    assert cli(capsys, "copy-registry", source, url)[0] == 0
    assert contents(url)[:2] == contents(source)[:2]


def companions(path: Path) -> list[str]:
    """The registry file and the -wal, -shm and -journal files SQLite may make beside it."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))


def test_a_failed_copy_into_a_new_file_leaves_no_file_behind(
    tmp_path: Path, spec: str, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    source, dest = spec, tmp_path / "new.db"
    populate(source, make_client)
    sql(source, TWO_CURRENT_ALICES.replace("lower(hex(randomblob(32)))", "md5(random()::text)")
        if is_postgres(source) else TWO_CURRENT_ALICES)  # fmt: skip
    message = refused(capsys, source, str(dest))  # DEST's state: no file before, none after
    assert "clients.name" in message  # refused by DEST's index, while it was being filled
    assert companions(dest) == []


def test_a_failed_copy_never_removes_an_existing_dest_file(
    tmp_path: Path, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    source, dest = str(tmp_path / "one.db"), tmp_path / "two.db"
    populate(source, make_client)
    sql(source, TWO_CURRENT_ALICES)
    assert cli(capsys, "migrate", "--registry", str(dest))[0] == 0
    refused(capsys, source, str(dest))  # the same bytes before and after
    assert companions(dest) == ["two.db"]


def test_a_failed_copy_leaves_an_empty_dest_file_empty(
    tmp_path: Path, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing 0-byte DEST got its schema as it was opened, before the copy's transaction:
    a failed copy left a registry with no clients in it (the PostgreSQL side's empty database
    stays empty already)."""
    source, dest = str(tmp_path / "one.db"), tmp_path / "two.db"
    populate(source, make_client)
    sql(source, TWO_CURRENT_ALICES)
    dest.touch(mode=0o600)
    assert "clients.name" in refused(capsys, source, str(dest))  # still 0 bytes
    assert companions(dest) == ["two.db"]
    # Still an empty file: a good copy goes in, schema and rows together, in WAL mode.
    sql(source, "DELETE FROM clients WHERE id = (SELECT max(id) FROM clients)")
    assert cli(capsys, "copy-registry", source, str(dest))[0] == 0
    assert contents(str(dest))[:2] == contents(source)[:2]
    with closing(sqlite3.connect(dest)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_copy_into_a_new_file_is_owner_only(
    tmp_path: Path, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    source, dest = str(tmp_path / "one.db"), tmp_path / "two.db"
    populate(source, make_client)
    old = os.umask(0)  # no mode below comes from the umask
    try:
        assert cli(capsys, "copy-registry", source, str(dest))[0] == 0
    finally:
        os.umask(old)
    assert dest.stat().st_mode & 0o777 == 0o600
