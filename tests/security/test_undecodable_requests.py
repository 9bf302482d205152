"""Bytes that are no valid request: the caller is checked first, as for any other call.

grpcio decodes a request before the handler runs; a decode failure used to end the call with
INTERNAL before the per-call check, so a caller who may not call the method got no refusal,
no audit line and no metric, and each message logged a traceback.
"""

from __future__ import annotations

import logging
import time

import grpc
import pytest

from pinrpc.v1 import echo_pb2
from server.app import RunningServer
from tests.conftest import ECHO_ALL, Connect, MakeClient, code_of, eventually
from tests.test_observe import audit_lines

GARBAGE = b"\xff\xff\xff"
DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID = grpc.StatusCode.INVALID_ARGUMENT
ECHO, STREAM = "/pinrpc.v1.Echo/Echo", "/pinrpc.v1.Echo/EchoStream"


def _calls(server: RunningServer, client: str, method: str, code: str) -> float:
    labels = {"client": client, "method": method, "code": code}
    return server.metrics.registry.get_sample_value("pinrpc_calls_total", labels) or 0


def test_undecodable_requests_are_checked_audited_and_counted(
    connect: Connect, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    connect.enroll(alice, "alice", ECHO_ALL)
    connect.enroll(bob, "bob")  # enrolled, may not call Echo
    alice_channel = connect.channel(alice.cert_path, alice.key_path)
    bob_channel = connect.channel(bob.cert_path, bob.key_path)

    def stream(channel: grpc.Channel, replies: list[bytes], *requests: bytes) -> None:
        call = channel.stream_stream(STREAM, None, None)
        replies.extend(call(iter(requests), timeout=5))

    valid = echo_pb2.EchoRequest(message="ok").SerializeToString()
    replies: list[bytes] = []
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            denied = lambda: bob_channel.unary_unary(ECHO, None, None)(GARBAGE, timeout=5)  # noqa: E731
            assert code_of(denied) == DENIED
        assert code_of(lambda: stream(bob_channel, replies, GARBAGE)) == DENIED
        with pytest.raises(grpc.RpcError) as invalid:
            alice_channel.unary_unary(ECHO, None, None)(GARBAGE, timeout=5)
        # Each message of a stream: the valid one is answered, the undecodable one ends it.
        assert code_of(lambda: stream(alice_channel, replies, valid, GARBAGE)) == INVALID
        # Health Watch (always allowed, served without a thread) takes the same path.
        watch = bob_channel.unary_stream("/grpc.health.v1.Health/Watch", None, None)
        assert code_of(lambda: list(watch(GARBAGE, timeout=5))) == INVALID
        lines = audit_lines(caplog, connect.server.audit)

    assert invalid.value.code() == INVALID
    assert invalid.value.details() == "request could not be decoded"
    assert [echo_pb2.EchoResponse.FromString(r).message for r in replies] == ["ok"]
    denies = [line for line in lines if line.get("decision") == "deny"]
    assert [(d["client"], d["method"], d["reason"]) for d in denies] == [
        ("bob", ECHO, "method_not_allowed")
    ] * 3 + [("bob", STREAM, "method_not_allowed")]
    server = connect.server
    assert _calls(server, "bob", ECHO, "PERMISSION_DENIED") == 3
    assert _calls(server, "bob", STREAM, "PERMISSION_DENIED") == 1
    assert _calls(server, "alice", ECHO, "INVALID_ARGUMENT") == 1
    assert _calls(server, "alice", STREAM, "INVALID_ARGUMENT") == 1
    # A Watch is counted when gRPC reports it ended, which may follow the client's status.
    watch_label = ("bob", "/grpc.health.v1.Health/Watch", "INVALID_ARGUMENT")
    eventually(lambda: _calls(server, *watch_label) >= 1, timeout=10)
    time.sleep(0.5)  # a second count (the stream's end seen twice) would land by now
    assert _calls(server, *watch_label) == 1
    assert not [r for r in caplog.records if r.name.startswith("grpc")], "gRPC logged a failure"
