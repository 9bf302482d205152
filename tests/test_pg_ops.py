"""PostgreSQL as the registry in operation, against a real cluster: roles that may not read or
write are told what to grant; a change whose backend is terminated part-way changes nothing
and says so in one line; `serve` waits out a database slow to answer, within a bound."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
import pytest

from pinrpc.errors import RegistryError
from pinrpc.identity import Fingerprint, KeyPairFiles
from server import cli as server_cli
from server import registry_pg
from server.app import start_server
from server.config import ServerConfig
from server.enrollment import Candidate, check_certificate
from server.registry import open_registry
from server.registry_pg import PostgresRegistry
from tests.conftest import MakeClient, ServerFiles, admitted, eventually
from tests.postgres import Postgres
from tests.security.attacker import BIN, ROOT
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
    assert err[0].endswith("nothing was changed")
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


@contextmanager
def blocked_then_terminated(url: str, lock: str) -> Iterator[list[int]]:
    """Hold a row lock the change needs part-way through; terminate the change's backend
    once it waits for it. Yields the list that receives the terminated backend's pid."""
    killed: list[int] = []
    holder = psycopg.connect(url)
    assert holder.execute(lock).fetchall(), "nothing to lock"

    def terminate() -> None:
        deadline = time.monotonic() + 10
        with psycopg.connect(url, autocommit=True) as admin:
            while not killed and time.monotonic() < deadline:
                rows = admin.execute(
                    "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'pinrpc-server' AND wait_event_type = 'Lock'"
                ).fetchall()
                killed.extend(pid for pid, _ in rows)
                time.sleep(0.05)

    killer = threading.Thread(target=terminate)
    killer.start()
    try:
        yield killed
    finally:
        killer.join()
        holder.rollback()
        holder.close()


ALICE_ROW = "SELECT 1 FROM clients WHERE name = 'alice' FOR UPDATE"
# change -> (the row lock it waits for part-way, its command line given the URL and new key)
CHANGES: dict[str, tuple[str, Callable[[str, KeyPairFiles], list[str]]]] = {
    "revoke": (ALICE_ROW, lambda url, new: ["revoke", "alice", "--registry", url]),
    "re-key": (
        ALICE_ROW,
        lambda url, new: [
            "enroll",
            str(new.cert_path),
            "--name=alice",
            "--replace",
            "--registry",
            url,
        ],
    ),
    "approve": (
        "SELECT 1 FROM pending FOR UPDATE",
        lambda url, new: ["approve", candidate(new).fingerprint.hex, "--registry", url],
    ),
}


