"""--tls-reload handover: TLS changes reach a new listener built off the handshake path."""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

import server.warm
from pinrpc.identity import KeyPairFiles
from pinrpc.v1 import echo_pb2, echo_pb2_grpc
from server.app import start_server
from server.auth import AuthInterceptor
from server.config import ServerConfig
from server.listener import Listener, Options, steer_to_newest
from server.registry import open_registry
from server.services import EchoService
from server.trust import TrustWatcher
from server.warm import WarmSet
from tests.certs import certbot_link
from tests.conftest import (
    ECHO_ALL,
    SERVER_NAME,
    Connect,
    MakeClient,
    ServerFiles,
    code_of,
    enroll,
    eventually,
    revoke,
    whoami,
)
from tests.ports import free_port
from tests.test_health import SERVING, check
from tests.test_server_cert import served_serial

REQUEST = echo_pb2.EchoRequest(message="x")
MAX_AGE = 1.0  # seconds; production default is 120
FRESH_CONNECTION = ("grpc.use_local_subchannel_pool", 1)


def handover_config(registry: Path, cert: Path, key: Path) -> ServerConfig:
    return ServerConfig(
        "127.0.0.1:0", cert, key, str(registry), poll_interval=0.1, grace=1.0,
        tls_reload="handover", max_connection_age=MAX_AGE,
    )  # fmt: skip


@pytest.fixture
def handover(devca: ServerFiles, registry: Path) -> Iterator[Connect]:
    with start_server(handover_config(registry, devca.cert, devca.key)) as running:
        yield Connect(running, devca)


def fresh_call(connect: Connect | tuple[str, Path], who: KeyPairFiles) -> echo_pb2.EchoResponse:
    """One call on a new connection (grpc would otherwise reuse a shared one)."""
    if isinstance(connect, Connect):
        target, ca = connect.target, connect.devca.ca_path
    else:
        target, ca = connect
    creds = grpc.ssl_channel_credentials(
        ca.read_bytes(), who.key_path.read_bytes(), who.cert_path.read_bytes()
    )
    options = [("grpc.ssl_target_name_override", SERVER_NAME), FRESH_CONNECTION]
    with grpc.secure_channel(target, creds, options=options) as channel:
        reply: echo_pb2.EchoResponse = echo_pb2_grpc.EchoStub(channel).Echo(REQUEST, timeout=5)
    return reply


def admitted(connect: Connect | tuple[str, Path], who: KeyPairFiles) -> bool:
    try:
        return fresh_call(connect, who).caller != ""
    except grpc.RpcError:
        return False


def listener(connect: Connect) -> Listener:
    return connect.server.listener


def settle(connect: Connect) -> int:
    """Wait for any handover the change needs (the builder thread may be doing it already)."""
    listener(connect).refresh()
    assert not listener(connect).stale()
    return listener(connect).handovers


def test_enrollment_is_handed_to_a_new_listener(handover: Connect, make_client: MakeClient) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    handover.enroll(alice, "alice", ECHO_ALL)
    before = settle(handover)
    open_channel = handover.stub(alice.cert_path, alice.key_path)
    assert whoami(open_channel).name == "alice"
    assert code_of(lambda: fresh_call(handover, bob)) == grpc.StatusCode.UNAVAILABLE
    draining = listener(handover).draining

    handover.enroll(bob, "bob", ECHO_ALL)
    assert settle(handover) == before + 1
    # The old listener is closed: were it still accepting, about half of these would land on
    # it and fail bob's handshake.
    for _ in range(12):
        assert fresh_call(handover, bob).caller == "bob"
    assert open_channel.Echo(REQUEST, timeout=5).caller == "alice"  # moves over by itself
    assert listener(handover).draining == draining + 1
    metrics = handover.server.metrics.registry
    assert metrics.get_sample_value("pinrpc_trust_rebuilds_total") == before + 1
    assert (metrics.get_sample_value("pinrpc_tls_handshakes_total") or 0) >= 12
    eventually(lambda: listener(handover).draining == 0, timeout=1.1 * MAX_AGE + 1.0 + 3)


