"""Rotate needs proof that the caller holds the successor's key (docs/SECURITY.md).

Before, a self-signed successor was enough: alice, with no permissions, rotated to carol's
public certificate, and carol's key was then alice's identity (and carol could no longer be
enrolled). Every refusal here leaves the registry as it was.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest

from pinrpc import proof
from pinrpc.identity import load_certificate, load_private_key
from pinrpc.v1 import identity_pb2, identity_pb2_grpc
from tests.conftest import (
    Connect,
    MakeClient,
    registry_dump,
    rotate_request,
    whoami,
)


def refused(stub: identity_pb2_grpc.IdentityStub, request: identity_pb2.RotateRequest) -> str:
    """The details of the INVALID_ARGUMENT a rotation is refused with; fails if it is not."""
    with pytest.raises(grpc.RpcError) as info:
        stub.Rotate(request, timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    details = info.value.details() or ""
    assert "\n" not in details
    return details


def test_a_client_cannot_rotate_to_a_certificate_whose_key_it_lacks(
    connect: Connect,
    make_client: MakeClient,
    registry: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    alice, carol = make_client("alice"), make_client("carol")
    connect.enroll(alice, "alice")  # no permissions: Rotate is always allowed
    stub = identity_pb2_grpc.IdentityStub(connect.channel(alice.cert_path, alice.key_path))
    before = registry_dump(registry, capsys)
    carols_pem = carol.cert_path.read_text()
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        # No proof at all: what an old client sends, and all the squat needed before.
        details = refused(stub, identity_pb2.RotateRequest(certificate_pem=carols_pem))
        assert "update pinrpc" in details, details
        # A proof signed by alice's own key, not carol's.
        by_alice = rotate_request(alice.fingerprint, carol, signer=alice.key_path)
        assert "proof of possession failed" in refused(stub, by_alice)
        # Carol's genuine proof, made for her own rotation (bound to her current certificate):
        # alice replays it from her channel.
        assert "proof of possession failed" in refused(
            stub, rotate_request(carol.fingerprint, carol)
        )
        connect.server.audit.flush()
    assert registry_dump(registry, capsys) == before
    lines = [getattr(r, "audit", {}) for r in caplog.records if r.name == "pinrpc.audit"]
    denials = [line for line in lines if line.get("reason") == "rotation_refused"]
    assert len(denials) == 3 and all(d["client"] == "alice" for d in denials), lines
    # The operator can still enroll carol, and her key is hers.
    connect.enroll(carol, "carol")
    assert whoami(connect.stub(carol.cert_path, carol.key_path)).name == "carol"
    assert whoami(connect.stub(alice.cert_path, alice.key_path)).name == "alice"


def test_a_proof_is_good_for_its_own_successor_only(
    connect: Connect, make_client: MakeClient, registry: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alice, nxt, other = make_client("alice"), make_client("next"), make_client("other")
    connect.enroll(alice, "alice")
    stub = identity_pb2_grpc.IdentityStub(connect.channel(alice.cert_path, alice.key_path))
    before = registry_dump(registry, capsys)
    # A valid proof for `next`, submitted with `other` (whose key alice holds too).
    swapped = rotate_request(alice.fingerprint, nxt)
    swapped.certificate_pem = other.cert_path.read_text()
    refused(stub, swapped)
    assert registry_dump(registry, capsys) == before
    # Allowed: the same successor with its own proof.
    reply = stub.Rotate(rotate_request(alice.fingerprint, other), timeout=5)
    assert reply.client.name == "alice"
    assert reply.client.fingerprint == str(other.fingerprint)


def test_an_enrollment_proof_is_no_rotation_proof(make_client: MakeClient) -> None:
    alice, nxt = make_client("alice"), make_client("next")
    cert, key = load_certificate(nxt.cert_path), load_private_key(nxt.key_path)
    bound = proof.rotation_binding(alice.fingerprint)
    assert proof.verify(cert, bound, proof.sign(key, bound, cert, proof.ROTATION), proof.ROTATION)
    # Deny: the same bytes signed in the enrollment context, or bound to another caller.
    enrollment = proof.sign(key, bound, cert, proof.ENROLLMENT)
    assert not proof.verify(cert, bound, enrollment, proof.ROTATION)
    assert not proof.verify(
        cert, proof.rotation_binding(nxt.fingerprint), proof.sign(key, bound, cert, proof.ROTATION),
        proof.ROTATION,
    )  # fmt: skip
