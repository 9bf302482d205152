"""Client identities: key pairs, self-signed certificates, fingerprints and PEM loading.

A pinrpc client is identified by the SHA-256 fingerprint of its certificate, never by the names
inside it. The certificate is made so that its key cannot mint other certificates that a TLS
handshake would accept (keyUsage is critical and lacks keyCertSign), and carries SKI/AKI so
that two enrolled certificates with similar subjects never shadow each other.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, get_args

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pinrpc.errors import IdentityError, KeyPermissionError

KeyType = Literal["p256", "p384", "rsa2048", "rsa3072", "rsa4096"]
KEY_TYPES: Final[tuple[str, ...]] = get_args(KeyType)
DEFAULT_DAYS: Final = 365
NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ED25519_REASON: Final = (
    "Ed25519 keys fail the TLS handshake with grpcio (the server offers no Ed25519 signature "
    "algorithm); use P-256 (the default), P-384 or RSA >= 2048"
)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """SHA-256 of a certificate's DER encoding.

    ``str()`` gives the form ``openssl x509 -noout -fingerprint -sha256`` prints (upper-case hex
    pairs joined by colons); ``parse`` accepts that, bare hex, any case and a ``sha256:`` prefix.
    """

    digest: bytes

    def __post_init__(self) -> None:
        if len(self.digest) != 32:
            raise ValueError("a SHA-256 fingerprint has 32 bytes")

    @classmethod
    def of_der(cls, der: bytes) -> Fingerprint:
        return cls(hashlib.sha256(der).digest())

    @classmethod
    def of(cls, cert: x509.Certificate) -> Fingerprint:
        return cls(cert.fingerprint(hashes.SHA256()))

    @classmethod
    def parse(cls, text: str) -> Fingerprint:
        cleaned = text.strip()
        if cleaned.lower().startswith("sha256:"):
            cleaned = cleaned[len("sha256:") :]
        cleaned = cleaned.replace(":", "").replace(" ", "")
        if not re.fullmatch(r"[0-9A-Fa-f]{64}", cleaned):
            raise ValueError(
                f"not a SHA-256 fingerprint: {text!r} "
                "(expected 64 hex digits, colons and a 'sha256:' prefix optional)"
            )
        return cls(bytes.fromhex(cleaned))

    @classmethod
    def looks_like(cls, text: str) -> bool:
        try:
            cls.parse(text)
        except ValueError:
            return False
        return True

    @property
    def hex(self) -> str:
        """Lower-case hex without separators: the form stored in registries."""
        return self.digest.hex()

    def __str__(self) -> str:
        # bytes.hex(sep): 20x faster than joining formatted bytes, and audit lines print it.
        return self.digest.hex(":").upper()


def check_name(name: str) -> str:
    """A client name doubles as a file name, so keep it to a safe alphabet."""
    if not NAME_RE.fullmatch(name):
        raise IdentityError(
            f"invalid client name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def generate_key(key_type: str = "p256") -> PrivateKey:
    if key_type == "ed25519":
        raise IdentityError(f"refusing key type ed25519: {ED25519_REASON}")
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type.startswith("rsa") and key_type in KEY_TYPES:
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[3:]))
    raise IdentityError(f"unknown key type {key_type!r}: choose one of {', '.join(KEY_TYPES)}")


def self_signed_certificate(
    key: PrivateKey,
    name: str,
    *,
    days: int = DEFAULT_DAYS,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """A client certificate that can identify its holder and do nothing else."""
    if days < 1:
        raise IdentityError(f"--days must be at least 1, got {days}")
    now = now or dt.datetime.now(dt.UTC)
    # The random serialNumber attribute makes every subject unique: grpcio verifies only one
    # of several trust anchors that share a subject DN.
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, check_name(name)),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pinrpc client"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, secrets.token_hex(8)),
        ]
    )
    public = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def key_to_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file in the same directory so readers never see half a file.

    The temporary file is created with ``mode`` from the start: a private key is never
    readable by others, not even for a moment.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True, slots=True)
class KeyPairFiles:
    key_path: Path
    cert_path: Path
    fingerprint: Fingerprint


def create_identity(
    name: str,
    directory: Path,
    *,
    key_type: str = "p256",
    days: int = DEFAULT_DAYS,
    force: bool = False,
    passphrase: bytes | None = None,
) -> KeyPairFiles:
    """Make ``<dir>/<name>.key`` (mode 0600) and ``<dir>/<name>.crt``; never overwrite unasked."""
    check_name(name)
    directory = directory.absolute()
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    if not force:
        for existing in (p for p in (key_path, cert_path) if p.exists()):
            raise IdentityError(
                f"{existing} already exists; pass --force to replace it "
                "(the old key pair stops working once the server enrolls the new one)"
            )
    key = generate_key(key_type)
    cert = self_signed_certificate(key, name, days=days)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Key first: a certificate without its key is useless, the reverse can be re-made.
        write_atomic(key_path, key_to_pem(key, passphrase), 0o600)
        write_atomic(cert_path, cert_to_pem(cert), 0o644)
    except OSError as exc:
        raise IdentityError(f"cannot write the key pair in {directory}: {exc.strerror}") from exc
    return KeyPairFiles(key_path, cert_path, Fingerprint.of(cert))


def read_file(path: Path, what: str, limit: int = 1 << 20) -> bytes:
    """Read a small file, with a one-line error that names the absolute path."""
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise IdentityError(f"cannot read {what} {path.absolute()}: {exc.strerror}") from exc
    if len(data) > limit:
        raise IdentityError(f"{what} {path.absolute()} is larger than {limit} bytes")
    return data


def load_certificate(path: Path) -> x509.Certificate:
    """Exactly one PEM certificate; a key, CSR or bundle is refused with the reason."""
    return parse_single_certificate(read_file(path, "certificate"), str(path.absolute()))


def parse_single_certificate(data: bytes, where: str) -> x509.Certificate:
    if not data.strip():
        raise IdentityError(f"{where} is empty; expected one PEM certificate")
    if b"PRIVATE KEY-----" in data:
        raise IdentityError(
            f"{where} contains a private key; give the certificate (.crt) instead, "
            "and never share the key"
        )
    if b"CERTIFICATE REQUEST-----" in data:
        raise IdentityError(f"{where} is a certificate request (CSR), not a certificate")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise IdentityError(f"{where} is not a PEM certificate (no BEGIN CERTIFICATE block)")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise IdentityError(f"{where} is not a valid PEM certificate: {exc}") from exc
    if len(certs) != 1:
        raise IdentityError(
            f"{where} holds {len(certs)} certificates; enroll each client's own certificate alone"
        )
    return certs[0]


def check_key_permissions(path: Path) -> None:
    """Refuse a key that others can read, as ssh does."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyPermissionError(
            f"private key {path.absolute()} is accessible by other users "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path.absolute()} "
            "(or pass --insecure-key-permissions)"
        )


def load_private_key(
    path: Path, *, passphrase: bytes | None = None, check_permissions: bool = True
) -> PrivateKey:
    data = read_file(path, "private key")
    if check_permissions:
        check_key_permissions(path)
    where = path.absolute()
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:
        if passphrase is None:
            raise IdentityError(
                f"private key {where} is encrypted; set PINRPC_KEY_PASSPHRASE"
            ) from exc
        raise IdentityError(
            f"private key {where} is not encrypted but a passphrase was given"
        ) from exc
    except ValueError as exc:
        reason = "wrong passphrase or " if passphrase else ""
        raise IdentityError(
            f"cannot load private key {where}: {reason}not a PEM private key"
        ) from exc
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        raise IdentityError(f"private key {where} is EdDSA: {ED25519_REASON}")
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise IdentityError(f"private key {where} has an unsupported type; use P-256 or RSA")
    return key


def same_public_key(key: PrivateKey, cert: x509.Certificate) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


def spki_sha256(cert: x509.Certificate) -> str:
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()