def test_revocation_needs_no_new_listener_but_every_call_is_refused(
    handover: Connect, make_client: MakeClient, registry: Path
) -> None:
    alice, carol = make_client("alice"), make_client("carol")
    handover.enroll(alice, "alice", ECHO_ALL)
    before = settle(handover)
    open_channel = handover.stub(alice.cert_path, alice.key_path)
    assert whoami(open_channel).name == "alice"

    revoke(registry, "alice")
    handover.server.trust.poll()
    assert settle(handover) == before  # nothing to add: no build, no handover
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: open_channel.Echo(REQUEST, timeout=5)) == denied
    # Her root is still in this listener's store, so a new connection gets through the
    # handshake; the per-call check refuses it all the same.
    assert code_of(lambda: fresh_call(handover, alice)) == denied

    handover.enroll(carol, "carol", ECHO_ALL)
    assert settle(handover) == before + 1
    # The next build leaves the revoked root out: now she is refused at the handshake.
    assert code_of(lambda: fresh_call(handover, alice)) == grpc.StatusCode.UNAVAILABLE
    assert fresh_call(handover, carol).caller == "carol"


def test_no_call_fails_across_handovers_under_load(
    handover: Connect, make_client: MakeClient, registry: Path
) -> None:
    """Open channels and new connections keep working while enrollments hand the port over."""
    alice = make_client("alice")
    handover.enroll(alice, "alice", ECHO_ALL)
    settle(handover)
    newcomers = [make_client(f"new{i}") for i in range(5)]
    outcomes: collections.Counter[str] = collections.Counter()
    stop = threading.Event()

    def open_channel_calls() -> None:
        stub = handover.stub(alice.cert_path, alice.key_path)
        while not stop.is_set():
            try:
                stub.Echo(REQUEST, timeout=5)
                outcomes["open OK"] += 1
            except grpc.RpcError as exc:
                outcomes[f"open {exc.code().name}"] += 1

    def new_connections() -> None:
        while not stop.is_set():
            try:
                fresh_call(handover, alice)
                outcomes["new OK"] += 1
            except grpc.RpcError as exc:
                outcomes[f"new {exc.code().name} {exc.details()}"] += 1

    def more_load() -> None:
        # Counted calls, not 0.3 s: a slower machine made too few of them to tell anything.
        open_ok, new_ok = outcomes["open OK"] + 20, outcomes["new OK"] + 2
        eventually(
            lambda: (
                bool(set(outcomes) - {"open OK", "new OK"})
                or (outcomes["open OK"] >= open_ok and outcomes["new OK"] >= new_ok)
            ),
            timeout=10,
        )

    workers = [threading.Thread(target=open_channel_calls) for _ in range(4)]
    workers.append(threading.Thread(target=new_connections))
    for worker in workers:
        worker.start()
    try:
        for i, newcomer in enumerate(newcomers):
            more_load()
            enroll(registry, newcomer.cert_path, f"new{i}", ECHO_ALL)  # the watcher picks it up
            eventually(functools.partial(admitted, handover, newcomer), timeout=5)
        more_load()
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert set(outcomes) == {"open OK", "new OK"}, outcomes


def test_server_certificate_renewal_is_handed_over(
    devca: ServerFiles, registry: Path, make_client: MakeClient, tmp_path: Path
) -> None:
    live = tmp_path / "live" / SERVER_NAME
    first, second = devca.ca.issue([SERVER_NAME]), devca.ca.issue([SERVER_NAME])
    certbot_link(live, *first.write(tmp_path / "v1"), 1)
    alice = make_client("alice")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    config = handover_config(registry, live / "fullchain.pem", live / "privkey.pem")
    with start_server(config) as running:
        connect = Connect(running, devca)
        open_channel = connect.stub(alice.cert_path, alice.key_path)
        assert whoami(open_channel).name == "alice"
        assert served_serial(running.port, alice) == first.leaf.serial_number

        certbot_link(live, *second.write(tmp_path / "v2"), 2)
        running.trust.poll()
        assert settle(connect) == 1
        assert served_serial(running.port, alice) == second.leaf.serial_number
        assert whoami(open_channel).name == "alice"


