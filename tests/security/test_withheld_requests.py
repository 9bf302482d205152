"""Calls that never send their request: grpcio waits for a unary call's request on a worker
thread, so such calls held every worker, on the mTLS port and on the side ports alike."""

from __future__ import annotations

import concurrent.futures
import logging
import socket
import threading
import time
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from pinrpc.v1 import echo_pb2, enrollment_pb2, enrollment_pb2_grpc
from server import request_watch
from server.app import RunningServer
from server.auth import UNKNOWN_METHOD, streams_per_client
from server.request_watch import RequestWatch
from tests.conftest import (
    ECHO_ALL,
    SERVER_NAME,
    Connect,
    MakeClient,
    ServerFiles,
    code_of,
    eventually,
    revoke,
    whoami,
)
from tests.security.attacker import require_attack_modules
from tests.security.conftest import HandlerCalls
from tests.security.test_open_streams import STREAM, Bidi, counted
from tests.test_enrollment_requests import enrolling  # noqa: F401 (a fixture)
from tests.test_health import check, with_probe  # noqa: F401 (a fixture)
from tests.test_observe import audit_lines, observed, scrape  # noqa: F401 (a fixture)

WHOAMI = "/pinrpc.v1.Echo/WhoAmI"
ECHO = "/pinrpc.v1.Echo/Echo"
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
GARBAGE = b"\xff\xff\xff"  # no valid protobuf message
SERVER_NAME_OVERRIDE = ("grpc.ssl_target_name_override", SERVER_NAME)


@contextmanager
def withheld(channel: grpc.Channel, method: str, n: int) -> Iterator[list[Any]]:
    """``n`` calls of ``method`` that send their headers and then nothing, until the block ends
    (then they end their requests without one)."""
    release = threading.Event()

    def nothing() -> Iterator[bytes]:
        release.wait(30)
        yield from ()

    call = channel.stream_unary(method, None, None)  # raw bytes
    calls: list[Any] = [call.future(nothing(), timeout=30) for _ in range(n)]  # grpc.Future
    try:
        yield calls
    finally:
        release.set()
        for c in calls:
            c.exception(timeout=30)


@contextmanager
def held(channel: grpc.Channel, method: str) -> Iterator[tuple[Any, threading.Event]]:
    """A call of ``method`` that sends its (empty) request once the event is set."""
    send = threading.Event()

    def request() -> Iterator[bytes]:
        if send.wait(30):
            yield b""

    call: Any = channel.stream_unary(method, None, None).future(request(), timeout=30)
    try:
        yield call, send
    finally:
        send.set()
        call.exception(timeout=30)


def code(call: Any, timeout: float = 3) -> grpc.StatusCode:
    """The status a call ended with; FutureTimeoutError while it is still open."""
    return call.exception(timeout=timeout).code()  # type: ignore[no-any-return]


