"""The per-call check's own parts, on real servers: where the leaf certificate is read from, and
what the per-snapshot memo may hold."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, cast

import grpc
import grpc.aio

from pinrpc.identity import KeyPairFiles
from server import auth
from tests.conftest import ECHO_ALL, SERVER_NAME, Connect, MakeClient, ServerFiles, code_of, whoami

PEEK = "/test.Peek/Peek"


def _credentials(devca: ServerFiles, client: KeyPairFiles, *, require: bool) -> Any:
    return grpc.ssl_server_credentials(
        [(devca.key.read_bytes(), devca.cert.read_bytes())],
        root_certificates=client.cert_path.read_bytes(),
        require_client_auth=require,
    )


def _handlers(behavior: Callable[..., Any]) -> list[grpc.GenericRpcHandler[Any, Any]]:
    method = grpc.unary_unary_rpc_method_handler(behavior)
    return [grpc.method_handlers_generic_handler("test.Peek", {"Peek": method})]


@contextmanager
def _sync_server(
    devca: ServerFiles, client: KeyPairFiles, behavior: Callable[..., Any], *, require: bool
) -> Iterator[int]:
    with ThreadPoolExecutor(2) as executor:
        server = grpc.server(executor, handlers=_handlers(behavior))
        port = server.add_secure_port("127.0.0.1:0", _credentials(devca, client, require=require))
        server.start()
        try:
            yield port
        finally:
            server.stop(None)


def _peek(devca: ServerFiles, port: int, client: KeyPairFiles | None) -> None:
    key, cert = (
        (client.key_path.read_bytes(), client.cert_path.read_bytes()) if client else (None, None)
    )
    creds = grpc.ssl_channel_credentials(devca.ca_path.read_bytes(), key, cert)
    options = [("grpc.ssl_target_name_override", SERVER_NAME)]
    with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
        channel.unary_unary(PEEK, None, None)(b"", timeout=5)


def test_leaf_pem_takes_grpcios_accessor_and_agrees_with_auth_context(
    devca: ServerFiles, make_client: MakeClient
) -> None:
    alice = make_client("alice")
    seen: dict[str, bytes | None] = {}

    def behavior(_request: bytes, context: grpc.ServicerContext) -> bytes:
        # The accessor leaf_pem() prefers must work on the grpcio this project pins.
        fast = auth._cy_auth_context(context._rpc_event.call)  # type: ignore[attr-defined]
        seen["fast"] = fast[b"x509_pem_cert"][0]
        seen["public"] = cast(Any, context.auth_context())["x509_pem_cert"][0]
        seen["leaf_pem"] = auth.leaf_pem(context)
        return b""

    with _sync_server(devca, alice, behavior, require=True) as port:
        _peek(devca, port, alice)
    assert seen["leaf_pem"] == seen["public"] == seen["fast"] == alice.cert_path.read_bytes()


def test_leaf_pem_is_none_without_a_client_certificate(
    devca: ServerFiles, make_client: MakeClient
) -> None:
    alice = make_client("alice")
    seen: list[bytes | None] = []

    def behavior(_request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(auth.leaf_pem(context))
        return b""

    # Without require_client_auth grpcio does not even ask for one: no call carries a leaf.
    with _sync_server(devca, alice, behavior, require=False) as port:
        _peek(devca, port, None)
        _peek(devca, port, alice)
    assert seen == [None, None]


def test_leaf_pem_falls_back_to_the_public_call(
    devca: ServerFiles, make_client: MakeClient
) -> None:
    """grpc.aio's context has no ``_rpc_event``: the public auth_context() answers instead."""
    alice = make_client("alice")
    seen: list[tuple[bool, bytes | None]] = []

    async def behavior(_request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        seen.append((hasattr(context, "_rpc_event"), auth.leaf_pem(context)))  # type: ignore[arg-type]
        return b""

    async def run() -> None:
        server = grpc.aio.server(handlers=_handlers(behavior))
        port = server.add_secure_port("127.0.0.1:0", _credentials(devca, alice, require=True))
        await server.start()
        try:
            await asyncio.to_thread(_peek, devca, port, alice)
        finally:
            await server.stop(None)

    asyncio.run(run())
    assert seen == [(False, alice.cert_path.read_bytes())]


def test_memo_holds_enrolled_certificates_and_served_methods_only(
    connect: Connect, make_client: MakeClient
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice", ECHO_ALL)
    stub = connect.stub(alice.cert_path, alice.key_path)
    assert whoami(stub).name == "alice"
    invented = connect.channel(alice.cert_path, alice.key_path)
    for i in range(20):  # method names are the caller's: none may enter the memo
        call = invented.unary_unary(f"/pinrpc.v1.Echo/Nope{i}", None, None)
        assert code_of(lambda: call(b"", timeout=5)) == grpc.StatusCode.UNIMPLEMENTED  # noqa: B023
    memo = connect.server.trust.enrolled.admitted
    assert list(memo) == [alice.cert_path.read_bytes()]
    assert memo[alice.cert_path.read_bytes()].methods == {"/pinrpc.v1.Echo/WhoAmI"}

    connect.enroll(make_client("bob"), "bob")  # any change: a new snapshot, an empty memo
    assert connect.server.trust.enrolled.admitted == {}
    assert whoami(stub).name == "alice"