def candidate(files: KeyPairFiles) -> Candidate:
    return check_certificate(files.cert_path.read_bytes(), str(files.cert_path))


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_change_whose_backend_is_terminated_changes_nothing_and_says_so_in_one_line(
    change: str, url: str, make_client: MakeClient
) -> None:
    enroll(url, make_client("alice"), "alice")
    new = make_client("newkey")
    registry = open_registry(url)
    try:
        registry.request_enrollment(candidate(new), "carol", "ipv4:127.0.0.1:1", dt.timedelta(1), 9)
    finally:
        registry.close()
    before = snapshot(url)
    lock, argv = CHANGES[change]
    with blocked_then_terminated(url, lock) as killed:
        # The real program: pytest's log capture would hide a stray warning on stderr.
        done = subprocess.run(
            [str(BIN / "pinrpc-server"), *argv(url, new)],
            capture_output=True, text=True, timeout=20, check=False,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
    assert killed, "the change never waited for the lock"
    assert done.returncode == 1
    err = done.stderr.splitlines()
    assert len(err) == 1, err  # the registry used to log the lost connection there too
    assert "terminating connection due to administrator command; nothing was changed" in err[0]
    assert "CONTEXT" not in err[0]
    assert snapshot(url) == before


def test_a_rotation_whose_backend_is_terminated_leaves_the_old_certificate_current(
    url: str, make_client: MakeClient
) -> None:
    alice, new = make_client("alice"), make_client("alice2")
    enroll(url, alice, "alice")
    before = snapshot(url)
    registry = PostgresRegistry(url)
    try:
        current, successor = candidate(alice).fingerprint, candidate(new)
        with (
            blocked_then_terminated(url, ALICE_ROW),
            pytest.raises(RegistryError, match="nothing was changed"),
        ):
            registry.rotate(current, successor, dt.timedelta(hours=1))
        assert snapshot(url) == before
        # The same registry object reconnects for the next change, after its backoff.
        eventually(lambda: rotated(registry, current, successor), timeout=3.0)
    finally:
        registry.close()


def rotated(registry: PostgresRegistry, current: Fingerprint, successor: Candidate) -> bool:
    try:
        registry.rotate(current, successor, dt.timedelta(hours=1))
    except RegistryError:  # "unreachable ...; retrying in 0.1 s"
        return False
    return True


def cluster_pids(pg: Postgres) -> list[int]:
    postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
    children = subprocess.run(
        ["pgrep", "-P", str(postmaster)], capture_output=True, text=True, check=False
    ).stdout.split()
    return [postmaster, *map(int, children)]


def signal_all(pids: list[int], signum: signal.Signals) -> None:
    for pid in pids:
        # A backend listed a moment ago (the last command's) may have ended since: raising
        # here left the processes already stopped stopped, and every later test timed out.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


@contextmanager
def stopped(pg: Postgres, seconds: float) -> Iterator[None]:
    """SIGSTOP every process of the cluster; SIGCONT after ``seconds`` (and always on exit)."""
    pids = cluster_pids(pg)
    signal_all(pids, signal.SIGSTOP)
    resume = threading.Timer(seconds, signal_all, (pids, signal.SIGCONT))
    resume.start()
    try:
        yield
    finally:
        resume.cancel()
        signal_all(pids, signal.SIGCONT)


def test_serve_waits_out_a_database_that_answers_after_the_connect_timeout(
    pg: Postgres, url: str, make_client: MakeClient, devca: ServerFiles
) -> None:
    alice = make_client("alice")
    enroll(url, alice, "alice")
    config = ServerConfig(listen="127.0.0.1:0", cert=devca.cert, key=devca.key, registry=url)
    start = time.monotonic()
    with stopped(pg, 4.0), start_server(config) as running:
        took = time.monotonic() - start
        assert admitted(stub(f"127.0.0.1:{running.port}", alice, devca))
    print(f"measured start_after_stopped_db_s {took:.2f}")
    assert 4.0 <= took < 7.0


def test_a_database_that_never_answers_fails_in_bounded_time_and_a_refusal_at_once(
    pg: Postgres, url: str, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    enroll(url, make_client("alice"), "alice")
    start = time.monotonic()
    with stopped(pg, 15.0):
        code, err = cli(capsys, "list", "--registry", url)
    took = time.monotonic() - start
    assert code == 1
    assert len(err) == 1
    assert "connection timeout expired (3 attempts)" in err[0]
    assert 8.5 <= took < 12.0
    pg.stop()
    try:
        start = time.monotonic()
        code, err = cli(capsys, "list", "--registry", url)
        assert time.monotonic() - start < 1.0
    finally:
        pg.start()
    assert code == 1
    assert len(err) == 1
    assert "Connection refused" in err[0]
    assert "attempts" not in err[0]


def test_a_hung_database_is_noticed_while_serve_keeps_the_last_good_set(
    pg: Postgres,
    url: str,
    make_client: MakeClient,
    devca: ServerFiles,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    enroll(url, alice, "alice")
    config = ServerConfig(
        listen="127.0.0.1:0", cert=devca.cert, key=devca.key, registry=url, poll_interval=0.2
    )

    def noticed() -> bool:
        return any("registry unreadable" in r.getMessage() for r in caplog.records)

    with start_server(config) as running:
        target = f"127.0.0.1:{running.port}"
        with stopped(pg, 20.0):
            # statement_timeout is the server's: stopped, it never fires, and its kernel
            # still answers TCP keepalives. The watcher used to wait for it forever, silent.
            start = time.monotonic()
            while not noticed() and time.monotonic() - start < 12.0:
                assert admitted(stub(target, alice, devca))
                time.sleep(0.2)
            took = time.monotonic() - start
        print(f"measured hung_database_noticed_s {took:.2f}")
        assert noticed()
        enroll(url, bob, "bob")
        eventually(lambda: admitted(stub(target, bob, devca)), timeout=5.0)


@contextmanager
def hung_at_listen(
    pg: Postgres, url: str
) -> Iterator[tuple[str, threading.Event, Callable[[], None]]]:
    """``url`` through a relay that stops the whole cluster (SIGSTOP) just before it passes
    on the first LISTEN: PostgreSQL hangs at that moment, its kernel still acknowledging.
    Yields the relay's URL, an event set once it has, and what resumes the cluster (SIGCONT,
    done on exit too)."""
    listening = socket.create_server(("127.0.0.1", 0))
    relayed = url.replace(f":{pg.port}/", f":{listening.getsockname()[1]}/")
    hung = threading.Event()
    pids: list[int] = []
    sockets: list[socket.socket] = [listening]

    def pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if b"LISTEN " in data and not hung.is_set():
                    pids.extend(cluster_pids(pg))
                    signal_all(pids, signal.SIGSTOP)
                    hung.set()
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = listening.accept()
                server = socket.create_connection(("127.0.0.1", pg.port))
                sockets.extend((client, server))
                for ends in ((client, server), (server, client)):
                    threading.Thread(target=pump, args=ends, daemon=True).start()

    def resume() -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # a backend cut off, then gone
                os.kill(pid, signal.SIGCONT)

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield relayed, hung, resume
    finally:
        resume()
        for sock in sockets:
            sock.close()


def test_a_database_that_hangs_at_the_listen_does_not_hold_the_watcher(
    pg: Postgres, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LISTEN had no bound, unlike every read and change: the watcher waited for it for as
    # long as PostgreSQL hung, and polled nothing meanwhile.
    monkeypatch.setattr(registry_pg, "ANSWER_LIMIT", 2.0)
    with hung_at_listen(pg, url) as (relayed, hung, resume):
        registry = PostgresRegistry(relayed)
        try:
            waiter = threading.Thread(target=registry.wait_for_change, args=(0.2,), daemon=True)
            start = time.monotonic()
            waiter.start()
            assert hung.wait(10)
            waiter.join(timeout=registry_pg.ANSWER_LIMIT + 3.0)
            took = time.monotonic() - start
            assert not waiter.is_alive(), "the watcher still waits for its LISTEN"
        finally:
            resume()
            waiter.join(timeout=30)
        print(f"measured hung_listen_returned_s {took:.2f}")
        assert registry._listener is None  # cut off, closed, not kept
        # The allow twin: once PostgreSQL answers, the watcher listens again and is woken.
        time.sleep(0.3)  # the listener's backoff after one failure
        registry.wait_for_change(5.0)
        assert registry._listener is not None
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"NOTIFY {registry_pg.CHANNEL}")
        start = time.monotonic()
        registry.wait_for_change(5.0)
        assert time.monotonic() - start < 2.0
        registry.close()
