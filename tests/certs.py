"""Certificates that pinrpc itself would never make: for deny tests and bad enrollment input."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from pinrpc.identity import PrivateKey, cert_to_pem, key_to_pem, write_atomic

AnyKey = PrivateKey | ed25519.Ed25519PrivateKey


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(
    key: AnyKey,
    subject: x509.Name | str,
    *,
    issuer: x509.Name | None = None,
    signer: AnyKey | None = None,
    ca: bool | None = False,
    key_cert_sign: bool | None = None,
    key_ids: bool = True,
    not_before: dt.datetime | None = None,
    days: float = 30,
) -> x509.Certificate:
    """A certificate with exactly the extensions asked for (None leaves one out)."""
    subject = name(subject) if isinstance(subject, str) else subject
    signer = signer or key
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
    )
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
    if key_cert_sign is not None:
        usage = x509.KeyUsage(True, False, False, False, False, key_cert_sign, False, False, False)
        builder = builder.add_extension(usage, critical=True)
    if key_ids:
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        ).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
            critical=False,
        )
    algorithm = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(signer, algorithm)


def p256() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def rsa_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def certbot_link(live: Path, fullchain: Path, privkey: Path, version: int) -> None:
    """Install a renewal as certbot does: archive/NAME/fullchainN.pem, live/ symlinks re-pointed.

    The files move into archive/, then each live/ symlink is replaced by rename(2), atomically.
    """
    archive = live.parent.parent / "archive" / live.name
    archive.mkdir(parents=True, exist_ok=True)
    live.mkdir(parents=True, exist_ok=True)
    for name, source in (("privkey", privkey), ("fullchain", fullchain)):
        target = archive / f"{name}{version}.pem"
        os.replace(source, target)
        staging = live / f"{name}.pem.new"
        staging.symlink_to(os.path.relpath(target, live))
        os.replace(staging, live / f"{name}.pem")


def write_pair(
    directory: Path, stem: str, key: PrivateKey, cert: x509.Certificate
) -> tuple[Path, Path]:
    """Write ``stem.crt`` and ``stem.key`` (0600); return (cert, key) paths."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    write_atomic(cert_path, cert_to_pem(cert), 0o644)
    write_atomic(key_path, key_to_pem(key), 0o600)
    return cert_path, key_path
