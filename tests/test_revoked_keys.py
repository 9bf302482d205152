"""A key pair is one client, and a revoked certificate's key stays refused: a new certificate
made with a stolen, revoked key (or with a key enrolled under another certificate) is refused
by every way into the registry, on SQLite and a real PostgreSQL alike."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from client import cli as client_cli
from pinrpc import proof
from pinrpc.cli import Exit
from pinrpc.errors import ConflictError
from pinrpc.identity import (
    KeyPairFiles,
    cert_to_pem,
    load_certificate,
    load_private_key,
    self_signed_certificate,
)
from pinrpc.v1 import enrollment_pb2, identity_pb2_grpc
from server import cli as server_cli
from server.app import RunningServer
from server.enrollment import Candidate, check_certificate
from server.registry import Registry, open_registry
from tests.conftest import (
    ECHO_ALL,
    Connect,
    MakeClient,
    ServerFiles,
    registry_dump,
    rotate_request,
    rotate_with_key,
)
from tests.test_enrollment_requests import enrolling, enrollment_stub, pending, request_flags
from tests.test_lifecycle import ADMIN
from tests.test_registry_backends import candidate

__all__ = ["enrolling"]  # a fixture, imported for its name

HOUR = dt.timedelta(hours=1)


def same_key(files: KeyPairFiles, name: str) -> Path:
    """A new self-signed certificate for ``files``' key, as a thief holding the key makes."""
    key = load_private_key(files.key_path)
    path = files.cert_path.with_name(f"{name}-same-key.crt")
    path.write_bytes(cert_to_pem(self_signed_certificate(key, name)))
    return path


def read(path: Path) -> Candidate:
    return check_certificate(path.read_bytes(), str(path))


def snapshot(registry: Registry) -> tuple[object, ...]:
    return (
        [c.as_json() for c in registry.clients()],
        [p.as_json() for p in registry.pending()],
        registry.generation(),
    )


def test_a_revoked_key_is_refused_by_every_path(spec: str, make_client: MakeClient) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    registry = open_registry(spec)
    try:
        # A request queued while alice's key was unknown, approved once she was revoked.
        queued = read(same_key(alice, "queued"))
        registry.request_enrollment(queued, "queued", "peer", HOUR, 10)
        old = registry.enroll(read(alice.cert_path), "alice", [ECHO_ALL])
        registry.enroll(read(bob.cert_path), "bob", [ECHO_ALL])
        registry.revoke("alice")
        stolen = read(same_key(alice, "alice"))
        before = snapshot(registry)
        attempts: dict[str, Callable[[], object]] = {
            "enroll": lambda: registry.enroll(stolen, "alice", [ECHO_ALL]),
            "enroll as another name": lambda: registry.enroll(stolen, "mallory", [ECHO_ALL]),
            "re-key": lambda: registry.enroll(stolen, "bob", [], replace=True),
            "approve": lambda: registry.approve(str(queued.fingerprint), "alice", [ECHO_ALL]),
            "rotate": lambda: registry.rotate(bob.fingerprint, stolen, HOUR),
        }
        for path, attempt in attempts.items():
            with pytest.raises(ConflictError) as info:
                attempt()
            message = str(info.value)
            assert f"certificate {old.fingerprint}, revoked on " in message, path
            assert "(as 'alice')" in message and "`pinrpc keygen`" in message, path
            assert "\n" not in message
        # A stranger holding the key learns neither the name nor the date.
        with pytest.raises(ConflictError) as info:
            registry.request_enrollment(stolen, "alice", "peer", HOUR, 10)
        assert "already enrolled or was revoked" in str(info.value)
        assert "alice" not in str(info.value) and "pinrpc keygen" in str(info.value)
        assert snapshot(registry) == before
        # Allowed beside it: a fresh key pair for alice, and bob untouched.
        fresh = candidate(make_client, "alice-new")
        assert registry.enroll(fresh, "alice", [ECHO_ALL]).active
        assert registry.find("bob").active
    finally:
        registry.close()


def test_a_key_is_one_client(spec: str, make_client: MakeClient) -> None:
    """An enrolled key, current or retiring in a rotation's overlap, cannot come in again
    under another certificate: not under another name, not as its own re-key or successor."""
    alice, carol = make_client("alice"), make_client("carol")
    registry = open_registry(spec)
    try:
        current = registry.enroll(read(alice.cert_path), "alice", [ECHO_ALL])
        registry.enroll(read(carol.cert_path), "carol", [])
        again = read(same_key(alice, "alice2"))
        before = snapshot(registry)
        for attempt in (
            lambda: registry.enroll(again, "alice2", []),
            lambda: registry.enroll(again, "alice", [], replace=True),
            lambda: registry.rotate(alice.fingerprint, again, HOUR),
            lambda: registry.rotate(carol.fingerprint, again, HOUR),
        ):
            with pytest.raises(ConflictError, match="one key pair is one client") as info:
                attempt()
            assert f"certificate {current.fingerprint} of client 'alice'" in str(info.value)
        with pytest.raises(ConflictError, match="already enrolled or was revoked"):
            registry.request_enrollment(again, "alice2", "peer", HOUR, 10)
        assert snapshot(registry) == before
        # Rotating to a fresh key is allowed; the retiring key still counts as alice's.
        successor = candidate(make_client, "alice-next")
        registry.rotate(alice.fingerprint, successor, HOUR)
        with pytest.raises(ConflictError, match="one key pair is one client"):
            registry.rotate(successor.fingerprint, read(same_key(alice, "alice3")), HOUR)
        assert registry.find("carol").active
        assert [c.name for c in registry.clients() if c.active] == ["alice", "carol", "alice"]
    finally:
        registry.close()


