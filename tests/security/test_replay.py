"""Replay: record alice's successful session on the wire, send her bytes again, get nothing.

A loopback relay tees a real session; the recorded client->server bytes are then replayed on a
new connection. The server's fresh random (and ephemeral key share) makes the recorded
handshake signature and Finished worthless, so no call reaches a handler.
"""

from __future__ import annotations

from collections.abc import Iterator

from pinrpc.channel import secure_channel
from pinrpc.v1 import echo_pb2_grpc
from tests.conftest import SERVER_NAME, Connect, MakeClient, whoami
from tests.security.attacker import TeeRelay, attack, exchange, server_hello_random
from tests.security.conftest import HandlerCalls

APPLICATION_DATA = 23


def records(stream: bytes) -> Iterator[int]:
    """Content types of the TLS records in a byte stream (a cut-off last record included)."""
    i = 0
    while i + 5 <= len(stream):
        yield stream[i]
        i += 5 + int.from_bytes(stream[i + 3 : i + 5], "big")


def test_replayed_tls13_grpc_session_gets_no_call_through(
    connect: Connect, make_client: MakeClient, handler_calls: HandlerCalls
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    relay = TeeRelay(("127.0.0.1", connect.server.port))
    try:
        target = f"127.0.0.1:{relay.port}"
        ca = connect.devca.ca_path
        with secure_channel(target, alice.cert_path, alice.key_path, ca, SERVER_NAME) as channel:
            assert whoami(echo_pb2_grpc.EchoStub(channel)).name == "alice"
    finally:
        relay.close()
    assert handler_calls.count == 1
    (recorded,) = relay.recordings
    original = b"".join(recorded.to_client)
    assert len(recorded.to_server) >= 2  # ClientHello, then the client's flight and the call

    answer = b"".join(exchange(("127.0.0.1", connect.server.port), recorded.to_server))

    assert server_hello_random(answer) != server_hello_random(original)  # a fresh challenge
    assert handler_calls.count == 1  # the replayed call never reached WhoAmI
    assert len(answer) < len(original)
    # The server is fine and alice is not locked out.
    assert whoami(connect.stub(alice.cert_path, alice.key_path)).name == "alice"
    assert handler_calls.names == ["alice", "alice"]


def test_replayed_tls12_session_gets_no_application_data(
    connect: Connect, make_client: MakeClient, handler_calls: HandlerCalls
) -> None:
    """TLS 1.2 leaves record types in clear: the replay gets no application data at all."""
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    relay = TeeRelay(("127.0.0.1", connect.server.port))
    try:
        run = attack(
            "--server", f"127.0.0.1:{relay.port}", "--cert", alice.cert_path,
            "--key", alice.key_path, "--server-name", SERVER_NAME, "--tls", "1.2",
        )  # fmt: skip
    finally:
        relay.close()
    assert run.code == 0, run.out  # the recorded session was a successful call
    assert handler_calls.names == ["alice"]
    (recorded,) = relay.recordings
    original = b"".join(recorded.to_client)
    assert APPLICATION_DATA in records(original)

    answer = b"".join(exchange(("127.0.0.1", connect.server.port), recorded.to_server))

    assert server_hello_random(answer) != server_hello_random(original)
    assert APPLICATION_DATA not in records(answer)
    assert handler_calls.names == ["alice"]
