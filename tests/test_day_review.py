"""The day's change reviewed as a whole, against real servers: what its fixes missed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from pinrpc.cli import Exit
from pinrpc.identity import Fingerprint, KeyPairFiles, cert_to_pem
from tests.certs import make_cert, p256, write_pair
from tests.conftest import Connect, MakeClient
from tests.test_client_review import pinrpc


def test_an_allowed_invented_method_gets_unimplemented_not_resource_exhausted(
    connect: Connect, make_client: MakeClient
) -> None:
    # The refusal's cut (server/auth.py shown_method) missed the other answer that quotes a
    # caller's method: a client allowed a whole service gets UNIMPLEMENTED for a name it made up.
    bob = make_client("bob")
    connect.enroll(bob, "bob", "/pinrpc.v1.Echo/*")
    channel = connect.channel(bob.cert_path, bob.key_path)
    invented = "/pinrpc.v1.Echo/" + "\u00e9" * 3_000  # as in test_observe_review.py
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(invented, None, None)(b"", timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED, caught.value.details()
    assert "... (3016 characters)" in (caught.value.details() or "")
    # A real name stays whole.
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary("/pinrpc.v1.Echo/Nope", None, None)(b"", timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert caught.value.details() == "method /pinrpc.v1.Echo/Nope not found"


def test_doctor_presents_a_certificate_larger_than_a_pipe_holds(
    connect: Connect, tmp_path: Path
) -> None:
    # doctor handed its pair to ssl through pipes, writing each whole before ssl read it: a
    # certificate over a pipe's 64 KiB (here many OU names) blocked the write, and doctor hung.
    key = p256()
    ou = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "u" * 60)] * 800
    cert = make_cert(key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "big"), *ou]))
    assert len(cert_to_pem(cert)) > 65_536
    cert_path, key_path = write_pair(tmp_path, "big", key, cert)
    files = KeyPairFiles(key_path, cert_path, Fingerprint.of(cert))
    # Too large to enroll (8 KiB), so the server refuses it: doctor says so, and ends.
    code, out, err = pinrpc({}, "doctor", *connect.cli_flags(files), "--timeout", "10")
    assert code == Exit.CONNECT, out + err
    assert f"ok       client certificate  fingerprint {files.fingerprint}" in out


def test_an_invented_first_call_is_cut_short_in_the_allow_line(
    connect: Connect, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    # bd1fbec cut the deny line's method; a connection's first call, allowed by a wildcard and
    # served by no handler, still wrote the invented name whole into its allow line (18 KB).
    bob = make_client("bob")
    connect.enroll(bob, "bob", "/pinrpc.v1.Echo/*")
    channel = connect.channel(bob.cert_path, bob.key_path)
    invented = "/pinrpc.v1.Echo/" + "\u00e9" * 3_000
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        with pytest.raises(grpc.RpcError):
            channel.unary_unary(invented, None, None)(b"", timeout=5)
        connect.server.audit.flush()
    lines = [r.getMessage() for r in caplog.records if r.name == "pinrpc.audit"]
    allowed = [json.loads(line) for line in lines if '"decision": "allow"' in line]
    assert len(allowed) == 1, lines
    assert allowed[0]["method"].endswith("\u00e9... (3016 characters)")
    assert max(len(line) for line in lines) < 2_000