class Watched:
    """The server's request watch, seen through spies: the calls waiting for their request,
    and the sweeps done (conditions to wait for instead of sleeping)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.watch: RequestWatch | None = None  # the first one a call registers with
        self._sweeps: dict[int, int] = {}  # id(watch) -> sweeps done since the spy was set
        first, sweep = RequestWatch.first, RequestWatch.sweep

        def spied_first(watch: RequestWatch, *args: Any, **kwargs: Any) -> Any:
            self.watch = self.watch or watch
            return first(watch, *args, **kwargs)

        def counted_sweep(watch: RequestWatch) -> int:
            try:
                return sweep(watch)
            finally:
                self._sweeps[id(watch)] = self._sweeps.get(id(watch), 0) + 1

        monkeypatch.setattr(RequestWatch, "first", spied_first)
        monkeypatch.setattr(RequestWatch, "sweep", counted_sweep)

    def waiting(self, caller: Hashable, n: int = 1) -> None:
        """Until ``n`` calls of ``caller`` wait for their request."""
        eventually(lambda: self.watch is not None and self.watch.waiting(caller) == n, timeout=10)

    def sweeps(self, n: int = 2) -> None:
        """Until ``n`` more sweeps are done (the first may have begun before this call)."""
        key = id(self.watch)
        start = self._sweeps.get(key, 0)
        eventually(lambda: self._sweeps.get(key, 0) >= start + n + 1, timeout=10)

    def ended(self, calls: list[Any], expected: int = 0) -> list[Any]:
        """The calls that have ended, once ``expected`` of them have, and after more sweeps
        that must end nothing further."""
        bound = request_watch.GRACE + 5  # they are overdue after GRACE, swept within 0.25 s
        eventually(lambda: sum(c.done() for c in calls) >= expected, timeout=bound)
        self.sweeps()
        return [c for c in calls if c.done()]


@pytest.fixture
def watched(monkeypatch: pytest.MonkeyPatch) -> Watched:
    return Watched(monkeypatch)


def test_withheld_requests_cannot_hold_every_worker(
    connect: Connect, make_client: MakeClient, watched: Watched
) -> None:
    """mallory, enrolled with no permissions, withholds the request of as many WhoAmI calls as
    the server has workers: once alice's call waits for a thread, mallory keeps a quarter of
    them and the rest are ended. Held back, her next wave is refused or ended while alice's
    calls keep the pool busy, and alice is served throughout."""
    mallory, alice = make_client("mallory"), make_client("alice")
    connect.enroll(mallory, "mallory")
    connect.enroll(alice, "alice")
    workers = connect.server.config.max_workers
    share = streams_per_client(workers)
    channel = connect.channel(mallory.cert_path, mallory.key_path)
    alice_stub = connect.stub(alice.cert_path, alice.key_path)
    with withheld(channel, WHOAMI, workers) as calls:
        # Her calls hold every worker, and are all overdue, before alice calls. Otherwise: her
        # connection may come second (alice is served at once, and no call is ended), or the
        # sweep ends the calls overdue so far, which frees alice a thread, and then leaves the
        # rest alone (nobody waits any more), as a loaded machine spreads the calls' starts.
        watched.waiting(mallory.fingerprint, workers)
        time.sleep(request_watch.GRACE)  # from when the last one began, or later
        assert whoami(alice_stub).name == "alice"
        done = watched.ended(calls, expected=workers - share)
        assert len(done) == workers - share
        assert {code(c) for c in done} == {EXHAUSTED}
        with withheld(channel, WHOAMI, workers) as wave:
            # Load, not synchronisation: alice keeps the pool busy while the wave is overdue.
            busy_until = time.monotonic() + request_watch.GRACE + 1.5
            while time.monotonic() < busy_until:  # 64 calls of alice's in flight
                flight = [alice_stub.WhoAmI.future(echo_pb2.WhoAmIRequest(), timeout=10)
                          for _ in range(64)]  # fmt: skip
                assert {f.result().name for f in flight} == {"alice"}
            assert {code(c) for c in wave} == {EXHAUSTED}
    # The kept calls end without a request: the answer of a unary method given none.
    kept = [c for c in calls if c not in done]
    assert {code(c, timeout=30) for c in kept} == {grpc.StatusCode.UNIMPLEMENTED}
    # Counted by each call's own thread, which may follow the status the client got.
    refused = {("mallory", WHOAMI): len(done) + workers}
    eventually(lambda: counted(connect, "RESOURCE_EXHAUSTED") == refused, timeout=3)
    eventually(lambda: counted(connect, "UNIMPLEMENTED") == {("mallory", WHOAMI): share}, 3)


def test_slow_requests_are_left_alone_while_no_call_waits_for_a_thread(
    connect: Connect, make_client: MakeClient, watched: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    """The allow twin: more overdue requests than the limit (as many large requests over a
    slow link look from the server) hold threads nobody else needs, and end no call."""
    mallory, alice = make_client("mallory"), make_client("alice")
    connect.enroll(mallory, "mallory")
    connect.enroll(alice, "alice")
    share = streams_per_client(connect.server.config.max_workers)
    channel = connect.channel(mallory.cert_path, mallory.key_path)
    with withheld(channel, WHOAMI, 2 * share) as calls:
        watched.waiting(mallory.fingerprint, 2 * share)
        eventually(lambda: held_back(caplog), timeout=request_watch.GRACE + 5)  # overdue
        assert whoami(connect.stub(alice.cert_path, alice.key_path)).name == "alice"
        assert not watched.ended(calls)


def test_a_well_behaved_client_is_never_held_back(
    connect: Connect, make_client: MakeClient, watched: Watched, caplog: pytest.LogCaptureFixture
) -> None:
    """The allow twin: many calls in flight from one client, each sending its request, are
    all served, and the client is not held back."""
    alice = make_client("alice")
    connect.enroll(alice, "alice", ECHO_ALL)
    stub = connect.stub(alice.cert_path, alice.key_path)
    request = echo_pb2.EchoRequest(message="m")
    futures = [stub.Echo.future(request, timeout=10) for _ in range(200)]
    assert {f.result().message for f in futures} == {"m"}
    watched.sweeps()  # one that saw none of them waiting: any overdue call was seen before
    assert not held_back(caplog)


def held_back(caplog: pytest.LogCaptureFixture) -> bool:
    return any("holding back" in r.getMessage() for r in caplog.records)


def test_a_caller_without_permission_is_refused_before_its_request(
    connect: Connect, make_client: MakeClient, watched: Watched
) -> None:
    """The check comes before the read: Echo, which mallory may not call, and a method that
    does not exist are answered at once; alice's withheld Echo waits for her request."""
    mallory, alice = make_client("mallory"), make_client("alice")
    connect.enroll(mallory, "mallory")
    connect.enroll(alice, "alice", ECHO_ALL)
    for method in (ECHO, "/evil.Svc/Nothing"):
        channel = connect.channel(mallory.cert_path, mallory.key_path)
        with withheld(channel, method, 1) as (call,):
            assert code(call) == grpc.StatusCode.PERMISSION_DENIED
    alice_channel = connect.channel(alice.cert_path, alice.key_path)
    with withheld(alice_channel, ECHO, 1) as (call,):
        watched.waiting(alice.fingerprint)
        assert not call.done()


