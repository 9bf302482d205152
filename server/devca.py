"""A throwaway CA that stands in for Let's Encrypt in tests and the offline demo.

It issues server certificates shaped like Let's Encrypt's (root -> intermediate -> leaf, names
in the SAN only) and writes them in certbot's file names, so the server reads them exactly as
it reads a real certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pinrpc.identity import PrivateKey, cert_to_pem, key_to_pem, write_atomic

_CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


@dataclass(frozen=True, slots=True)
class Issued:
    key: PrivateKey
    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # intermediates, leaf excluded

    @property
    def fullchain_pem(self) -> bytes:
        return b"".join(cert_to_pem(c) for c in (self.leaf, *self.chain))

    def write(self, directory: Path) -> tuple[Path, Path]:
        """Write fullchain.pem and privkey.pem (0600) like certbot; return their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / "fullchain.pem", directory / "privkey.pem"
        write_atomic(key_path, key_to_pem(self.key), 0o600)
        write_atomic(cert_path, self.fullchain_pem, 0o644)
        return cert_path, key_path


class DevCA:
    """Root and intermediate in memory; ``issue`` makes server leaves."""

    def __init__(self, name: str = "pinrpc dev CA") -> None:
        now = dt.datetime.now(dt.UTC)
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self._ca_cert(_name(f"{name} root"), self.root_key, self.root_key, None, now)
        self.inter_key = ec.generate_private_key(ec.SECP256R1())
        self.intermediate = self._ca_cert(
            _name(f"{name} intermediate"), self.inter_key, self.root_key, self.root, now
        )

    @staticmethod
    def _ca_cert(
        subject: x509.Name,
        key: ec.EllipticCurvePrivateKey,
        signer: ec.EllipticCurvePrivateKey,
        issuer: x509.Certificate | None,
        now: dt.datetime,
    ) -> x509.Certificate:
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.subject if issuer else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_CA_USAGE, critical=True)
            .add_extension(ski, critical=False)
        )
        return builder.sign(signer, hashes.SHA256())

    @property
    def root_pem(self) -> bytes:
        return cert_to_pem(self.root)

    def issue(
        self,
        names: list[str],
        *,
        days: int = 90,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        key: PrivateKey | None = None,
    ) -> Issued:
        key = key or ec.generate_private_key(ec.SECP256R1())
        start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.intermediate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(not_after or start + dt.timedelta(days=days))
            .add_extension(_san(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.inter_key.public_key()),
                critical=False,
            )
            .sign(self.inter_key, hashes.SHA256())
        )
        return Issued(key, leaf, (self.intermediate,))