def probe_status(address: str) -> int | grpc.StatusCode:
    """The whole server's health, on a new plaintext connection (or why there was none)."""
    with grpc.insecure_channel(address, options=[FRESH_CONNECTION]) as channel:
        try:
            return check(channel)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code


def test_a_handover_closes_its_own_listener_only(
    devca: ServerFiles, registry: Path, make_client: MakeClient
) -> None:
    # The same port number on another address: it used to be closed with the old listener.
    port = free_port()
    config = replace(
        handover_config(registry, devca.cert, devca.key),
        listen=f"127.0.0.1:{port}", health_listen=f"127.0.0.2:{port}",
    )  # fmt: skip
    alice, bob = make_client("alice"), make_client("bob")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    with start_server(config) as running:
        connect = Connect(running, devca)
        assert probe_status(f"127.0.0.2:{port}") == SERVING
        connect.enroll(bob, "bob", ECHO_ALL)
        assert settle(connect) == 1
        assert probe_status(f"127.0.0.2:{port}") == SERVING
        # The allow twin: the old mTLS listener is retired all the same (were it still
        # accepting, about half of these would land on it and fail bob's handshake).
        for _ in range(12):
            assert fresh_call(connect, bob).caller == "bob"
        assert listener(connect).draining == 1


@contextmanager
def slow_listener(
    devca: ServerFiles,
    registry: Path,
    warm: WarmSet | None = None,
    builds: collections.Counter[str] | None = None,
    hold: threading.Event | None = None,
    interval: float = 0.2,
    on_slow_build: Callable[[], None] | None = None,
) -> Iterator[tuple[Listener, TrustWatcher, threading.Event]]:
    """A handover Listener started by hand whose builds take 2 s (as 10,000 roots would) once
    the yielded event is set, calling ``on_slow_build`` first; ``builds["built"]`` counts
    them. Builds after the first wait for ``hold``, if given, to be set (at most 10 s, so a
    regression fails, not hangs)."""
    reg = open_registry(str(registry))
    trust = TrustWatcher(reg, devca.cert, devca.key)
    check = AuthInterceptor(lambda: trust.enrolled)
    slow = threading.Event()
    count = itertools.count()

    def build(options: Options) -> grpc.Server:
        if slow.is_set():
            if on_slow_build is not None:
                on_slow_build()
            time.sleep(2.0)
        if hold is not None and next(count):
            hold.wait(10.0)
        if builds is not None:
            builds["built"] += 1
        server = grpc.server(executor, interceptors=[check], options=options)
        echo_pb2_grpc.add_EchoServicer_to_server(EchoService(), server)
        return server

    with ThreadPoolExecutor(8) as executor:
        served = Listener(
            build, trust, mode="handover", grace=1.0, max_age=MAX_AGE, interval=interval,
            warm=warm,
        )  # fmt: skip
        try:
            yield served, trust, slow
        finally:
            served.stop(None)
            reg.close()


def test_no_handshake_waits_for_a_build(
    devca: ServerFiles, registry: Path, make_client: MakeClient
) -> None:
    """A slow build delays nobody: the old listener serves meanwhile."""
    alice, bob = make_client("alice"), make_client("bob")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    with slow_listener(devca, registry) as (served, trust, slow):
        served.start("127.0.0.1:0")
        connect = (f"127.0.0.1:{served.port}", devca.ca_path)
        enroll(registry, bob.cert_path, "bob", ECHO_ALL)
        slow.set()
        trust.poll()  # wakes the builder thread too: whichever builds, it takes 2 s
        building = threading.Thread(target=served.refresh)
        building.start()
        waits = []
        while building.is_alive():
            started = time.monotonic()
            assert fresh_call(connect, alice).caller == "alice"
            waits.append(time.monotonic() - started)
        building.join()
        assert len(waits) >= 10 and max(waits) < 0.5, waits
        assert fresh_call(connect, bob).caller == "bob"


