"""The server certificate's life under production faults: renewals killed, CAs down, odd
certificates written into place, all against a real pebble and a real server."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from pinrpc.identity import PrivateKey, cert_to_pem, key_to_pem, write_all
from server.app import start_server
from server.config import ServerConfig
from tests.certs import make_cert, name, p256, rsa_key

LEAF_ONLY = "holds no intermediate"


def _warned_leaf_only(
    cert: x509.Certificate, key: PrivateKey, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> bool:
    """Whether a real server started on this lone certificate warns that it lacks a chain."""
    cert_path, key_path = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    write_all([(key_path, key_to_pem(key), 0o600), (cert_path, cert_to_pem(cert), 0o644)],
              overwrite=True)  # fmt: skip
    config = ServerConfig("127.0.0.1:0", cert_path, key_path, str(tmp_path / "registry.db"))
    with caplog.at_level(logging.INFO, logger="pinrpc.trust"), start_server(config):
        assert "serving server certificate" in caplog.text
    return LEAF_ONLY in caplog.text


@pytest.mark.parametrize("make_key", [p256, lambda: rsa_key(2048)], ids=["ecdsa", "rsa"])
@pytest.mark.parametrize("spelling", ["case", "string type"])
def test_a_self_signed_certificate_named_differently_by_its_issuer_gets_no_warning(
    make_key: object, spelling: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Self-signed (its own key made the signature), although its issuer field reads
    'Server.Test' where the subject says 'server.test', or in another ASN.1 string type."""
    key = make_key()  # type: ignore[operator]
    if spelling == "case":
        issuer = name("Server.Test")
    else:
        printable = x509.NameAttribute(
            NameOID.COMMON_NAME, "server.test", x509.name._ASN1Type.PrintableString
        )
        issuer = x509.Name([printable])
    cert = make_cert(key, "server.test", issuer=issuer)
    assert _warned_leaf_only(cert, key, tmp_path, caplog) is False


def test_a_ca_issued_leaf_under_its_own_name_alone_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issued by a CA whose name equals the leaf's: without the CA's certificate clients
    cannot verify it, whatever the names say."""
    key, ca_key = p256(), p256()
    cert = make_cert(key, "server.test", issuer=name("server.test"), signer=ca_key)
    assert _warned_leaf_only(cert, key, tmp_path, caplog) is True
