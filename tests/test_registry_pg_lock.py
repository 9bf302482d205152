"""copy-registry refuses a PostgreSQL SOURCE that a running `pinrpc-server serve` uses, as it
refuses a SQLite one a server has open: every server holds a shared advisory lock on its LISTEN
connection (taken again when that reconnects), and the copy counts the holders in pg_locks."""

from __future__ import annotations

import signal
from pathlib import Path

import psycopg
import pytest

from server.registry_pg import SERVER_LOCK_KEY
from tests.conftest import MakeClient, ServerFiles, admitted, eventually
from tests.postgres import Postgres
from tests.security.attacker import serve_process
from tests.test_pg_ops import role
from tests.test_registry_copy import cli, empty_pg, populate, state
from tests.test_replicas import stub


def holders(url: str) -> list[int]:
    """The backend pids of the sessions holding the servers' lock, read beside pinrpc."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                            "AND ((classid::bigint << 32) | objid::bigint) = %s",
                            (SERVER_LOCK_KEY,)).fetchall()  # fmt: skip
    return [int(pid) for (pid,) in rows]


def refused_in_use(capsys: pytest.CaptureFixture[str], source: str, dest: str, servers: int) -> str:
    before = state(source)
    code, out, err = cli(capsys, "copy-registry", source, dest)
    assert (code, out, len(err)) == (1, "", 1), err
    s = "s" if servers > 1 else ""
    says = f"is in use by {servers} running pinrpc server{s} (PostgreSQL connection{s} pid "
    assert says in err[0], err
    assert "stop every server on it, then copy" in err[0]
    assert state(dest) is None  # no DEST was created
    assert state(source) == before
    return err[0]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_a_postgresql_source_a_running_server_uses_is_refused_until_it_stops(
    tmp_path: Path, pg: Postgres, devca: ServerFiles, make_client: MakeClient,
    capsys: pytest.CaptureFixture[str], stop: signal.Signals,
) -> None:  # fmt: skip
    """Copied under a running server, DEST missed what the server did next (a rotation, a
    request, a revocation through `pinrpc admin`): a PostgreSQL SOURCE was never checked."""
    url, dest = empty_pg(pg), str(tmp_path / "new.db")
    populate(url, make_client)
    with (
        serve_process(devca.cert, devca.key, url, tmp_path / "a.log") as a,
        serve_process(devca.cert, devca.key, url, tmp_path / "b.log") as b,
    ):
        eventually(lambda: len(holders(url)) == 2, timeout=5.0)  # each takes it as it starts
        message = refused_in_use(capsys, url, dest, servers=2)
        assert " from 127.0.0.1:" in message  # the servers' addresses: this role may see them
        a.process.send_signal(stop)
        a.process.wait(timeout=15)
        eventually(lambda: len(holders(url)) == 1, timeout=5.0)
        refused_in_use(capsys, url, dest, servers=1)
        b.process.send_signal(stop)
        b.process.wait(timeout=15)
    eventually(lambda: not holders(url), timeout=5.0)
    assert cli(capsys, "copy-registry", url, dest)[0] == 0  # allowed once they stopped


def test_a_server_that_lost_and_regained_its_database_is_still_seen(
    tmp_path: Path, pg: Postgres, devca: ServerFiles, make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    url, dest = empty_pg(pg), str(tmp_path / "new.db")
    populate(url, make_client)
    with serve_process(devca.cert, devca.key, url, tmp_path / "serve.log"):
        eventually(lambda: len(holders(url)) == 1, timeout=5.0)
        (before,) = holders(url)
        pg.stop()  # every session ends, the lock with it
        pg.start()
        took = eventually(lambda: len(holders(url)) == 1, timeout=10.0)  # its LISTEN reconnected
        assert holders(url) != [before]  # a new session took it
        with capsys.disabled():  # cli() captures the rest
            print(f"measured lock_retaken_after_restart_s {took:.2f}")
        refused_in_use(capsys, url, dest, servers=1)


def test_a_role_that_may_not_see_the_servers_addresses_is_refused_too(
    tmp_path: Path, pg: Postgres, devca: ServerFiles, make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """pg_locks is readable by every role; pg_stat_activity hides other roles' addresses."""
    url, dest = empty_pg(pg), str(tmp_path / "new.db")
    populate(url, make_client)
    reader = role(url, "copier", "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
    with serve_process(devca.cert, devca.key, url, tmp_path / "serve.log"):
        eventually(lambda: len(holders(url)) == 1, timeout=5.0)
        message = refused_in_use(capsys, reader, dest, servers=1)
        assert " from " not in message
    eventually(lambda: not holders(url), timeout=5.0)
    assert cli(capsys, "copy-registry", reader, dest)[0] == 0


def test_a_session_holding_the_lock_exclusively_never_stops_a_server(
    tmp_path: Path, pg: Postgres, devca: ServerFiles, make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The server tries the lock and never waits for it: it starts, serves and hears changes."""
    url = empty_pg(pg)
    populate(url, make_client)
    erin = make_client("erin")
    with psycopg.connect(url, autocommit=True) as squatter:
        squatter.execute("SELECT pg_advisory_lock(%s)", (SERVER_LOCK_KEY,))
        with serve_process(devca.cert, devca.key, url, tmp_path / "serve.log") as server:
            eventually(lambda: "copy-registry will not see this server" in server.log.read_text(),
                       timeout=5.0)  # fmt: skip
            erin_stub = stub(f"127.0.0.1:{server.port}", erin, devca)
            assert not admitted(erin_stub)
            enrolled = cli(capsys, "enroll", str(erin.cert_path), "--name", "erin",
                           "--registry", url)  # fmt: skip
            assert enrolled[0] == 0
            eventually(lambda: admitted(erin_stub), timeout=3.0)
