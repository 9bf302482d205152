"""A service of the user's own (ServerConfig.services): served behind the same check as
pinrpc's, its handlers read the caller, reflection lists it, and a handover keeps it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pinrpc.identity import KeyPairFiles
from server.app import start_server
from server.auth import caller
from server.config import ServeError, ServerConfig, Service
from tests.conftest import Connect, MakeClient, ServerFiles, revoke

GREETER = "test.Greeter"
HELLO = f"/{GREETER}/Hello"


def _hello(request: bytes, context: grpc.ServicerContext) -> bytes:
    who = caller()
    return f"hello {who.name}, you sent {request.decode()}".encode()


def _add_greeter(server: grpc.Server) -> None:
    # Bytes in and out: no generated code needed for a test service.
    handler = grpc.method_handlers_generic_handler(
        GREETER, {"Hello": grpc.unary_unary_rpc_method_handler(_hello)}
    )
    server.add_generic_rpc_handlers((handler,))


def _config(devca: ServerFiles, registry: Path, tls_reload: str) -> ServerConfig:
    return ServerConfig(
        "127.0.0.1:0", devca.cert, devca.key, str(registry), poll_interval=0.1, grace=1.0,
        tls_reload=tls_reload, max_connection_age=2.0,
        services=(Service(GREETER, _add_greeter),),
    )  # fmt: skip


@pytest.fixture(params=["inline", "handover"])
def greeting(
    request: pytest.FixtureRequest, devca: ServerFiles, registry: Path
) -> Iterator[Connect]:
    with start_server(_config(devca, registry, request.param)) as running:
        yield Connect(running, devca)


def _say_hello(connect: Connect, files: KeyPairFiles, method: str = HELLO) -> bytes:
    channel = connect.channel(files.cert_path, files.key_path)
    try:
        reply: bytes = channel.unary_unary(method, None, None)(b"hi", timeout=5)
        return reply
    finally:
        channel.close()


def _code(connect: Connect, files: KeyPairFiles, method: str = HELLO) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        _say_hello(connect, files, method)
    return caught.value.code()


def _enroll(connect: Connect, files: KeyPairFiles, name: str, *allow: str) -> None:
    connect.enroll(files, name, *allow)
    connect.server.listener.refresh()  # with handover: the new listener that trusts it


def test_a_user_service_gets_the_check_and_the_caller(
    greeting: Connect, make_client: MakeClient
) -> None:
    alice, bob, mallory = make_client("alice"), make_client("bob"), make_client("mallory")
    _enroll(greeting, alice, "alice", f"/{GREETER}/*")
    _enroll(greeting, bob, "bob")  # enrolled, but not allowed the greeter
    assert _say_hello(greeting, alice) == b"hello alice, you sent hi"
    assert _code(greeting, bob) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(greeting, mallory) == grpc.StatusCode.UNAVAILABLE  # not enrolled: no handshake
    assert _code(greeting, alice, f"/{GREETER}/Nope") == grpc.StatusCode.UNIMPLEMENTED
    # An enrollment (a new listener with --tls-reload handover) keeps the service, and a
    # revocation reaches it like any other.
    carol = make_client("carol")
    _enroll(greeting, carol, "carol", HELLO)
    assert _say_hello(greeting, carol) == b"hello carol, you sent hi"
    if greeting.server.config.tls_reload == "handover":
        assert greeting.server.listener.handovers == 3
    revoke(greeting.server_registry, "alice")
    greeting.server.trust.poll()
    assert _code(greeting, alice) in (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.PERMISSION_DENIED,
    )


@pytest.mark.parametrize("name", ["pinrpc.v1.Echo", "grpc.health.v1.Health", GREETER])
def test_a_service_name_served_twice_is_refused_before_starting(
    devca: ServerFiles, registry: Path, name: str
) -> None:
    twice = (Service(GREETER, _add_greeter), Service(name, _add_greeter))
    config = dataclasses.replace(_config(devca, registry, "inline"), services=twice)
    with pytest.raises(ServeError, match=f"service '{name}' is served twice"), start_server(config):
        pass
