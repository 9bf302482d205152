"""Metrics scraped from the real endpoint, audit lines, log formats."""

from __future__ import annotations

import datetime as dt
import importlib
import json
import logging
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from pinrpc.cli import Exit
from pinrpc.identity import Fingerprint, cert_to_pem, load_certificate
from pinrpc.v1 import echo_pb2, echo_pb2_grpc
from server import audit as audit_module
from server import cli as server_cli
from server import handshakes, observe
from server.app import RunningServer, start_server
from server.audit import Audit
from server.config import ServerConfig
from server.logs import configure_logging
from server.metrics import Metrics
from server.ratelimit import TokenBucket
from tests.certs import make_cert, p256
from tests.conftest import (
    ECHO_ALL,
    Connect,
    MakeClient,
    ServerFiles,
    code_of,
    enroll,
    eventually,
    revoke,
    whoami,
)
from tests.test_client_cli import run


@pytest.fixture
def observed(devca: ServerFiles, registry: Path) -> Iterator[RunningServer]:
    config = ServerConfig(
        "127.0.0.1:0", devca.cert, devca.key, str(registry), metrics_listen="127.0.0.1:0"
    )
    with start_server(config) as running:
        yield running


def scrape(running: RunningServer) -> dict[str, float]:
    url = f"http://127.0.0.1:{running.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def written(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The audit records captured so far (without writing what is queued)."""
    return [r for r in caplog.records if r.name == "pinrpc.audit"]


def audit_lines(caplog: pytest.LogCaptureFixture, audit: Audit) -> list[dict[str, object]]:
    """The audit lines, once the queue has been written (call it inside caplog.at_level)."""
    audit.flush()
    return [json.loads(r.getMessage()) for r in written(caplog)]


def test_metrics_endpoint(
    observed: RunningServer, devca: ServerFiles, make_client: MakeClient, registry: Path
) -> None:
    connect = Connect(observed, devca)
    alice, bob = make_client("alice"), make_client("bob")
    connect.enroll(alice, "alice", ECHO_ALL)
    connect.enroll(bob, "bob")
    alice_stub, bob_stub = (connect.stub(f.cert_path, f.key_path) for f in (alice, bob))
    whoami(alice_stub)
    alice_stub.Echo(echo_pb2.EchoRequest(message="m"), timeout=5)
    code_of(lambda: bob_stub.Echo(echo_pb2.EchoRequest(), timeout=5))

    m = scrape(observed)
    echo = 'method="/pinrpc.v1.Echo/Echo"'
    assert m[f'pinrpc_calls_total{{client="alice",code="OK",{echo}}}'] == 1
    assert m[f'pinrpc_calls_total{{client="bob",code="PERMISSION_DENIED",{echo}}}'] == 1
    assert m['pinrpc_denials_total{reason="method_not_allowed"}'] == 1
    assert m["pinrpc_enrolled_clients"] == 2
    assert m["pinrpc_revoked_clients"] == 0
    assert m["pinrpc_tls_handshakes_total"] >= 2
    assert m["pinrpc_trust_rebuilds_total"] >= 1
    expiry = observed.trust.server_cert.leaf.not_valid_after_utc.timestamp()
    assert m["pinrpc_server_certificate_expiry_timestamp_seconds"] == expiry
    # Every metric name follows the Prometheus conventions.
    names = {re.sub(r"\{.*", "", k) for k in m}
    assert all(re.fullmatch(r"pinrpc_[a-z_]+", n) for n in names if n.startswith("pinrpc"))

    revoke(registry, "bob")
    observed.trust.poll()
    assert scrape(observed)["pinrpc_revoked_clients"] == 1


