"""Shared fixtures: a stand-in CA for the server certificate, client identities, real servers."""

from __future__ import annotations

import itertools
import json
import logging
import os
import select
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from pinrpc import proof, secure_channel
from pinrpc.identity import (
    Fingerprint,
    KeyPairFiles,
    PrivateKey,
    create_identity,
    load_private_key,
    parse_single_certificate,
)
from pinrpc.v1 import echo_pb2, echo_pb2_grpc, identity_pb2
from server import cli as server_cli
from server.app import RunningServer, start_server
from server.config import ServerConfig
from server.devca import DevCA
from server.enrollment import Candidate
from server.registry import open_registry
from tests.pebble import Pebble, pebble_binary, start_pebble

if TYPE_CHECKING:
    from tests.postgres import Postgres

SERVER_NAME = "server.test"
ECHO_ALL = "/pinrpc.v1.Echo/*"


@dataclass(frozen=True)
class ServerFiles:
    ca: DevCA
    ca_path: Path
    cert: Path
    key: Path


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """`serve` configures logging for its process: the root logger gets a handler on the stderr
    of the moment (under capsys a capture file, closed after the test), and the audit logger
    INFO. Later tests must neither log into a closed file nor capture lines logged before
    their capture began."""
    root, audit = logging.getLogger(), logging.getLogger("pinrpc.audit")
    handlers, level, audit_level = root.handlers[:], root.level, audit.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    audit.setLevel(audit_level)


def require_tool(found: bool, what: str, install: str) -> None:
    """Outside CI a missing tool skips with the reason; under CI=true it fails the test."""
    if found:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is required in CI: {install}")
    pytest.skip(f"{what} is not installed ({install})")


def require_pebble() -> None:
    require_tool(pebble_binary() is not None, "pebble", "apt-get install -y pebble")


@pytest.fixture(scope="session")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    """One real pebble (Let's Encrypt's test CA) for the whole session."""
    require_pebble()
    with start_pebble(tmp_path_factory.mktemp("pebble")) as running:
        yield running


@pytest.fixture(scope="session")
def devca(tmp_path_factory: pytest.TempPathFactory) -> ServerFiles:
    directory = tmp_path_factory.mktemp("server-cert")
    ca = DevCA()
    cert, key = ca.issue([SERVER_NAME, "localhost", "127.0.0.1"]).write(directory)
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.root_pem)
    return ServerFiles(ca, ca_path, cert, key)


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    return tmp_path / "registry.db"


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    """One real PostgreSQL cluster per test module that asks for it."""
    from tests.postgres import running_postgres  # it imports this module

    with running_postgres() as cluster:
        yield cluster


_databases = itertools.count()