def test_revocation_ends_a_withheld_call(
    connect: Connect, make_client: MakeClient, watched: Watched
) -> None:
    mallory = make_client("mallory")
    connect.enroll(mallory, "mallory")
    channel = connect.channel(mallory.cert_path, mallory.key_path)
    with withheld(channel, WHOAMI, 1) as (call,):
        watched.waiting(mallory.fingerprint)
        assert not call.done()
        revoke(connect.server_registry, "mallory")
        connect.server.trust.poll()
        assert code(call) == grpc.StatusCode.PERMISSION_DENIED


def test_a_revoked_withheld_call_is_reported_like_a_revoked_stream(
    observed: RunningServer,  # noqa: F811
    devca: ServerFiles,
    make_client: MakeClient,
    caplog: pytest.LogCaptureFixture,
    watched: Watched,
) -> None:
    """The revocation ends mallory's withheld call and her open stream alike, and both are
    counted and audited as any call of a caller no longer enrolled: a denial (reason
    not_enrolled), a deny line with her fingerprint, the refused caller's labels. The withheld
    one was counted under her name, with no denial and no audit line."""
    connect = Connect(observed, devca)
    mallory = make_client("mallory")
    connect.enroll(mallory, "mallory", ECHO_ALL)
    channel = connect.channel(mallory.cert_path, mallory.key_path)
    stream = Bidi(connect, mallory)
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        with withheld(channel, WHOAMI, 1) as (call,):
            try:
                assert stream.echo("before") == "before"
                watched.waiting(mallory.fingerprint)
                revoke(connect.server_registry, "mallory")
                observed.trust.poll()
                assert code(call) == DENIED
                assert code_of(stream.reply) == DENIED
            finally:
                stream.close()
        refused = 'pinrpc_calls_total{client="",code="PERMISSION_DENIED",method="(unknown)"}'
        eventually(lambda: scrape(observed).get(refused) == 2, timeout=3)
        lines = [line for line in audit_lines(caplog, observed.audit) if line["event"] == "call"]
    metrics = scrape(observed)
    assert metrics['pinrpc_denials_total{reason="not_enrolled"}'] == 2
    assert counted(connect, "PERMISSION_DENIED") == {("", UNKNOWN_METHOD): 2}
    denials = sorted(
        (line for line in lines if line["decision"] == "deny"), key=lambda line: str(line["method"])
    )
    assert [line["method"] for line in denials] == sorted((STREAM, WHOAMI))
    for line in denials:
        assert line.pop("peer") and line.pop("time") and line.pop("method")
        assert line == {"event": "call", "decision": "deny", "reason": "not_enrolled",
                        "client": None, "fingerprint": str(mallory.fingerprint)}  # fmt: skip