def reuseport_pair() -> tuple[socket.socket, socket.socket, int]:
    """Two listeners on one port, as an old and a new gRPC server have during a handover."""
    first = socket.socket()
    first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    first.bind(("127.0.0.1", 0))
    first.listen(64)
    port = first.getsockname()[1]
    second = socket.socket()
    second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    second.bind(("127.0.0.1", port))
    second.listen(64)
    return first, second, port


def accepted_by(listeners: tuple[socket.socket, socket.socket], port: int) -> list[int]:
    """Open 24 connections; how many each listener received."""
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(24)]
    counts = []
    for listener in listeners:
        listener.setblocking(False)
        count = 0
        with contextlib.suppress(BlockingIOError):
            while True:
                listener.accept()[0].close()
                count += 1
        counts.append(count)
    for client in clients:
        client.close()
    return counts


@pytest.mark.parametrize("steered", [False, True])
def test_new_connections_are_steered_to_the_newest_listener(steered: bool) -> None:
    first, second, port = reuseport_pair()
    try:
        if steered:
            assert steer_to_newest([first])
        counts = accepted_by((first, second), port)
        assert sum(counts) == 24
        if steered:
            assert counts == [0, 24]
        else:  # the kernel's hash spreads them (all 24 on one side: odds 1 in 8 million)
            assert 0 < counts[0] < 24
    finally:
        first.close()
        second.close()


def enroll_alice_and_bob(registry: Path, make_client: MakeClient) -> tuple[KeyPairFiles, ...]:
    alice, bob = make_client("alice"), make_client("bob")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    enroll(registry, bob.cert_path, "bob", ECHO_ALL)
    return alice, bob


def test_warm_start_serves_the_clients_seen_before_first(
    devca: ServerFiles, registry: Path, make_client: MakeClient, tmp_path: Path
) -> None:
    """The clients in the warm file get in at once; the others after the full build."""
    alice, bob = enroll_alice_and_bob(registry, make_client)
    warm_file = tmp_path / "warm"
    warm_file.write_text(alice.fingerprint.digest.hex() + "\n")
    with slow_listener(devca, registry, WarmSet(warm_file)) as (served, _trust, slow):
        slow.set()  # only builds after the first are slow
        served.start("127.0.0.1:0")
        target = (f"127.0.0.1:{served.port}", devca.ca_path)
        assert fresh_call(target, alice).caller == "alice"
        assert code_of(lambda: fresh_call(target, bob)) == grpc.StatusCode.UNAVAILABLE
        eventually(functools.partial(admitted, target, bob), timeout=10)
        assert served.handovers == 1 and not served.stale()