# -- the commands and the server's ports ----------------------------------------------------


def test_cli_enroll_and_approve_refuse_a_revoked_key(
    registry: Path,
    enrolling: RunningServer,
    devca: ServerFiles,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The reviewer's reproduction: a new certificate for alice's stolen key, from a file and
    through the enrollment port, once she was revoked."""
    alice = make_client("alice")
    stolen = same_key(alice, "thief")
    # Queued before alice was enrolled, so the request port could not know the key yet.
    argv = ["request-enrollment", "--name", "alice", *request_flags(enrolling, devca, alice)]
    argv[argv.index(str(alice.cert_path))] = str(stolen)
    assert client_cli.main(argv) == Exit.OK
    flags = ["--registry", str(registry)]
    assert server_cli.main(["enroll", str(alice.cert_path), "--name", "alice", *flags]) == 0
    assert server_cli.main(["revoke", "alice", *flags]) == 0
    before = (registry_dump(registry, capsys), pending(registry, capsys))
    for argv in (
        ["enroll", str(stolen), "--name", "alice", *flags],
        ["enroll", str(stolen), "--name", "mallory", *flags],
        ["approve", str(read(stolen).fingerprint), "--name", "alice", *flags],
    ):
        capsys.readouterr()
        assert server_cli.main(argv) == Exit.ERROR, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert f"certificate {alice.fingerprint}, revoked on " in err, err
        assert "`pinrpc keygen`" in err, err
    assert (registry_dump(registry, capsys), pending(registry, capsys)) == before
    # A fresh key pair for alice is enrolled; the refused request still waits for `reject`.
    fresh = make_client("alice2")
    assert server_cli.main(["enroll", str(fresh.cert_path), "--name", "alice", *flags]) == 0


def test_the_enrollment_port_refuses_a_known_key_after_proof_of_possession(
    registry: Path,
    enrolling: RunningServer,
    devca: ServerFiles,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    alice, carol = make_client("alice"), make_client("carol")
    flags = ["--registry", str(registry)]
    assert server_cli.main(["enroll", str(alice.cert_path), "--name", "alice", *flags]) == 0
    stub = enrollment_stub(enrolling, devca)
    stolen = same_key(alice, "thief")

    def submit(cert: Path, signer: KeyPairFiles) -> enrollment_pb2.EnrollmentTicket:
        nonce = stub.Challenge(enrollment_pb2.ChallengeRequest(), timeout=5).nonce
        signature = proof.sign(load_private_key(signer.key_path), nonce, load_certificate(cert))
        request = enrollment_pb2.EnrollmentRequest(
            certificate_pem=cert.read_text(), name="thief", nonce=nonce, signature=signature
        )
        return stub.Request(request, timeout=5)

    for revoked in (False, True):
        if revoked:
            assert server_cli.main(["revoke", "alice", *flags]) == 0
        with pytest.raises(grpc.RpcError) as info:
            submit(stolen, alice)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = info.value.details() or ""
        assert "already enrolled or was revoked under another certificate" in details
        assert "alice" not in details and str(alice.fingerprint) not in details
    # Without proof of possession the answer is the one every stranger gets, not the above.
    with pytest.raises(grpc.RpcError) as info:
        submit(stolen, carol)
    assert "proof of possession failed" in (info.value.details() or "")
    assert pending(registry, capsys) == []
    # An unrelated stranger's request is queued as before.
    assert submit(carol.cert_path, carol).fingerprint == str(carol.fingerprint)


def test_admin_enroll_and_rotate_refuse_a_revoked_or_enrolled_key(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    root, alice, bob = make_client("root"), make_client("alice"), make_client("bob")
    connect.enroll(root, "root", ADMIN)
    connect.enroll(alice, "alice", ECHO_ALL)
    connect.enroll(bob, "bob", ECHO_ALL)
    assert server_cli.main(["revoke", "alice", "--registry", str(connect.server_registry)]) == 0
    stolen = same_key(alice, "alice")
    before = registry_dump(connect.server_registry, capsys)
    admin = ["admin", "enroll", str(stolen), "--name", "alice", *connect.cli_flags(root)]
    capsys.readouterr()
    assert client_cli.main(admin) == Exit.ERROR  # a refused enrollment
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"certificate {alice.fingerprint}, revoked on " in err, err
    # Rotate: bob asks for a successor made with alice's revoked key, then with his own key.
    channel = connect.channel(bob.cert_path, bob.key_path)
    stub = identity_pb2_grpc.IdentityStub(channel)
    # Bob holds both keys (the thief of alice's), so his proofs verify: the registry refuses.
    for successor, owner, expected in (
        (stolen, alice, "revoked on"),
        (same_key(bob, "bob"), bob, "one key pair"),
    ):
        key = load_private_key(owner.key_path)
        request = rotate_with_key(bob.fingerprint, successor.read_bytes(), key)
        with pytest.raises(grpc.RpcError) as info:
            stub.Rotate(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert expected in (info.value.details() or "")
    assert registry_dump(connect.server_registry, capsys) == before
    fresh = make_client("bob-next")
    request = rotate_request(bob.fingerprint, fresh)
    assert stub.Rotate(request, timeout=5).client.name == "bob"
    channel.close()
