"""Two replicas sharing one real PostgreSQL 15: they admit and refuse the same clients, a
revocation reaches the other replica's open channels within 1 s, an outage keeps the last
known set and refuses changes, and a balancer in front hides a rolling restart."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import psycopg
import pytest

from pinrpc.channel import secure_channel
from pinrpc.identity import KeyPairFiles
from pinrpc.v1 import echo_pb2_grpc
from server import cli as server_cli
from server.app import RunningServer, start_server
from server.config import ServerConfig
from tests.conftest import (
    SERVER_NAME,
    MakeClient,
    ServerFiles,
    admitted,
    code_of,
    eventually,
    whoami,
)
from tests.ports import free_port
from tests.postgres import Postgres, require_tool, running_postgres

DENIED = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


class Replica:
    """One pinrpc server; ``restart`` keeps its port, as a process manager would."""

    def __init__(self, devca: ServerFiles, registry: str, port: int = 0) -> None:
        self.devca, self.registry, self.port = devca, registry, port
        self._stack: ExitStack | None = None
        self.running: RunningServer | None = None

    def start(self) -> None:
        config = ServerConfig(
            listen=f"127.0.0.1:{self.port}",
            cert=self.devca.cert,
            key=self.devca.key,
            registry=self.registry,
            poll_interval=0.2,
            grace=1.0,
        )
        self._stack = ExitStack()
        self.running = self._stack.enter_context(start_server(config))
        self.port = self.running.port

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def stub(self, files: KeyPairFiles) -> echo_pb2_grpc.EchoStub:
        return stub(f"127.0.0.1:{self.port}", files, self.devca)


def stub(
    target: str,
    files: KeyPairFiles,
    devca: ServerFiles,
    options: list[tuple[str, object]] | None = None,
) -> echo_pb2_grpc.EchoStub:
    channel = secure_channel(
        target, files.cert_path, files.key_path, devca.ca_path, SERVER_NAME, options=options or []
    )
    return echo_pb2_grpc.EchoStub(channel)


_dbs = itertools.count()


@pytest.fixture
def pg() -> Iterator[Postgres]:
    with running_postgres() as cluster:
        yield cluster


@pytest.fixture
def url(pg: Postgres) -> str:
    return pg.create_database(f"replicas{next(_dbs)}")


@pytest.fixture
def replicas(devca: ServerFiles, url: str) -> Iterator[tuple[Replica, Replica]]:
    pair = (Replica(devca, url), Replica(devca, url))
    try:
        for replica in pair:
            replica.start()
        yield pair
    finally:
        for replica in pair:
            replica.stop()


def cli(*argv: str) -> int:
    return server_cli.main(list(argv))


def enroll(url: str, files: KeyPairFiles, name: str) -> None:
    assert cli("enroll", str(files.cert_path), "--name", name, "--registry", url) == 0


def test_enroll_reaches_both_replicas_and_revoke_closes_the_other(
    replicas: tuple[Replica, Replica],
    url: str,
    make_client: MakeClient,
) -> None:
    a, b = replicas
    alice, eve = make_client("alice"), make_client("eve")
    assert not admitted(a.stub(alice))
    assert not admitted(b.stub(alice))
    enroll(url, alice, "alice")
    took = eventually(lambda: admitted(a.stub(alice)) and admitted(b.stub(alice)), timeout=10)
    print(f"measured enroll_propagation_s {took:.3f}")
    # Nobody else got in.
    assert not admitted(a.stub(eve))
    assert not admitted(b.stub(eve))
    # Open channels to both replicas, then revoke through the admin CLI.
    open_a, open_b = a.stub(alice), b.stub(alice)
    assert whoami(open_a).name == whoami(open_b).name == "alice"
    assert cli("revoke", "alice", "--registry", url) == 0
    took = eventually(lambda: not admitted(open_b), timeout=1.0)
    print(f"measured revoke_propagation_s {took:.3f}")
    assert code_of(lambda: whoami(open_b)) in DENIED
    eventually(lambda: not admitted(open_a), timeout=1.0)
    assert not admitted(b.stub(alice))


def test_outage_keeps_last_known_set_refuses_changes_and_catches_up(
    replicas: tuple[Replica, Replica],
    pg: Postgres,
    url: str,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    a, b = replicas
    alice, bob, carol = make_client("alice"), make_client("bob"), make_client("carol")
    enroll(url, alice, "alice")
    enroll(url, bob, "bob")
    eventually(lambda: admitted(a.stub(bob)) and admitted(b.stub(bob)), timeout=10)
    assert cli("revoke", "bob", "--registry", url) == 0
    eventually(lambda: admitted(a.stub(alice)) and admitted(b.stub(alice)), timeout=10)
    eventually(lambda: not admitted(a.stub(bob)) and not admitted(b.stub(bob)), timeout=1.0)

    pg.stop()
    deadline = time.monotonic() + 1.5  # several polls of every replica's watcher
    while time.monotonic() < deadline:
        for replica in replicas:
            assert admitted(replica.stub(alice)), "a known client was refused during the outage"
            assert not admitted(replica.stub(bob)), "a revoked client got in during the outage"
    capsys.readouterr()
    assert cli("enroll", str(carol.cert_path), "--name", "carol", "--registry", url) == 1
    assert cli("revoke", "alice", "--registry", url) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert all("cannot connect to PostgreSQL postgresql://pinrpc@127.0.0.1" in e for e in err)

    pg.start()
    enroll(url, carol, "carol")
    took = eventually(lambda: admitted(a.stub(carol)) and admitted(b.stub(carol)), timeout=3.0)
    print(f"measured catch_up_after_restart_s {took:.3f}")
    for replica in replicas:
        assert not admitted(replica.stub(bob)), "a revoked client got in through the reconnect"
        assert admitted(replica.stub(alice))


def test_registry_rolled_back_cannot_readmit_a_revoked_client(
    replicas: tuple[Replica, Replica], url: str, make_client: MakeClient
) -> None:
    """A restore from an old backup un-revokes nobody a running replica saw revoked."""
    alice, bob = make_client("alice"), make_client("bob")
    enroll(url, alice, "alice")
    enroll(url, bob, "bob")
    for replica in replicas:
        eventually(lambda r=replica: admitted(r.stub(bob)), timeout=10)  # type: ignore[misc]
    assert cli("revoke", "bob", "--registry", url) == 0
    for replica in replicas:  # a replica that never saw the revocation cannot remember it
        eventually(lambda r=replica: not admitted(r.stub(bob)), timeout=1.0)  # type: ignore[misc]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE clients SET revoked_at = NULL")  # what the old copy says
        conn.execute("UPDATE meta SET value = value - 1 WHERE key = 'generation'")
    carol = make_client("carol")
    enroll(url, carol, "carol")  # and the registry moves on from there
    for replica in replicas:
        eventually(lambda r=replica: admitted(r.stub(carol)), timeout=10)  # type: ignore[misc]
        assert admitted(replica.stub(alice))
        assert not admitted(replica.stub(bob))


RETRY = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "pinrpc.v1.Echo"}],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"],
                },
            }
        ]
    }
)

HAPROXY_CONFIG = """\
global
    maxconn 256
