"""Streams that are already open: a revocation reaches them on their next message, and they
cannot hold the server's worker threads hostage."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pinrpc.identity import KeyPairFiles
from pinrpc.v1 import echo_pb2
from server.auth import UNKNOWN_METHOD, StreamCap, streams_per_client
from tests.conftest import ECHO_ALL, Connect, MakeClient, code_of, eventually, revoke, whoami

DENIED = grpc.StatusCode.PERMISSION_DENIED
STREAM = "/pinrpc.v1.Echo/EchoStream"
WATCH = "/grpc.health.v1.Health/Watch"


class Bidi:
    """An EchoStream whose requests are sent one at a time, each answered before the next."""

    def __init__(self, connect: Connect, client: KeyPairFiles, timeout: float = 10) -> None:
        self._requests: queue.Queue[str | None] = queue.Queue()
        stub = connect.stub(client.cert_path, client.key_path)
        self._call = stub.EchoStream(self._feed(), timeout=timeout)
        self._replies: Iterator[echo_pb2.EchoResponse] = iter(self._call)

    def _feed(self) -> Iterator[echo_pb2.EchoRequest]:
        while (message := self._requests.get(timeout=10)) is not None:
            yield echo_pb2.EchoRequest(message=message)

    def echo(self, message: str, wait: float = 0) -> str:
        """Send ``message`` (``wait`` seconds later) and return its echo."""
        time.sleep(wait)
        self._requests.put(message)
        return next(self._replies).message

    def reply(self) -> str:
        """The next echo, without sending anything."""
        return next(self._replies).message

    def cancel(self) -> None:
        self._call.cancel()  # type: ignore[no-untyped-call]  # untyped in grpc-stubs

    def close(self) -> None:
        self._requests.put(None)  # the end of the requests, which ends the call


def counted(connect: Connect, code: str) -> dict[tuple[str, str], float]:
    """pinrpc_calls_total for calls that ended with ``code``, by client and method."""
    return {
        (sample.labels["client"], sample.labels["method"]): sample.value
        for family in connect.server.metrics.calls.collect()
        for sample in family.samples
        if sample.labels["code"] == code
    }


def test_revocation_stops_an_open_stream_on_its_next_message(
    connect: Connect, make_client: MakeClient
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice", ECHO_ALL)
    stream = Bidi(connect, alice)
    try:
        assert stream.echo("before") == "before"
        revoke(connect.server_registry, "alice")
        connect.server.trust.poll()
        assert code_of(lambda: stream.echo("after")) == DENIED
    finally:
        stream.close()
    # Counted once, as the re-check reported it (like any call of a caller no longer enrolled),
    # not again as the stream ended. The stream's wrapper has counted before gRPC sends the
    # status, so there is nothing to wait for.
    assert counted(connect, "PERMISSION_DENIED") == {("", UNKNOWN_METHOD): 1}


def test_revocation_ends_idle_streams_and_gives_their_threads_back(
    connect: Connect, make_client: MakeClient
) -> None:
    """Clients holding every worker thread with streams that send nothing more are revoked: the
    streams end at once (not at a next message that never comes), each refusal counted once,
    and another client's call is served."""
    share = streams_per_client(connect.server.config.max_workers)
    holders = [make_client(f"holder{i}") for i in range(connect.server.config.max_workers // share)]
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    streams: list[Bidi] = []
    for holder in holders:
        connect.enroll(holder, holder.cert_path.stem, ECHO_ALL)
        streams += [Bidi(connect, holder) for _ in range(share)]
    try:
        assert {stream.echo("held") for stream in streams} == {"held"}
        for holder in holders:
            revoke(connect.server_registry, holder.cert_path.stem)
        connect.server.trust.poll()
        assert whoami(connect.stub(alice.cert_path, alice.key_path)).name == "alice"
        assert {code_of(stream.reply) for stream in streams} == {DENIED}
    finally:
        for stream in streams:
            stream.close()
    assert counted(connect, "PERMISSION_DENIED") == {("", UNKNOWN_METHOD): len(streams)}


def test_revocation_ends_an_idle_health_watch(connect: Connect, make_client: MakeClient) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    connect.enroll(alice, "alice")
    watches = []
    for client in (alice, bob):
        health = health_pb2_grpc.HealthStub(connect.channel(client.cert_path, client.key_path))
        watches.append(health.Watch(health_pb2.HealthCheckRequest(), timeout=10))
        if client is alice:
            assert next(watches[0]).status == health_pb2.HealthCheckResponse.SERVING
            connect.enroll(bob, "bob")  # a change that leaves alice's watch alone
    try:
        assert next(watches[1]).status == health_pb2.HealthCheckResponse.SERVING
        assert not watches[0].done()
        revoke(connect.server_registry, "alice")
        connect.server.trust.poll()
        assert code_of(lambda: next(watches[0])) == DENIED
        assert not watches[1].done()
    finally:
        for watch in watches:
            watch.cancel()


def test_an_open_stream_survives_an_unrelated_enrollment(
    connect: Connect, make_client: MakeClient
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice", ECHO_ALL)
    stream = Bidi(connect, alice)
    try:
        assert stream.echo("before") == "before"
        connect.enroll(make_client("bob"), "bob")  # a new snapshot, alice still in it
        assert [stream.echo(f"after-{i}") for i in range(3)] == ["after-0", "after-1", "after-2"]
    finally:
        stream.close()


def test_streams_the_client_ends_are_counted_as_cancelled_or_past_their_deadline(
    connect: Connect, make_client: MakeClient
) -> None:
    """Not as UNKNOWN, which is what a handler's own failure is counted as."""
    alice = make_client("alice")
    connect.enroll(alice, "alice", ECHO_ALL)
    cancelled, late = Bidi(connect, alice), Bidi(connect, alice, timeout=0.5)
    try:
        assert cancelled.echo("one") == late.echo("one") == "one"
        cancelled.cancel()
        assert code_of(lambda: late.echo("too late", wait=1.0)) == grpc.StatusCode.DEADLINE_EXCEEDED
        for code in ("CANCELLED", "DEADLINE_EXCEEDED"):
            eventually(lambda: counted(connect, code) == {("alice", STREAM): 1}, timeout=3)  # noqa: B023
    finally:
        cancelled.close()
        late.close()
    assert counted(connect, "UNKNOWN") == {}


def test_a_cancelled_health_watch_is_counted_as_cancelled(
    connect: Connect, make_client: MakeClient
) -> None:
    """A Watch answers without a thread; its end, not its handler, tells how it ended."""
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    health = health_pb2_grpc.HealthStub(connect.channel(alice.cert_path, alice.key_path))
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    method = "/grpc.health.v1.Health/Watch"
    eventually(lambda: counted(connect, "CANCELLED") == {("alice", method): 1}, timeout=3)
    assert counted(connect, "OK") == {}


def test_streams_whose_requests_end_with_their_deadline_are_not_counted_as_ok(
    connect: Connect, make_client: MakeClient
) -> None:
    """The deadline can end a stream's requests before gRPC reports the call cancelled: the
    handler then returns normally, but the client got DEADLINE_EXCEEDED (about half of such
    streams were counted OK)."""
    alice = make_client("alice")
    connect.enroll(alice, "alice", ECHO_ALL)
    late = [Bidi(connect, alice, timeout=0.5) for _ in range(6)]
    try:
        assert {stream.echo("one") for stream in late} == {"one"}
        time.sleep(1.0)
        assert {code_of(stream.reply) for stream in late} == {grpc.StatusCode.DEADLINE_EXCEEDED}
        eventually(lambda: sum(counted(connect, "DEADLINE_EXCEEDED").values()) == 6, timeout=3)
    finally:
        for stream in late:
            stream.close()
    assert counted(connect, "OK") == {}


def test_health_watches_hold_no_worker_thread(connect: Connect, make_client: MakeClient) -> None:
    """As many Watch streams as the server has worker threads, each from a client within its
    share: another client's call is still served (a blocking Watch would hold a thread each)."""
    workers = connect.server.config.max_workers
    share = streams_per_client(workers)
    watchers = [make_client(f"watcher{i}") for i in range(workers // share)]
    for watcher in watchers:
        connect.enroll(watcher, watcher.cert_path.stem)  # no permissions: health is always allowed
    alice = make_client("alice")
    connect.enroll(alice, "alice", ECHO_ALL)
    watches = []
    for watcher in watchers:
        health = health_pb2_grpc.HealthStub(connect.channel(watcher.cert_path, watcher.key_path))
        watches += [health.Watch(health_pb2.HealthCheckRequest(), timeout=10) for _ in range(share)]
    for watch in watches:
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    try:
        assert whoami(connect.stub(alice.cert_path, alice.key_path)).name == "alice"
    finally:
        for watch in watches:
            watch.cancel()


def test_a_client_may_not_hold_more_streams_than_its_share(
    connect: Connect, make_client: MakeClient
) -> None:
    """A client with no permissions keeps its share of reflection streams open: one more is
    refused, another client's call is served, and the share is given back as streams end."""
    low, alice = make_client("low"), make_client("alice")
    connect.enroll(low, "low")  # reflection is always allowed
    connect.enroll(alice, "alice", ECHO_ALL)
    share = streams_per_client(connect.server.config.max_workers)
    stub = reflection_pb2_grpc.ServerReflectionStub(connect.channel(low.cert_path, low.key_path))
    release = threading.Event()

    def held() -> Iterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        release.wait(10)  # then the stream waits for its next request, holding its thread

    streams: list[Any] = []  # an unreferenced call is cancelled

    def opened() -> grpc.StatusCode:
        streams.append(stub.ServerReflectionInfo(held(), timeout=10))
        try:
            next(streams[-1])
        except grpc.RpcError as exc:
            refused.append(exc.details() or "")
            code: grpc.StatusCode = exc.code()
            return code
        return grpc.StatusCode.OK

    refused: list[str] = []
    try:
        assert [opened() for _ in range(share)] == [grpc.StatusCode.OK] * share
        assert opened() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"client 'low' already has {share} streams open" in refused[0]
        assert whoami(connect.stub(alice.cert_path, alice.key_path)).name == "alice"
    finally:
        release.set()
    eventually(lambda: opened() == grpc.StatusCode.OK, timeout=3)


def test_a_watch_that_ends_as_its_request_comes_gives_its_place_back(
    connect: Connect, make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alice cancels a Watch after its request came but before it took its place under her
    cap (a hook holds it there until the cancel has been counted): it keeps no place, so she
    may still open her whole share. Before, each such race cost her one place for good."""
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    share = streams_per_client(connect.server.config.max_workers)
    arrived, counted_end, held = threading.Event(), threading.Event(), threading.Event()
    acquire = StreamCap.acquire

    def late(self: StreamCap, stream: Any) -> bool:
        if arrived.is_set():
            return acquire(self, stream)
        arrived.set()
        counted_end.wait(10)
        try:
            return acquire(self, stream)
        finally:
            held.set()

    monkeypatch.setattr(StreamCap, "acquire", late)
    health = health_pb2_grpc.HealthStub(connect.channel(alice.cert_path, alice.key_path))
    request = health_pb2.HealthCheckRequest()
    raced = health.Watch(request, timeout=10)
    assert arrived.wait(10)
    raced.cancel()
    eventually(lambda: counted(connect, "CANCELLED") == {("alice", WATCH): 1}, timeout=5)
    counted_end.set()
    assert held.wait(10)
    watches = [health.Watch(request, timeout=10) for _ in range(share)]
    try:
        assert {next(w).status for w in watches} == {health_pb2.HealthCheckResponse.SERVING}
    finally:
        for watch in watches:
            watch.cancel()
