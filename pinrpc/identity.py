"""Client identities: key pairs, self-signed certificates, fingerprints and PEM loading.

A pinrpc client is identified by the SHA-256 fingerprint of its certificate, never by the names
inside it. The certificate is made so that its key cannot mint other certificates that a TLS
handshake would accept (keyUsage is critical and lacks keyCertSign), and carries SKI/AKI so
that two enrolled certificates with similar subjects never shadow each other.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import os
import re
import secrets
import stat
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, get_args

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pinrpc.errors import IdentityError, KeyPermissionError

KeyType = Literal["p256", "p384", "rsa2048", "rsa3072", "rsa4096"]
KEY_TYPES: Final[tuple[str, ...]] = get_args(KeyType)
DEFAULT_DAYS: Final = 365
NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
PEM_CERT_RE: Final = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)
OPENSSL_PREFIX_RE: Final = re.compile(r"^sha256(?:fingerprint=|:)", re.IGNORECASE)
# Shown for a client without patterns: what every enrolled client may call (server/auth.py
# ALWAYS_ALLOWED) still works, so "none" alone would mislead.
NO_PERMISSIONS: Final = "(none beyond every client's: WhoAmI, Rotate, health, reflection)"
ED25519_REASON: Final = (
    "Ed25519 keys fail the TLS handshake with grpcio (the server offers no Ed25519 signature "
    "algorithm); use P-256 (the default), P-384 or RSA >= 2048"
)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """SHA-256 of a certificate's DER encoding.

    ``str()`` gives the form ``openssl x509 -noout -fingerprint -sha256`` prints (upper-case hex
    pairs joined by colons); ``parse`` accepts that, bare hex, any case, a ``sha256:`` prefix
    and openssl's whole output line.
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
        # Any whitespace goes (a fingerprint wrapped or tab-separated when pasted); so does
        # openssl's whole line, "sha256 Fingerprint=AB:..." (OpenSSL 1.1: "SHA256 ...").
        cleaned = "".join(text.split())
        cleaned = OPENSSL_PREFIX_RE.sub("", cleaned, count=1).replace(":", "")
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
        # Names reach here from strangers too (the enrollment port): quote a long one in part.
        shown = f"{name!r}" if len(name) <= 80 else f"{name[:64]!r}... ({len(name)} characters)"
        raise IdentityError(
            f"invalid client name {shown}: use 1-64 ASCII letters, digits, '.', '_' or '-', "
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
    # The random serialNumber attribute makes every subject unique, so no two clients' trust
    # anchors can be confused by name (enrollment refuses look-alikes without key ids).
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


def _write_temp(path: Path, data: bytes, mode: int, owner: tuple[int, int] = (-1, -1)) -> Path:
    """A temporary file next to ``path``, created with ``mode`` (and ``owner``, a uid and a gid,
    -1: ours) from the start: a private key is never readable by others, not even for a moment."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if owner != (-1, -1):  # before fchmod: a chown may clear mode bits
            try:
                os.fchown(fd, *owner)
            except OSError as exc:  # a bare EPERM names neither the file nor the owner
                named = zip(("owner", "group"), owner, strict=True)
                whom = " and ".join(f"{what} {n}" for what, n in named if n != -1)
                why = f"cannot give it {whom} ({exc.strerror}; only root or a member may)"
                raise OSError(exc.errno, why, str(path)) from exc
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write via a temporary file in the same directory so readers never see half a file,
    and sync the directory so that the rename survives a crash."""
    tmp = _write_temp(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sync_directories([path])


def write_all(
    files: Sequence[tuple[Path, bytes, int]],
    *,
    overwrite: bool,
    owners: Mapping[Path, tuple[int, int]] | None = None,
) -> None:
    """Write each (path, data, mode), all or nothing (see ``move_all``); ``owners`` gives
    some of them a uid and a gid, -1 for ours (a renewed server key keeps the ones its server
    reads it with).

    With ``overwrite``, a target that is a directory is refused before anything is written
    (renaming over it would fail only halfway, with a less clear error)."""
    if overwrite:
        for path, _, _ in files:
            if path.is_dir():
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    temps: list[Path] = []
    try:
        for path, data, mode in files:
            temps.append(_write_temp(path, data, mode, (owners or {}).get(path, (-1, -1))))
        move_all(list(zip(temps, (f[0] for f in files), strict=True)), overwrite=overwrite)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def move_all(moves: Sequence[tuple[Path, Path]], *, overwrite: bool) -> None:
    """Rename each (source, target) in order, all or nothing, and durably (the directories
    are synced): a failure puts back what was moved (and any target it replaced) and raises.
    Without ``overwrite`` an existing target fails with FileExistsError, decided atomically
    by link(2), not by a check before."""
    done: list[tuple[Path, Path, Path | None]] = []
    try:
        for source, target in moves:
            done.append((source, target, _move(source, target, overwrite=overwrite)))
        sync_directories([path for move in moves for path in move])
    except BaseException:
        for source, target, backup in reversed(done):
            with contextlib.suppress(OSError):  # best effort; the caller reports the failure
                os.replace(target, source)
                if backup is not None:
                    os.replace(backup, target)
        raise
    for *_, backup in done:
        if backup is not None:
            backup.unlink(missing_ok=True)


def sync_directories(paths: Sequence[Path]) -> None:
    """fsync the directories holding ``paths``: a rename is on disk only once its directory
    is, and without this a crash could lose a key pair that was reported as written."""
    for directory in dict.fromkeys(path.absolute().parent for path in paths):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: this file system cannot sync directories
                raise
        finally:
            os.close(fd)


def _move(source: Path, target: Path, *, overwrite: bool) -> Path | None:
    """One rename; returns a hard link to the target it replaced, to put it back on failure."""
    if not overwrite:
        os.link(source, target, follow_symlinks=False)
        try:
            os.unlink(source)
        except BaseException:
            target.unlink()
            raise
        return None
    backup = None
    if os.path.lexists(target):
        backup = target.with_name(f".{target.name}.{secrets.token_hex(4)}.bak")
        os.link(target, backup, follow_symlinks=False)
    try:
        os.replace(source, target)
    except BaseException:
        if backup is not None:
            backup.unlink()
        raise
    return backup


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
    """Make ``<dir>/<name>.key`` (mode 0600) and ``<dir>/<name>.crt``; never overwrite unasked.

    Both files appear together or not at all, also when two runs race for the same name.
    """
    check_name(name)
    directory = directory.absolute()
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.crt"
    if not force:  # early, before a slow RSA key; placement below decides for real
        for existing in (p for p in (key_path, cert_path) if os.path.lexists(p)):
            raise exists_error(existing)
    key = generate_key(key_type)
    cert = self_signed_certificate(key, name, days=days)
    make_directory(directory)
    try:
        write_all(
            [(key_path, key_to_pem(key, passphrase), 0o600), (cert_path, cert_to_pem(cert), 0o644)],
            overwrite=force,
        )
    except FileExistsError as exc:
        raise exists_error(Path(exc.filename2 or exc.filename)) from exc
    except OSError as exc:
        raise IdentityError(f"cannot write the key pair in {directory}: {exc.strerror}") from exc
    return KeyPairFiles(key_path, cert_path, Fingerprint.of(cert))


def make_directory(directory: Path) -> None:
    """Create a key pair's directory if it is missing."""
    try:
        # Whoever may write the directory may replace the pair in it: a new one is the
        # owner's alone, whatever the umask (an existing one is the user's choice).
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError as exc:  # not the pair: --force would not help
        raise IdentityError(f"{directory} is not a directory; choose another --dir") from exc
    except OSError as exc:
        raise IdentityError(f"cannot create the directory {directory}: {exc.strerror}") from exc


def exists_error(path: Path) -> IdentityError:
    return IdentityError(
        f"{path} already exists; to renew a pair the server admits, run `pinrpc rotate`; "
        "--force deletes the old pair now, locking its client out until the operator enrolls "
        "the new one (`pinrpc-server enroll --replace`)"
    )


def read_file(path: Path, what: str, limit: int = 1 << 20) -> bytes:
    """Read a small file, with a one-line error that names the absolute path."""
    try:
        # O_NONBLOCK: opening a FIFO that nobody writes to would wait forever; without a
        # writer it now reads as empty, while a pipe that has one (--key <(...)) still works.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.set_blocking(fd, True)
        with open(fd, "rb") as f:
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
    try:  # parsed lazily: a bad key or name would otherwise fail later, as a traceback
        certs[0].public_key()
        certs[0].subject.rfc4514_string()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise IdentityError(f"{where} holds a certificate that cannot be read: {exc}") from exc
    return certs[0]


def check_ca_bundle(data: bytes, where: str) -> list[x509.Certificate]:
    """Roots to verify the server with; anything else would fail later as a vague handshake."""
    if b"PRIVATE KEY-----" in data:
        raise IdentityError(
            f"CA bundle {where} contains a private key; give the root certificate(s) that "
            "issued the server's certificate"
        )
    blocks = PEM_CERT_RE.findall(data)
    if not blocks:
        raise IdentityError(
            f"CA bundle {where} holds no PEM certificate; give the root certificate(s) that "
            "issued the server's certificate"
        )
    certs = []
    for number, block in enumerate(blocks, 1):
        # Real roots (Go Daddy G2, Starfield G2) have serial number 0, which cryptography
        # loads with a deprecation warning: keep them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            try:
                certs.append(x509.load_pem_x509_certificate(block))
            except ValueError as exc:
                # gRPC stops reading a bundle at such a block: the roots after it, or all of
                # them, would be missing, and the handshake would fail without saying why.
                raise IdentityError(
                    f"CA bundle {where}: certificate {number} of {len(blocks)} cannot be read "
                    f"({exc}); remove it or fix the file"
                ) from exc
    return certs


def load_ca_bundle(path: Path) -> bytes:
    """A --ca file's bytes, once checked to hold certificates and no private key."""
    data = read_file(path, "CA bundle")
    check_ca_bundle(data, str(path.absolute()))
    return data


def check_key_permissions(path: Path) -> None:
    """Refuse a key that others can read, as ssh does."""
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyPermissionError(
            f"private key {path.absolute()} is accessible by other users "
            f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path.absolute()} "
            "(or pass --insecure-key-permissions; in code, insecure_key_permissions=True)"
        )


# Named in messages: the CLIs read the variable, library code may pass ``passphrase=``.
PASSPHRASE = "PINRPC_KEY_PASSPHRASE, or passphrase= in code"  # noqa: S105 - a hint, no secret


def load_private_key(
    path: Path, *, passphrase: bytes | None = None, check_permissions: bool = True
) -> PrivateKey:
    if isinstance(passphrase, str):  # cryptography's TypeError would read as "not encrypted"
        raise TypeError("passphrase must be bytes, not str: pass passphrase=text.encode()")
    passphrase = passphrase or None  # empty is none, as an empty PINRPC_KEY_PASSPHRASE is
    data = read_file(path, "private key")
    if check_permissions:
        check_key_permissions(path)
    where = path.absolute()
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:
        if passphrase is None:
            raise IdentityError(f"private key {where} is encrypted; set {PASSPHRASE}") from exc
        raise IdentityError(
            f"private key {where} is not encrypted, but a passphrase was given "
            f"({PASSPHRASE}): unset it to use this key"
        ) from exc
    except ValueError as exc:
        # An encrypted PEM says so in its header (PKCS#8 or OpenSSL's Proc-Type): then the
        # passphrase is what is wrong, not the file.
        if passphrase and b"ENCRYPTED" in data:
            raise IdentityError(
                f"cannot decrypt private key {where}: wrong passphrase ({PASSPHRASE})"
            ) from exc
        raise IdentityError(f"cannot load private key {where}: not a PEM private key") from exc
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
