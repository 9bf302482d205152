"""Big messages on the ports strangers reach without a certificate (enrollment, health).

gRPC's defaults let a stranger send 4 MB messages there, and the HTTP/2 window each connection
grows for them (BDP probing) held that memory: 96 connections sending five 4 MB enrollment
requests each took the server from 60 MB to a 1,276 MB peak and kept 919 MB. Both ports now
refuse a message over 128 KiB before it is read whole, with BDP probing off."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pinrpc.v1 import enrollment_pb2, enrollment_pb2_grpc
from server.fdlimit import SIDE_PORT_MAX_MESSAGE
from tests.conftest import SERVER_NAME, ServerFiles, code_of, eventually
from tests.security.attacker import ServerProcess, serve_process

SIDE_PORTS = ("--enrollment-listen", "127.0.0.1:0", "--health-listen", "127.0.0.1:0")
LEGITIMATE = 64 * 1024  # the largest certificate an enrollment request may carry


@pytest.fixture
def server(devca: ServerFiles, tmp_path: Path) -> Iterator[tuple[ServerProcess, int, int]]:
    log = tmp_path / "serve.log"
    with serve_process(devca.cert, devca.key, tmp_path / "reg.db", log, *SIDE_PORTS) as running:
        ports: dict[str, int] = {}

        def listed() -> bool:
            text = log.read_text(errors="replace")
            for what in ("enrollment requests", "health probes"):
                if found := re.search(rf"{what}.* \(port (\d+)\)", text):
                    ports[what] = int(found.group(1))
            return len(ports) == 2

        eventually(listed, timeout=20)
        yield running, ports["enrollment requests"], ports["health probes"]


def _enrollment(devca: ServerFiles, port: int) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=devca.ca_path.read_bytes())
    options = [
        ("grpc.ssl_target_name_override", SERVER_NAME),
        ("grpc.use_local_subchannel_pool", 1),
    ]
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options)


def _request(size: int) -> enrollment_pb2.EnrollmentRequest:
    return enrollment_pb2.EnrollmentRequest(certificate_pem="x" * size, name="mallory")


def test_an_oversized_enrollment_request_is_refused_before_the_server_reads_it(
    server: tuple[ServerProcess, int, int], devca: ServerFiles
) -> None:
    """Over the cap: gRPC's RESOURCE_EXHAUSTED. The allow twin: a request carrying the largest
    certificate the server accepts reaches the server's own check (here INVALID_ARGUMENT: it
    is no certificate)."""
    _, port, _ = server
    with _enrollment(devca, port) as channel:
        stub = enrollment_pb2_grpc.EnrollmentStub(channel)
        too_big = _request(SIDE_PORT_MAX_MESSAGE + 1)
        assert (
            code_of(lambda: stub.Request(too_big, timeout=10)) is grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        at_most = _request(LEGITIMATE)
        assert (
            code_of(lambda: stub.Request(at_most, timeout=10)) is grpc.StatusCode.INVALID_ARGUMENT
        )


def test_an_oversized_health_check_is_refused(server: tuple[ServerProcess, int, int]) -> None:
    _, _, port = server
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        big = health_pb2.HealthCheckRequest(service="x" * (SIDE_PORT_MAX_MESSAGE + 1))
        assert code_of(lambda: check(big, timeout=10)) is grpc.StatusCode.RESOURCE_EXHAUSTED
        named = health_pb2.HealthCheckRequest(service="x" * 1000)  # an unknown name, read
        assert code_of(lambda: check(named, timeout=10)) is grpc.StatusCode.NOT_FOUND


def test_strangers_big_messages_do_not_pile_up_in_server_memory(
    server: tuple[ServerProcess, int, int], devca: ServerFiles
) -> None:
    """32 connections, five 4 MB requests each: the server's peak RSS grew by 513 MB before
    (60 to 573 MB), about 10 MB now. The bound leaves room for a busier machine."""
    running, port, _ = server
    status = Path(f"/proc/{running.pid}/status")

    def peak_mib() -> int:
        found = re.search(r"^VmHWM:\s+(\d+) kB", status.read_text(), re.MULTILINE)
        assert found
        return int(found.group(1)) // 1024

    before = peak_mib()
    flood = _request(4 * 1024 * 1024 - 100)

    def stranger() -> None:
        with _enrollment(devca, port) as channel:
            stub = enrollment_pb2_grpc.EnrollmentStub(channel)
            for _ in range(5):
                with contextlib.suppress(grpc.RpcError):  # refused, before and now
                    stub.Request(flood, timeout=20)

    threads = [threading.Thread(target=stranger) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert peak_mib() - before < 150, (before, peak_mib())