def test_a_revocation_between_the_check_and_the_read_is_not_missed(
    connect: Connect,
    make_client: MakeClient,
    handler_calls: HandlerCalls,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """mallory's call passes the check; the revocation's sweep runs before the call waits for
    its request (held there by a hook), so the sweep cannot see it: the call is refused at
    once all the same, and the request it sends later reaches no handler."""
    mallory = make_client("mallory")
    connect.enroll(mallory, "mallory")
    checked, swept = between_check_and_read(monkeypatch)
    channel = connect.channel(mallory.cert_path, mallory.key_path)
    with held(channel, WHOAMI) as (call, send):
        assert checked.wait(10)
        revoke(connect.server_registry, "mallory")
        connect.server.trust.poll()
        swept.set()
        assert code(call) == DENIED
        send.set()
    assert handler_calls.count == 0


def test_an_unrelated_change_between_the_check_and_the_read_refuses_nothing(
    connect: Connect,
    make_client: MakeClient,
    handler_calls: HandlerCalls,
    monkeypatch: pytest.MonkeyPatch,
    watched: Watched,
) -> None:
    """The allow twin: the same window with an enrollment of someone else; the call is served
    when its request comes."""
    alice, bob = make_client("alice"), make_client("bob")
    connect.enroll(alice, "alice")
    checked, swept = between_check_and_read(monkeypatch)
    channel = connect.channel(alice.cert_path, alice.key_path)
    with held(channel, WHOAMI) as (call, send):
        assert checked.wait(10)
        connect.enroll(bob, "bob")
        connect.server.trust.poll()
        swept.set()
        watched.waiting(alice.fingerprint)  # still waiting for its request
        assert not call.done()
        send.set()
        assert echo_pb2.WhoAmIResponse.FromString(call.result(timeout=5)).name == "alice"
    assert handler_calls.names == ["alice"]


def between_check_and_read(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, ...]:
    """A hook that stops each call after its check, before it waits for its request (sets
    the first event), until the second is set."""
    checked, swept = threading.Event(), threading.Event()
    first = RequestWatch.first

    def late(self: RequestWatch, *args: Any) -> Any:
        checked.set()
        swept.wait(10)
        return first(self, *args)

    monkeypatch.setattr(RequestWatch, "first", late)
    return checked, swept


def test_a_request_that_comes_as_the_revocation_ends_its_call_reaches_no_handler(
    connect: Connect,
    make_client: MakeClient,
    handler_calls: HandlerCalls,
    monkeypatch: pytest.MonkeyPatch,
    watched: Watched,
) -> None:
    """The revocation's sweep has chosen mallory's waiting call, and her request arrives before
    the sweep ends it (a hook sends it then): the call is refused, its handler never runs."""
    mallory = make_client("mallory")
    connect.enroll(mallory, "mallory")
    channel = connect.channel(mallory.cert_path, mallory.key_path)
    end_call, ended = request_watch.end_call, RequestWatch._ended
    came = threading.Event()

    def late(context: grpc.ServicerContext, status: grpc.StatusCode, details: str) -> None:
        send.set()
        # The request came: its call's thread either runs the handler or waits for this sweep.
        eventually(lambda: bool(handler_calls.count) or came.is_set(), timeout=5)
        end_call(context, status, details)

    def coming(watch: RequestWatch, context: grpc.ServicerContext) -> Any:
        came.set()
        return ended(watch, context)

    monkeypatch.setattr(RequestWatch, "_ended", coming)
    with held(channel, WHOAMI) as (call, send):
        watched.waiting(mallory.fingerprint)
        monkeypatch.setattr(request_watch, "end_call", late)
        revoke(connect.server_registry, "mallory")
        connect.server.trust.poll()
        assert call.exception(timeout=3) is not None
        assert code(call) == DENIED
    assert handler_calls.count == 0


def withheld_raw(address: tuple[str, int], source: str, method: str, n: int) -> list[str]:
    """``n`` calls in plaintext h2 frames from ``source``, headers only; the grpc-status of
    those the server ends within GRACE + 4 s."""
    require_attack_modules()
    import h2.config
    import h2.connection
    import h2.events

    conn = h2.connection.H2Connection(h2.config.H2Configuration())
    conn.initiate_connection()
    for _ in range(n):
        conn.send_headers(
            conn.get_next_available_stream_id(),
            [(":method", "POST"), (":scheme", "http"), (":path", method),
             (":authority", "probe"), ("content-type", "application/grpc"), ("te", "trailers")],
        )  # fmt: skip
    statuses: list[str] = []
    with socket.create_connection(address, timeout=0.2, source_address=(source, 0)) as sock:
        sock.sendall(conn.data_to_send())
        deadline = time.monotonic() + request_watch.GRACE + 4
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            for event in conn.receive_data(data):
                answer = isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived)
                if answer and (status := dict(event.headers).get(b"grpc-status")):  # type: ignore[attr-defined]
                    statuses.append(status.decode())
            sock.sendall(conn.data_to_send())
    return statuses


