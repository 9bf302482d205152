"""Someone else's certificate, presented by an attacker: stolen, minted, forged, or spoofed.

Every attack runs scripts/stolen-cert-attack (tlslite-ng + h2, a separate process) against a
real server, and every refusal has a control run of the same tool that succeeds, so a broken
tool cannot pass for a strong defence.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from pinrpc.identity import cert_to_pem, load_certificate, load_private_key
from tests.certs import make_cert, p256, write_pair
from tests.conftest import SERVER_NAME, Connect, MakeClient, code_of, whoami
from tests.security.attacker import ToolRun, attack
from tests.security.conftest import HandlerCalls

REFUSED_AT_HANDSHAKE = "UNAVAILABLE"


def tool(connect: Connect, cert: Path, *args: str | Path) -> ToolRun:
    return attack(
        "--server", connect.target, "--cert", cert, "--server-name", SERVER_NAME,
        "--ca", connect.devca.ca_path, *args,
    )  # fmt: skip


@pytest.mark.parametrize("key_type", ["p256", "rsa2048"])
def test_stolen_certificate_without_its_key_is_refused(
    connect: Connect, make_client: MakeClient, handler_calls: HandlerCalls, key_type: str
) -> None:
    alice = make_client("alice", key_type=key_type)
    connect.enroll(alice, "alice")

    thief = tool(connect, alice.cert_path)
    assert thief.code == 0, thief.out  # 0: the server refused the thief over both versions
    assert "without its private key" in thief.out
    assert thief.out.count("TLS 1.2 ->") == thief.out.count("TLS 1.3 ->") == 1
    assert "grpc-status 0" not in thief.out
    assert handler_calls.count == 0

    # Control: the same tool, the same certificate, the right key: a real call, both versions.
    owner = tool(connect, alice.cert_path, "--key", alice.key_path)
    assert owner.code == 0, owner.out
    assert owner.out.count(f"name='alice' fingerprint={alice.fingerprint}") == 2
    assert "server certificate verified" in owner.out
    assert handler_calls.names == ["alice", "alice"]


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_exit_codes_follow_the_contract(
    connect: Connect, make_client: MakeClient, version: str
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    connect.enroll(alice, "alice")
    assert tool(connect, alice.cert_path, "--tls", version).code == 0  # refused: defence held
    assert tool(connect, alice.cert_path, "--tls", version, "--key", alice.key_path).code == 0
    # With --key, a refusal is exit 1 (bob is not enrolled).
    refused = tool(connect, bob.cert_path, "--tls", version, "--key", bob.key_path)
    assert refused.code == 1
    assert "refused over TLS" in refused.out


def test_unreachable_server_is_exit_2(make_client: MakeClient) -> None:
    alice = make_client("alice")
    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = attack("--server", f"127.0.0.1:{port}", "--cert", alice.cert_path)
    assert run.code == 2 and "cannot connect" in run.err
    assert attack("--server", "nohostport", "--cert", alice.cert_path).code == 2


def test_leaf_minted_with_an_enrolled_key_is_refused(
    connect: Connect, make_client: MakeClient, handler_calls: HandlerCalls, tmp_path: Path
) -> None:
    """Alice (or whoever has her key) signs CN=admin and presents it with alice.crt above it."""
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    alice_cert = load_certificate(alice.cert_path)
    leaf_key = p256()
    minted = make_cert(
        leaf_key, "admin", issuer=alice_cert.subject, signer=load_private_key(alice.key_path)
    )
    cert_path, key_path = write_pair(tmp_path, "admin", leaf_key, minted)
    chain = tmp_path / "admin-chain.pem"
    chain.write_bytes(cert_to_pem(minted) + alice.cert_path.read_bytes())

    for presented in (chain, cert_path):
        run = tool(connect, presented, "--key", key_path)
        assert run.code == 1, run.out  # refused over TLS 1.2 and 1.3
        assert "grpc-status 0" not in run.out
    assert handler_calls.count == 0
    assert whoami(connect.stub(alice.cert_path, alice.key_path)).name == "alice"


def forge_lookalike(original: x509.Certificate, tmp_path: Path) -> tuple[Path, Path]:
    """Mallory's self-signed copy of ``original``: same subject, issuer, serial number and
    extensions (SKI and AKI values included), only the key and the signature are hers."""
    key = p256()
    builder = (
        x509.CertificateBuilder()
        .subject_name(original.subject)
        .issuer_name(original.issuer)
        .public_key(key.public_key())
        .serial_number(original.serial_number)
        .not_valid_before(original.not_valid_before_utc)
        .not_valid_after(original.not_valid_after_utc)
    )
    for extension in original.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    forged = builder.sign(key, hashes.SHA256())  # what pinrpc certificates use
    return write_pair(tmp_path, "lookalike", key, forged)


def test_lookalike_with_the_same_names_and_key_ids_is_refused(
    connect: Connect, make_client: MakeClient, handler_calls: HandlerCalls, tmp_path: Path
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    original = load_certificate(alice.cert_path)
    cert_path, key_path = forge_lookalike(original, tmp_path)
    forged = load_certificate(cert_path)
    assert forged.subject == original.subject and forged.issuer == original.issuer
    assert list(forged.extensions) == list(original.extensions)

    run = tool(connect, cert_path, "--key", key_path)
    assert run.code == 1, run.out
    assert "grpc-status 0" not in run.out
    # grpcio's own client stack is refused the same way.
    stub = connect.stub(cert_path, key_path)
    assert code_of(lambda: whoami(stub)).name == REFUSED_AT_HANDSHAKE
    assert handler_calls.count == 0
    assert whoami(connect.stub(alice.cert_path, alice.key_path)).name == "alice"


def test_raw_headers_claiming_another_identity_change_nothing(
    connect: Connect, make_client: MakeClient, handler_calls: HandlerCalls
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    connect.enroll(alice, "alice")
    connect.enroll(bob, "bob")
    spoof = [
        f'x-forwarded-client-cert=Hash={alice.fingerprint.hex};Subject="CN=alice"',
        "x-pinrpc-client=alice",
        f"x-client-cert-fingerprint={alice.fingerprint}",
        "x-ssl-client-s-dn=CN=alice",
    ]
    run = tool(connect, bob.cert_path, "--key", bob.key_path, *(f"--metadata={h}" for h in spoof))
    assert run.code == 0, run.out
    assert run.out.count(f"name='bob' fingerprint={bob.fingerprint}") == 2
    assert handler_calls.names == ["bob", "bob"]