@pytest.fixture(params=["sqlite", "postgresql"])
def spec(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A new, empty registry of each kind."""
    if request.param == "sqlite":
        return str(tmp_path / "registry.db")
    cluster: Postgres = request.getfixturevalue("pg")
    return cluster.create_database(f"reg{next(_databases)}")


MakeClient = Callable[..., KeyPairFiles]


@pytest.fixture
def make_client(tmp_path: Path) -> MakeClient:
    def make(name: str, **kwargs: object) -> KeyPairFiles:
        return create_identity(name, tmp_path / "keys", **kwargs)  # type: ignore[arg-type]

    return make


def enroll(registry: Path, cert: Path, name: str, *allow: str, replace: bool = False) -> None:
    argv = ["enroll", str(cert), "--name", name, "--registry", str(registry)]
    argv += [f"--allow={pattern}" for pattern in allow]
    argv += ["--replace"] if replace else []
    assert server_cli.main(argv) == 0


def revoke(registry: Path, ref: str) -> None:
    assert server_cli.main(["revoke", ref, "--registry", str(registry)]) == 0


def registry_dump(registry: Path, capsys: pytest.CaptureFixture[str]) -> object:
    """Everything the registry holds, for 'unchanged' assertions."""
    if not registry.exists():
        return None
    capsys.readouterr()
    assert server_cli.main(["list", "--json", "--registry", str(registry)]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def server(devca: ServerFiles, registry: Path) -> Iterator[RunningServer]:
    config = ServerConfig(
        listen="127.0.0.1:0",
        cert=devca.cert,
        key=devca.key,
        registry=str(registry),
        poll_interval=0.1,
        grace=1.0,
    )
    with start_server(config) as running:
        yield running


@dataclass
class Connect:
    server: RunningServer
    devca: ServerFiles

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def enroll(self, files: KeyPairFiles, name: str, *allow: str) -> None:
        """Enroll, then make the server pick it up now instead of at its next poll."""
        enroll(self.server_registry, files.cert_path, name, *allow)
        self.server.trust.poll()

    def plant(self, candidate: Candidate, name: str) -> None:
        """Enroll bypassing validation, as a registry edited by hand would; then reload."""
        registry = open_registry(str(self.server_registry))
        try:
            registry.enroll(candidate, name, [ECHO_ALL])
        finally:
            registry.close()
        self.server.trust.poll()

    @property
    def server_registry(self) -> Path:
        return Path(self.server.config.registry)

    def channel(self, cert: Path, key: Path) -> grpc.Channel:
        return secure_channel(self.target, cert, key, self.devca.ca_path, SERVER_NAME)

    def stub(self, cert: Path, key: Path) -> echo_pb2_grpc.EchoStub:
        return echo_pb2_grpc.EchoStub(self.channel(cert, key))

    def cli_flags(self, files: KeyPairFiles) -> list[str]:
        return [
            "--server", self.target,
            "--cert", str(files.cert_path),
            "--key", str(files.key_path),
            "--ca", str(self.devca.ca_path),
            "--server-name", SERVER_NAME,
        ]  # fmt: skip


@pytest.fixture
def connect(server: RunningServer, devca: ServerFiles) -> Connect:
    return Connect(server, devca)


def whoami(stub: echo_pb2_grpc.EchoStub) -> echo_pb2.WhoAmIResponse:
    return stub.WhoAmI(echo_pb2.WhoAmIRequest(), timeout=5)


# How the server turns a client away: at the TLS handshake, or per call (an open connection).
REFUSALS = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED})


def admitted(stub: echo_pb2_grpc.EchoStub) -> bool:
    """Whether WhoAmI succeeds. Any other failure than a refusal (a handler's error, a missed
    deadline) fails the test: it is no evidence that the server turned the client away."""
    try:
        whoami(stub)
    except grpc.RpcError as exc:
        code = exc.code()
    else:
        return True
    assert code in REFUSALS, code
    return False


def rotate_with_key(caller: Fingerprint, pem: bytes, key: PrivateKey) -> identity_pb2.RotateRequest:
    """A RotateRequest for the certificate ``pem``, proved with ``key`` for the client whose
    current certificate is ``caller``."""
    cert = parse_single_certificate(pem, "the successor")
    signature = proof.sign(key, proof.rotation_binding(caller), cert, proof.ROTATION)
    return identity_pb2.RotateRequest(certificate_pem=pem.decode(), proof=signature)


def rotate_request(
    caller: Fingerprint, successor: KeyPairFiles, signer: Path | None = None
) -> identity_pb2.RotateRequest:
    """A rotation to ``successor`` from the client whose current certificate is ``caller``,
    proved with the key at ``signer`` (the successor's own by default)."""
    pem = successor.cert_path.read_bytes()
    return rotate_with_key(caller, pem, load_private_key(signer or successor.key_path))


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    """The status code a call fails with; fails the test if it succeeds."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    code: grpc.StatusCode = info.value.code()
    return code


def eventually(predicate: Callable[[], bool], timeout: float = 1.0) -> float:
    """Poll ``predicate`` until true; return the seconds it took, fail after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - start


def first_line(process: subprocess.Popen[str], deadline: float) -> str:
    """The next line ``process`` prints, stripped; one that prints none by ``deadline`` (a
    start-up that hangs) is killed, so the test fails instead of waiting for ever."""
    assert process.stdout is not None
    if not select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
        process.kill()
        raise AssertionError(f"no line from pid {process.pid} in time")
    return process.stdout.readline().strip()
