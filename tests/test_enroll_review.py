"""Enrollment requests under attack: one host must not lock everyone else out of the port,
and the requester passes on only its own fingerprint."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from client import cli as client_cli
from pinrpc import proof
from pinrpc.cli import Exit
from pinrpc.identity import KeyPairFiles, load_certificate, load_private_key
from pinrpc.v1 import enrollment_pb2, enrollment_pb2_grpc
from server.app import RunningServer, start_server
from server.config import ServerConfig
from server.requests import NONCES_PER_HOST, PENDING_PER_HOST, NonceBook
from tests.conftest import SERVER_NAME, MakeClient, ServerFiles
from tests.test_enrollment_requests import enrollment_stub, pending


@pytest.fixture
def enrolling(devca: ServerFiles, registry: Path) -> Iterator[RunningServer]:
    """Room for more requests than one host may make."""
    config = ServerConfig(
        "127.0.0.1:0", devca.cert, devca.key, str(registry),
        enrollment_listen="127.0.0.1:0", max_pending=PENDING_PER_HOST + 5,
    )  # fmt: skip
    with start_server(config) as running:
        yield running


def challenge(stub: enrollment_pb2_grpc.EnrollmentStub) -> bytes:
    nonce: bytes = stub.Challenge(enrollment_pb2.ChallengeRequest(), timeout=5).nonce
    return nonce


def submit(
    stub: enrollment_pb2_grpc.EnrollmentStub, files: KeyPairFiles, nonce: bytes | None = None
) -> enrollment_pb2.EnrollmentTicket:
    nonce = nonce or challenge(stub)
    cert, key = load_certificate(files.cert_path), load_private_key(files.key_path)
    request = enrollment_pb2.EnrollmentRequest(
        certificate_pem=files.cert_path.read_text(), name=files.cert_path.stem, nonce=nonce,
        signature=proof.sign(key, nonce, cert),
    )  # fmt: skip
    ticket: enrollment_pb2.EnrollmentTicket = stub.Request(request, timeout=5)
    return ticket


def test_one_host_cannot_take_every_challenge(
    enrolling: RunningServer, devca: ServerFiles, make_client: MakeClient
) -> None:
    """990 Challenge calls took every nonce (1,000 outstanding at most) in 0.5 s, and nobody
    else could request enrollment for the nonces' 5 minutes."""
    stub = enrollment_stub(enrolling, devca)
    issued: list[bytes] = []
    refused: grpc.RpcError | None = None
    deadline = time.monotonic() + 30
    while len(issued) < 1100 and time.monotonic() < deadline:
        try:
            issued.append(challenge(stub))
        except grpc.RpcError as exc:
            refused = exc
            break
    assert len(issued) == NONCES_PER_HOST
    assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "ipv4:127.0.0.1 are still unused" in (refused.details() or "")
    # Using one of them makes room for one more.
    assert submit(stub, make_client("carol"), issued.pop()).fingerprint
    assert challenge(stub)


def test_nonces_are_counted_per_host() -> None:
    """The bound is the host's (any source port), never everyone's."""
    book = NonceBook(dt.timedelta(minutes=5), limit=1000, per_host=2)
    mine = [book.issue("ipv4:192.0.2.1")[0] for _ in range(2)]
    with pytest.raises(Exception, match="still unused"):
        book.issue("ipv4:192.0.2.1")
    assert book.issue("ipv4:192.0.2.2")  # another host is served
    assert book.redeem(mine[0]) and not book.redeem(mine[0])
    assert book.issue("ipv4:192.0.2.1")


def test_one_host_cannot_fill_the_pending_list(
    enrolling: RunningServer,
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One host with many key pairs filled --max-pending alone, and every other requester was
    refused for the requests' lifetime (24 h by default)."""
    stub = enrollment_stub(enrolling, devca)
    for i in range(PENDING_PER_HOST):
        submit(stub, make_client(f"flood{i}"))
    with pytest.raises(grpc.RpcError) as info:
        submit(stub, make_client("one-more"))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = info.value.details() or ""
    assert details == (
        f"{PENDING_PER_HOST} enrollment requests from ipv4:127.0.0.1 are already waiting for "
        "the operator; try again once they are handled or expired"
    )
    names = [p["name"] for p in pending(registry, capsys)]
    assert len(names) == PENDING_PER_HOST and "one-more" not in names


class QueuesAnother(enrollment_pb2_grpc.EnrollmentServicer):
    """A server that answers a request with someone else's fingerprint (a bug, or hostile)."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint

    def Challenge(
        self, request: enrollment_pb2.ChallengeRequest, context: grpc.ServicerContext
    ) -> enrollment_pb2.ChallengeResponse:
        return enrollment_pb2.ChallengeResponse(nonce=b"n" * 32)

    def Request(
        self, request: enrollment_pb2.EnrollmentRequest, context: grpc.ServicerContext
    ) -> enrollment_pb2.EnrollmentTicket:
        return enrollment_pb2.EnrollmentTicket(fingerprint=self.fingerprint)


def test_the_client_never_passes_on_a_fingerprint_the_server_chose(
    devca: ServerFiles, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """`request-enrollment` printed the ticket's fingerprint as the one to approve: the
    operator, comparing it with what the requester relays, would approve another key."""
    carol, mallory = make_client("carol"), make_client("mallory")
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    enrollment_pb2_grpc.add_EnrollmentServicer_to_server(
        QueuesAnother(str(mallory.fingerprint)), server
    )
    pair = (devca.key.read_bytes(), devca.cert.read_bytes())
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([pair]))
    server.start()
    try:
        capsys.readouterr()
        argv = ["request-enrollment", "--name", "carol", "--server", f"127.0.0.1:{port}",
                "--cert", str(carol.cert_path), "--key", str(carol.key_path),
                "--ca", str(devca.ca_path), "--server-name", SERVER_NAME]  # fmt: skip
        assert client_cli.main(argv) == Exit.ERROR
    finally:
        server.stop(None).wait()
    out, err = capsys.readouterr()
    assert str(mallory.fingerprint) not in out and "approve" not in out
    assert err.count("\n") == 1
    assert f"not for your certificate {carol.fingerprint}" in err
