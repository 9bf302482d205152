"""Streams that are already open: a revocation reaches them on their next message, and they
cannot hold the server's worker threads hostage."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc

from pinrpc.identity import KeyPairFiles
from pinrpc.v1 import echo_pb2
from tests.conftest import ECHO_ALL, Connect, MakeClient, code_of, revoke

DENIED = grpc.StatusCode.PERMISSION_DENIED


class Bidi:
    """An EchoStream whose requests are sent one at a time, each answered before the next."""

    def __init__(self, connect: Connect, client: KeyPairFiles) -> None:
        self._requests: queue.Queue[str | None] = queue.Queue()
        stub = connect.stub(client.cert_path, client.key_path)
        self._replies: Iterator[echo_pb2.EchoResponse] = iter(
            stub.EchoStream(self._feed(), timeout=10)
        )

    def _feed(self) -> Iterator[echo_pb2.EchoRequest]:
        while (message := self._requests.get(timeout=10)) is not None:
            yield echo_pb2.EchoRequest(message=message)

    def echo(self, message: str) -> str:
        self._requests.put(message)
        return next(self._replies).message

    def close(self) -> None:
        self._requests.put(None)  # the end of the requests, which ends the call


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