def test_every_handshake_is_counted_once_refused_ones_too(
    observed: RunningServer, devca: ServerFiles, make_client: MakeClient
) -> None:
    connect = Connect(observed, devca)
    alice, mallory = make_client("alice"), make_client("mallory")
    connect.enroll(alice, "alice")
    before = scrape(observed)["pinrpc_tls_handshakes_total"]
    for _ in range(3):  # three channels, three connections
        with connect.channel(alice.cert_path, alice.key_path) as channel:
            whoami(echo_pb2_grpc.EchoStub(channel))
            whoami(echo_pb2_grpc.EchoStub(channel))
    assert scrape(observed)["pinrpc_tls_handshakes_total"] == before + 3
    with connect.channel(mallory.cert_path, mallory.key_path) as channel:
        refused = code_of(lambda: whoami(echo_pb2_grpc.EchoStub(channel)))
    assert refused == grpc.StatusCode.UNAVAILABLE
    assert scrape(observed)["pinrpc_tls_handshakes_total"] >= before + 4


def test_audit_lines(
    connect: Connect, make_client: MakeClient, registry: Path, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    connect.enroll(alice, "alice", ECHO_ALL)
    connect.server.audit.flush()  # alice's line, before the capture
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        connect.enroll(bob, "bob")
        stub = connect.stub(alice.cert_path, alice.key_path)
        for _ in range(3):
            whoami(stub)
        bob_stub = connect.stub(bob.cert_path, bob.key_path)
        code_of(lambda: bob_stub.Echo(echo_pb2.EchoRequest(), timeout=5))
        revoke(registry, "bob")
        connect.server.trust.poll()
        lines = audit_lines(caplog, connect.server.audit)
    events = [(line["event"], line.get("decision"), line.get("client")) for line in lines]
    assert events == [
        ("enroll", None, "bob"),
        ("call", "allow", "alice"),  # once per connection, not per call
        ("call", "deny", "bob"),
        ("revoke", None, "bob"),
    ]
    deny = lines[2]
    assert deny["reason"] == "method_not_allowed"
    assert deny["method"] == "/pinrpc.v1.Echo/Echo"
    assert deny["fingerprint"] == str(bob.fingerprint)
    assert str(deny["peer"]).startswith("ipv4:127.0.0.1:")
    assert "time" in deny


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every peer the server asks gRPC for (context.peer() is the cost being avoided)."""
    context_class = importlib.import_module("grpc._server")._Context
    real_peer = context_class.peer
    seen: list[str] = []

    def counting_peer(self: Any) -> str:
        seen.append(real_peer(self))
        return seen[-1]

    monkeypatch.setattr(context_class, "peer", counting_peer)
    return seen


def test_peer_is_looked_up_only_until_each_new_connection_has_called(
    connect: Connect,
    make_client: MakeClient,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    lookups: list[str],
) -> None:
    """context.peer() is costly: it is asked only while a recent handshake has not been
    followed by a new connection's first call, and every such first call is logged."""
    monkeypatch.setattr(handshakes, "NEW_CONNECTION_WINDOW", 1.0)
    alice = make_client("alice")
    connect.enroll(alice, "alice", ECHO_ALL)
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        first = connect.stub(alice.cert_path, alice.key_path)
        for _ in range(20):
            whoami(first)
        assert len(lookups) == 1  # its first call; after it nothing can be new
        second = connect.stub(alice.cert_path, alice.key_path)
        for _ in range(20):
            whoami(second)
            whoami(first)
        assert len(lookups) == 2
        # A channel connected eagerly and not used keeps the lookups on, for the window only.
        idle = connect.channel(alice.cert_path, alice.key_path)
        grpc.channel_ready_future(idle).result(timeout=5)
        whoami(first)
        whoami(second)
        assert len(lookups) == 4
        # The window ends at a poll at least a window after the handshake: wait for it, as a
        # loaded machine's polls may come late (a fixed 1.5 s left 0.3 s for that).
        eventually(lambda: not connect.server.trust.handshakes.pending(), timeout=5)
        whoami(first)
        whoami(echo_pb2_grpc.EchoStub(idle))  # documented: first used after the window, unlogged
        assert len(lookups) == 4
        lines = audit_lines(caplog, connect.server.audit)
    allowed = [line for line in lines if line.get("decision") == "allow"]
    assert [line["peer"] for line in allowed] == [lookups[0], lookups[1]]
    assert lookups[0] != lookups[1]


def test_a_full_peer_set_neither_relogs_open_connections_nor_hides_a_new_one(
    connect: Connect,
    make_client: MakeClient,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    lookups: list[str],
) -> None:
    """When the remembered peers fill up they become the previous generation: open connections
    found there are not new (no second line), they do not use up the handshake of a connection
    that has yet to make its first call, and once that one has called nobody asks for peers."""
    monkeypatch.setattr(observe, "MAX_PEERS", 2)
    alice = make_client("alice")
    connect.enroll(alice, "alice", ECHO_ALL)
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        a, b, c = (connect.stub(alice.cert_path, alice.key_path) for _ in range(3))
        for stub in (a, b, c):  # c's first call finds the set full: a new generation
            whoami(stub)
        late = connect.channel(alice.cert_path, alice.key_path)
        grpc.channel_ready_future(late).result(timeout=5)
        whoami(a)  # from the previous generation: carried over, not logged again
        whoami(echo_pb2_grpc.EchoStub(late))  # the new connection: logged
        before = len(lookups)
        for _ in range(10):
            for stub in (a, b, c):
                whoami(stub)
        assert len(lookups) == before  # every handshake was claimed: no peer() per call
        lines = audit_lines(caplog, connect.server.audit)
    peers = [line["peer"] for line in lines if line.get("decision") == "allow"]
    assert len(peers) == 4 and len(set(peers)) == 4, peers  # a, b, c, late: once each


def test_call_counter_loses_no_increment_across_threads() -> None:
    """pinrpc_calls_total is counted per thread without a lock; a scrape must see every call."""
    metrics = Metrics()
    start = threading.Barrier(8)

    def count(i: int) -> None:
        start.wait()
        for _ in range(2000):
            metrics.calls.inc(("alice", "/pinrpc.v1.Echo/Echo", "OK"))
            metrics.calls.inc((f"c{i}", "/pinrpc.v1.Echo/Echo", "PERMISSION_DENIED"))

    threads = [threading.Thread(target=count, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    sample = metrics.registry.get_sample_value
    echo = "/pinrpc.v1.Echo/Echo"
    alice = {"client": "alice", "method": echo, "code": "OK"}
    scraped: list[float] = []  # scraped while the threads count
    deadline = time.monotonic() + 30
    while any(thread.is_alive() for thread in threads) and time.monotonic() < deadline:
        scraped.append(sample("pinrpc_calls_total", alice) or 0)
    for thread in threads:
        thread.join()
    assert sample("pinrpc_calls_total", alice) == 16000
    assert scraped == sorted(scraped), "a counter went down between two scrapes"
    for i in range(8):
        labels = {"client": f"c{i}", "method": echo, "code": "PERMISSION_DENIED"}
        assert sample("pinrpc_calls_total", labels) == 2000


def test_audit_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    audit = Audit(rate=0.001, burst=3)
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        for i in range(100):
            audit.event("call", n=i)
        assert [line["n"] for line in audit_lines(caplog, audit)] == [0, 1, 2]
    assert audit.suppressed == 97


def test_audit_lines_are_written_by_their_own_thread(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call only queues its line (built one by one between handshakes, lines cost several times
    as much: docs/PERFORMANCE.md); the writer writes them in order, each with the time its
    event happened, and stop() writes what is still queued."""
    monkeypatch.setattr(audit_module, "FLUSH_INTERVAL", 1.0)
    audit = Audit()
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        audit.start()
        try:
            before = time.time()
            audit.event("call", n=0)
            after = time.time()
            deadline = time.monotonic() + 10
            while not written(caplog) and time.monotonic() < deadline:
                time.sleep(0.05)
            first = written(caplog)[0]
            assert first.threadName == "pinrpc-audit"
            happened = dt.datetime.fromisoformat(json.loads(first.getMessage())["time"])
            # The line carries whole microseconds, rounded to the nearest: allow one either side.
            assert before - 1e-6 <= happened.timestamp() <= after + 1e-6
            assert after < first.created
            audit.event("call", n=1)
            audit.event("call", n=2)
        finally:
            audit.stop()
        assert [json.loads(r.getMessage())["n"] for r in written(caplog)] == [0, 1, 2]


def test_a_blocked_log_stream_does_not_stall_calls(
    connect: Connect, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """A stalled log collector blocks whoever writes to stderr: the audit's writer, not the calls
    (before the writer, the first call of a new connection hung on its line)."""
    alice = make_client("alice")
    entered, release = threading.Event(), threading.Event()

    class Stalled(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            entered.set()
            release.wait(10)

    stalled = Stalled()
    logging.getLogger("pinrpc.audit").addHandler(stalled)
    try:
        with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
            connect.enroll(alice, "alice", ECHO_ALL)
            assert entered.wait(5)  # the writer is stuck in the enrollment's line
            for _ in range(5):  # each on a new connection, so each queues a line
                assert whoami(connect.stub(alice.cert_path, alice.key_path)).name == "alice"
            release.set()
            lines = audit_lines(caplog, connect.server.audit)
    finally:
        release.set()
        logging.getLogger("pinrpc.audit").removeHandler(stalled)
    assert len([line for line in lines if line.get("decision") == "allow"]) == 5


def test_a_stuck_writer_cannot_grow_the_queue_without_bound(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing writes while stderr is blocked; lines beyond the cap are counted, not queued."""
    monkeypatch.setattr(audit_module, "MAX_QUEUED", 3)
    audit = Audit(rate=1000, burst=1000)
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        for i in range(10):
            audit.event("call", n=i)
        assert audit.suppressed == 7
        assert [line["n"] for line in audit_lines(caplog, audit)] == [0, 1, 2]
        audit.event("call", n=10)
        last = audit_lines(caplog, audit)[-1]
    assert last["n"] == 10 and last["suppressed_before"] == 7


def test_token_bucket_refills() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=2, burst=2, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    now[0] = 0.5
    assert [bucket.take() for _ in range(2)] == [True, False]


def test_json_log_format(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO", "json")
        logging.getLogger("pinrpc.test").info("hello %s", "world")
        audit = Audit()
        audit.event("revoke", client="bob")
        audit.flush()
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first["message"] == "hello world" and first["level"] == "INFO"
    assert second["event"] == "revoke" and second["client"] == "bob"


def test_unknown_method_stays_out_of_labels(
    observed: RunningServer, devca: ServerFiles, make_client: MakeClient
) -> None:
    connect = Connect(observed, devca)
    alice = make_client("alice")
    connect.enroll(alice, "alice", "*")
    call = connect.channel(alice.cert_path, alice.key_path).unary_unary("/x.Y/Random", None, None)
    assert code_of(lambda: call(b"", timeout=5)) == grpc.StatusCode.UNIMPLEMENTED
    m = scrape(observed)
    assert m['pinrpc_calls_total{client="alice",code="UNIMPLEMENTED",method="(unknown)"}'] == 1
    assert not any("Random" in k for k in m)


def test_the_lowest_audit_rate_still_writes_lines(
    devca: ServerFiles, registry: Path, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """--audit-rate 0.1 is allowed; its bucket once held int(0.4) = 0 tokens: no line, ever."""
    mallory = make_client("mallory")
    enroll(registry, mallory.cert_path, "mallory", "/pinrpc.v1.Echo/WhoAmI")  # before: no line
    config = ServerConfig("127.0.0.1:0", devca.cert, devca.key, str(registry), audit_rate=0.1)
    with start_server(config) as running, caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        stub = Connect(running, devca).stub(mallory.cert_path, mallory.key_path)
        for _ in range(3):
            denied = lambda: stub.Echo(echo_pb2.EchoRequest(message="x"), timeout=5)  # noqa: E731
            assert code_of(denied) == grpc.StatusCode.PERMISSION_DENIED
        lines = audit_lines(caplog, running.audit)
    assert [line["decision"] for line in lines if line["event"] == "call"] == ["deny"]


def test_an_ended_rotation_overlap_is_audited_as_retire(
    observed: RunningServer,
    devca: ServerFiles,
    make_client: MakeClient,
    registry: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The old certificate leaves the enrolled set when the overlap ends, but nobody revoked
    it; revoking the new one (the twin) is audited as a revocation. The revoked gauge agrees."""
    connect = Connect(observed, devca)
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    connect.server.audit.flush()  # the enrollment's line, before the capture
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        code, _, err = run(["rotate", "--overlap", "1", *connect.cli_flags(alice)], capsys)
        assert code == Exit.OK, err
        successor = Fingerprint.of(load_certificate(alice.cert_path))

        def overlap_ended() -> bool:
            connect.server.trust.poll()
            events = {line["event"] for line in audit_lines(caplog, connect.server.audit)}
            return bool(events & {"retire", "revoke"})

        eventually(overlap_ended, timeout=3)
        assert scrape(observed)["pinrpc_revoked_clients"] == 0
        revoke(registry, "alice")
        connect.server.trust.poll()
        lines = audit_lines(caplog, connect.server.audit)
    assert scrape(observed)["pinrpc_revoked_clients"] == 1
    changes = [(line["event"], line["fingerprint"]) for line in lines if line["event"] != "call"]
    assert changes == [
        ("enroll", str(successor)),
        ("rotate", str(successor)),
        ("retire", str(alice.fingerprint)),
        ("revoke", str(successor)),
    ]


def test_expired_certificates_leave_the_enrolled_gauge(
    connect: Connect, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """pinrpc_enrolled_clients counts what the enrolled set trusts ("trusting N"); an expiry
    is no revocation (neither the gauge nor the audit says so)."""
    connect.enroll(make_client("alice"), "alice")  # the twin: stays counted
    connect.server.audit.flush()  # alice's line, before the capture
    key = p256()
    start = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    short = make_cert(key, "short", key_cert_sign=False, not_before=start, days=3 / 86400)
    path = connect.server_registry.parent / "short.crt"
    path.write_bytes(cert_to_pem(short))
    sample = connect.server.metrics.registry.get_sample_value
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        enroll(connect.server_registry, path, "short")
        connect.server.trust.poll()
        assert sample("pinrpc_enrolled_clients") == 2
        eventually(lambda: sample("pinrpc_enrolled_clients") == 1, timeout=5)
        lines = audit_lines(caplog, connect.server.audit)
    assert sample("pinrpc_revoked_clients") == 0
    assert [line["event"] for line in lines if line["event"] != "call"] == ["enroll"]


@pytest.mark.parametrize("tls_reload", ["inline", "handover"])
def test_trust_rebuilds_count_client_authenticated_configurations_only(
    devca: ServerFiles, registry: Path, make_client: MakeClient, tls_reload: str
) -> None:
    """A revocation rebuilds the mTLS port's configuration (inline) or nothing (handover:
    the per-call check refuses, no new listener); the enrollment port's server-only TLS is
    no trust rebuild, and a permit, which changes no certificate, is none either. An
    enrollment (the twin) does count in both modes."""
    alice, bob = make_client("alice"), make_client("bob")
    enroll(registry, alice.cert_path, "alice")
    config = ServerConfig(
        "127.0.0.1:0", devca.cert, devca.key, str(registry), poll_interval=0.1, grace=1.0,
        enrollment_listen="127.0.0.1:0", tls_reload=tls_reload,
    )  # fmt: skip
    with start_server(config) as running:

        def rebuilds() -> float:
            sample = running.metrics.registry.get_sample_value("pinrpc_trust_rebuilds_total")
            return sample or 0

        before = rebuilds()
        enroll(registry, bob.cert_path, "bob")
        running.trust.poll()
        eventually(lambda: rebuilds() == before + 1, timeout=5)
        revoke(registry, "bob")
        running.trust.poll()
        time.sleep(0.5)  # a handover build would have started by now
        assert rebuilds() == before + (1 if tls_reload == "handover" else 2)
        assert server_cli.main(["permit", "alice", "--none", "--registry", str(registry)]) == 0
        running.trust.poll()
        permitted = running.trust.enrolled.lookup(alice.fingerprint)
        assert permitted is not None and permitted.allowed_methods == ()  # picked up
        time.sleep(0.5)
        assert rebuilds() == before + (1 if tls_reload == "handover" else 2)