defaults
    mode tcp
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    retries 3
    option redispatch
frontend grpc
    bind 127.0.0.1:{port}
    default_backend replicas
backend replicas
    balance roundrobin
    server a 127.0.0.1:{a}
    server b 127.0.0.1:{b}
"""


@pytest.mark.slow
def test_balancer_hides_a_rolling_restart(
    replicas: tuple[Replica, Replica],
    url: str,
    devca: ServerFiles,
    make_client: MakeClient,
    tmp_path: Path,
) -> None:
    found = shutil.which("haproxy")
    haproxy = require_tool(Path(found) if found else None, "HAProxy (Debian package haproxy)")
    a, b = replicas
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(port=port, a=a.port, b=b.port))
    with (tmp_path / "haproxy.log").open("wb") as log:
        proc = subprocess.Popen([str(haproxy), "-f", str(config), "-db"], stdout=log, stderr=log)
    try:
        alice, eve = make_client("alice"), make_client("eve")
        enroll(url, alice, "alice")
        target = f"127.0.0.1:{port}"
        options: list[tuple[str, object]] = [("grpc.service_config", RETRY)]
        client = stub(target, alice, devca, options)
        eventually(lambda: admitted(client), timeout=2.0)
        # TLS passes through: the balancer holds no key, an unenrolled client stays out.
        assert not admitted(stub(target, eve, devca, options))

        ok, failed = 0, []
        stop = threading.Event()

        def load() -> None:
            nonlocal ok
            while not stop.is_set():
                try:
                    whoami(client)
                    ok += 1
                except grpc.RpcError as exc:
                    failed.append(exc.code())
                time.sleep(0.01)

        def ten_more() -> None:
            # Counted calls, not fixed sleeps: a slower machine made too few to tell anything.
            ended = ok + len(failed)
            eventually(lambda: ok + len(failed) >= ended + 10, timeout=10)

        thread = threading.Thread(target=load)
        thread.start()
        try:
            for replica in replicas:  # one of them carries the client's connection
                ten_more()
                replica.stop()
                ten_more()  # while it is down
                replica.start()
            ten_more()
        finally:
            stop.set()
            thread.join(10)
        assert failed == []
    finally:
        proc.terminate()
        proc.wait(5)