def test_withheld_health_checks_cannot_starve_the_probes(
    with_probe: RunningServer,  # noqa: F811
    watched: Watched,
) -> None:
    """The plaintext health port needs no certificate and has two workers: a host that
    withholds its requests keeps one of them, and the probes (from another host) get the
    other."""
    address = ("127.0.0.1", with_probe.health_port or 0)
    attack = concurrent.futures.ThreadPoolExecutor(1).submit(
        withheld_raw, address, "127.0.0.2", "/grpc.health.v1.Health/Check", 4
    )
    watched.waiting("ipv4:127.0.0.2", 2)  # the attacker's calls hold both workers
    with grpc.insecure_channel(f"127.0.0.1:{address[1]}") as probe:
        started = time.monotonic()
        assert check(probe) == health_pb2.HealthCheckResponse.SERVING
        # The failure signal of the denial of service: a probe that waits for the attacker.
        assert time.monotonic() - started < request_watch.GRACE + 2
    assert attack.result(timeout=10) == [str(EXHAUSTED.value[0])] * 3  # one call kept


def test_undecodable_requests_on_the_side_ports_log_no_traceback(
    with_probe: RunningServer,  # noqa: F811
    enrolling: RunningServer,  # noqa: F811
    devca: ServerFiles,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The side ports read their request under watch too, and decode it the same tolerant way:
    a stranger's garbage is INVALID_ARGUMENT, not INTERNAL with a traceback logged per message
    (the allow twin: a valid request on the same channel is answered)."""
    with grpc.insecure_channel(f"127.0.0.1:{with_probe.health_port}") as probe:
        garbage = probe.unary_unary("/grpc.health.v1.Health/Check", None, None)
        watch = probe.unary_stream("/grpc.health.v1.Health/Watch", None, None)
        with caplog.at_level(logging.DEBUG):
            for _ in range(3):
                assert code_of(lambda: garbage(GARBAGE, timeout=5)) == INVALID
                assert code_of(lambda: list(watch(GARBAGE, timeout=5))) == INVALID
        assert check(probe) == health_pb2.HealthCheckResponse.SERVING
    creds = grpc.ssl_channel_credentials(root_certificates=devca.ca_path.read_bytes())
    target, options = f"127.0.0.1:{enrolling.enrollment_port}", [SERVER_NAME_OVERRIDE]
    with grpc.secure_channel(target, creds, options=options) as channel:
        for method in ("Challenge", "Request"):
            call = channel.unary_unary(f"/pinrpc.v1.Enrollment/{method}", None, None)
            with caplog.at_level(logging.DEBUG):
                assert code_of(lambda: call(GARBAGE, timeout=5)) == INVALID  # noqa: B023
        challenge = enrollment_pb2_grpc.EnrollmentStub(channel).Challenge
        assert challenge(enrollment_pb2.ChallengeRequest(), timeout=5).nonce
    assert not [r.getMessage() for r in caplog.records if r.exc_info]


def test_calls_under_a_stream_of_changes_end_once_and_leave_nothing_behind(
    connect: Connect,
    make_client: MakeClient,
    watched: Watched,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """mallory's calls send their request at once, a little later, never, or are cancelled,
    while the registry changes again and again (each change bumps the watch's generation and
    re-checks her waiting calls); then she is revoked. Every call ends as it should and is
    counted once, nothing logs a traceback, and the watch keeps no record of any of them."""
    mallory = make_client("mallory")
    connect.enroll(mallory, "mallory")
    others = [make_client(f"other{i}") for i in range(6)]
    send_late, release = threading.Event(), threading.Event()

    def requests(kind: int) -> Iterator[bytes]:
        if kind == 1:
            send_late.wait(30)
        elif kind >= 2:  # withheld (2), or cancelled while it waits (3)
            release.wait(30)
            return
        yield b""

    call = connect.channel(mallory.cert_path, mallory.key_path).stream_unary(WHOAMI, None, None)
    kinds = [0, 1, 2, 3] * 3
    calls: list[Any] = [call.future(requests(kind), timeout=30) for kind in kinds]
    with caplog.at_level(logging.DEBUG):
        try:
            watched.waiting(mallory.fingerprint, kinds.count(1) + kinds.count(2) + 3)
            for i, other in enumerate(others):
                connect.enroll(other, f"other{i}")
                if i == 1:
                    send_late.set()
                if i == 3:
                    for c, kind in zip(calls, kinds, strict=True):
                        if kind == 3:
                            c.cancel()
            watched.waiting(mallory.fingerprint, kinds.count(2))
            revoke(connect.server_registry, "mallory")
            connect.server.trust.poll()
            # The client's own cancels end as CANCELLED for it: only the server's count tells.
            got = [outcome(c) for c, kind in zip(calls, kinds, strict=True) if kind != 3]
        finally:
            send_late.set()
            release.set()
        assert got == ["mallory" if kind < 2 else DENIED for kind in kinds if kind != 3]
        total = {"OK": 6, "CANCELLED": 3, "PERMISSION_DENIED": 3}
        # A cancel ends the requests first: it was counted UNIMPLEMENTED (no request) at times.
        eventually(lambda: {k: sum(counted(connect, k).values()) for k in total} == total, 5)
        assert sum(v for f in ("UNKNOWN", "INTERNAL") for v in counted(connect, f).values()) == 0
        watch = watched.watch
        assert watch is not None and watch.waiting(mallory.fingerprint) == 0
        eventually(lambda: not watch._ending, timeout=3)  # each call took what a sweep left
    assert not [r.getMessage() for r in caplog.records if r.exc_info]


def outcome(call: Any) -> str | grpc.StatusCode:
    """The name WhoAmI answered, or the status the call ended with."""
    error = call.exception(timeout=10)
    return error.code() if error else echo_pb2.WhoAmIResponse.FromString(call.result()).name


def test_calls_cancelled_while_they_wait_for_their_request_are_counted_as_cancelled(
    connect: Connect, make_client: MakeClient, watched: Watched
) -> None:
    """A cancel (RST_STREAM) ends a call's requests before gRPC reports the cancel: each call
    read 'no request' and about one in four was counted UNIMPLEMENTED, an answer its client
    never got. (The allow twin, a call that really ends without its request, is counted
    UNIMPLEMENTED in test_withheld_requests_cannot_hold_every_worker.)"""
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    n, rounds = 24, 6  # within the pool, so that no call waits for a thread or is held back
    channel = connect.channel(alice.cert_path, alice.key_path)
    release = threading.Event()

    def nothing() -> Iterator[bytes]:
        release.wait(30)
        yield from ()

    try:
        for done in range(0, n * rounds, n):
            call = channel.stream_unary(WHOAMI, None, None)
            calls: list[Any] = [call.future(nothing()) for _ in range(n)]
            watched.waiting(alice.fingerprint, n)
            for call in calls:
                call.cancel()
            watched.waiting(alice.fingerprint, 0)
            ends = {"CANCELLED": done + n}  # and nothing else
            eventually(lambda: {k: v for k, v in ended_as(connect).items() if v} == ends, 5)  # noqa: B023
    finally:
        release.set()


def ended_as(connect: Connect) -> dict[str, float]:
    """alice's WhoAmI calls by the status they were counted with."""
    codes = ("OK", "CANCELLED", "UNIMPLEMENTED", "DEADLINE_EXCEEDED", "UNKNOWN")
    return {code: counted(connect, code).get(("alice", WHOAMI), 0) for code in codes}