def test_warm_start_trusts_only_the_most_recently_seen_first(
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every enrolled client connected before (a steady fleet): the first listener trusts the
    FIRST_MAX most recent only, and the older ones get in with the full set."""
    monkeypatch.setattr(server.warm, "FIRST_MAX", 2)
    alice, bob = enroll_alice_and_bob(registry, make_client)
    carol = make_client("carol")
    enroll(registry, carol.cert_path, "carol", ECHO_ALL)
    warm_file = tmp_path / "warm"  # the most recently seen last
    warm_file.write_text("".join(f"{f.fingerprint.digest.hex()}\n" for f in (carol, bob, alice)))
    hold = threading.Event()
    with (
        caplog.at_level(logging.INFO, "pinrpc.server"),
        slow_listener(devca, registry, WarmSet(warm_file), hold=hold) as (served, _trust, _slow),
    ):
        served.start("127.0.0.1:0")
        target = (f"127.0.0.1:{served.port}", devca.ca_path)
        assert fresh_call(target, alice).caller == "alice"
        assert fresh_call(target, bob).caller == "bob"
        assert code_of(lambda: fresh_call(target, carol)) == grpc.StatusCode.UNAVAILABLE
        assert served.handovers == 0  # the full set is still held back
        hold.set()
        eventually(functools.partial(admitted, target, carol), timeout=10)
        assert served.handovers == 1 and not served.stale()
    assert any(
        "the 2 client(s) seen most recently first (of 3 seen before)" in r.getMessage()
        for r in caplog.records
    )


def test_warm_start_builds_the_full_set_at_once(
    devca: ServerFiles, registry: Path, make_client: MakeClient, tmp_path: Path
) -> None:
    """The clients outside the warm file wait for the full set only as long as it takes to
    build, not a poll interval more (here a minute)."""
    alice, bob = enroll_alice_and_bob(registry, make_client)
    warm_file = tmp_path / "warm"
    warm_file.write_text(alice.fingerprint.digest.hex() + "\n")
    with slow_listener(devca, registry, WarmSet(warm_file), interval=60.0) as (served, _, _):
        served.start("127.0.0.1:0")
        target = (f"127.0.0.1:{served.port}", devca.ca_path)
        eventually(functools.partial(admitted, target, bob), timeout=10)
        assert served.handovers == 1


def test_warm_file_records_who_connected(
    devca: ServerFiles, registry: Path, make_client: MakeClient, tmp_path: Path
) -> None:
    alice, bob = enroll_alice_and_bob(registry, make_client)
    warm_file = tmp_path / "warm"
    config = replace(handover_config(registry, devca.cert, devca.key), warm_start=warm_file)
    with start_server(config) as running:
        assert whoami(Connect(running, devca).stub(alice.cert_path, alice.key_path))
    assert warm_file.read_text() == alice.fingerprint.digest.hex() + "\n"  # bob never called
    assert warm_file.stat().st_mode & 0o777 == 0o600
    # Next start: alice is served by the first listener, bob by the handover that follows.
    with start_server(config) as running:
        connect = Connect(running, devca)
        assert whoami(connect.stub(alice.cert_path, alice.key_path)).name == "alice"
        settle(connect)
        assert whoami(connect.stub(bob.cert_path, bob.key_path)).name == "bob"
    assert len(warm_file.read_text().split()) == 2


@pytest.mark.parametrize(
    "content", [b"not hex\n", b"ab" * 20 + b"\n", b"\xff\xfe garbage", b"0" * (5 << 20)]
)
def test_a_bad_warm_file_is_ignored_with_a_warning(
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    content: bytes,
) -> None:
    alice = make_client("alice")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    warm_file = tmp_path / "warm"
    warm_file.write_bytes(content)
    config = replace(handover_config(registry, devca.cert, devca.key), warm_start=warm_file)
    with caplog.at_level(logging.WARNING), start_server(config) as running:
        assert whoami(Connect(running, devca).stub(alice.cert_path, alice.key_path))
    assert any("ignoring the warm-start file" in r.getMessage() for r in caplog.records)


def test_a_warm_file_cannot_let_anyone_in(
    devca: ServerFiles, registry: Path, make_client: MakeClient, tmp_path: Path
) -> None:
    """Fingerprints of unenrolled or revoked certificates in the file are ignored."""
    alice, carol, mallory = make_client("alice"), make_client("carol"), make_client("mallory")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    enroll(registry, carol.cert_path, "carol", ECHO_ALL)
    revoke(registry, "carol")
    warm_file = tmp_path / "warm"
    warm_file.write_text("".join(f"{f.fingerprint.digest.hex()}\n" for f in (carol, mallory)))
    config = replace(handover_config(registry, devca.cert, devca.key), warm_start=warm_file)
    with start_server(config) as running:
        connect = Connect(running, devca)
        settle(connect)
        assert fresh_call(connect, alice).caller == "alice"
        for stranger in (carol, mallory):
            refused = code_of(functools.partial(fresh_call, connect, stranger))
            assert refused == grpc.StatusCode.UNAVAILABLE
