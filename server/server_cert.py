"""The server's own certificate and key, loaded from files and checked before they are served.

Separate from server/trust.py, which keeps the client trust set and the watcher that reloads
both: everything here reads two files and judges them (chain order, the key that signs, the
issuer, the validity dates, who may read the key), with no registry and no gRPC.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.padding import PSS, PKCS1v15

from pinrpc.errors import IdentityError, ServerCertError
from pinrpc.identity import read_file, same_public_key

log = logging.getLogger("pinrpc.trust")  # the watcher's logger: its lines read as before
SERVED_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})  # what BoringSSL signs with
BEGIN, _END = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
_PRIVATE_KEY = b"PRIVATE KEY-----"  # PKCS#8 and the traditional RSA/EC forms alike


@dataclass(frozen=True, slots=True)
class ServerCert:
    chain_pem: bytes
    key_pem: bytes
    leaf: x509.Certificate

    @property
    def leaf_only(self) -> bool:
        """A CA-issued leaf without its intermediate: clients that verify with ordinary roots
        (which hold no intermediates) cannot build a path to a root."""
        return self.chain_pem.count(BEGIN) == 1 and not _self_signed(self.leaf)

    def describe(self) -> str:
        try:
            san = self.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            names = ", ".join(str(n.value) for n in san.value)
        except x509.ExtensionNotFound:
            names = self.leaf.subject.rfc4514_string()
        return (
            f"names [{names}], issuer {self.leaf.issuer.rfc4514_string()}, serial "
            f"{self.leaf.serial_number:x}, "
            f"expires {self.leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )


def load_server_cert(cert_path: Path, key_path: Path) -> ServerCert:
    """Read and cross-check the full chain and its key; any defect raises ServerCertError."""
    try:
        for path, what in ((cert_path, "server certificate"), (key_path, "server key")):
            _require_regular(path, what)
        chain_pem = read_file(cert_path, "server certificate")
        key_pem = read_file(key_path, "server key")
    except IdentityError as exc:
        raise ServerCertError(str(exc)) from exc
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise ServerCertError(_not_a_chain(cert_path, chain_pem, key_path, key_pem, exc)) from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # e.g. a curve not offered
        raise ServerCertError(
            f"{key_path.absolute()} is not an unencrypted PEM private key: {exc}"
        ) from exc
    # The parser skips a cut-off last block, so a half-written chain would otherwise load.
    tail = chain_pem[chain_pem.rfind(_END) + len(_END) :] if _END in chain_pem else b""
    if chain_pem.count(BEGIN) != len(chain) or tail.strip():
        raise ServerCertError(
            f"{cert_path.absolute()} holds an incomplete certificate chain (half-written?)"
        )
    leaf = chain[0]
    try:  # parsed lazily: a damaged name or extension would raise later, ending the poll thread
        ServerCert(chain_pem, key_pem, leaf).describe()
    except ValueError as exc:
        raise ServerCertError(
            f"{cert_path.absolute()} holds a certificate that cannot be read: {exc}"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ServerCertError(f"{key_path.absolute()} is not an ECDSA or RSA key")
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name not in SERVED_CURVES:
        # gRPC's BoringSSL refuses it only when the credentials are built: at the next
        # restart, or at every retried --tls-reload handover build.
        raise ServerCertError(
            f"{key_path.absolute()} is an ECDSA key on {key.curve.name}, which gRPC cannot "
            f"serve; use P-256 or P-384 (the curves Let's Encrypt signs)"
        )
    if not _same_key(key, leaf):
        if any(_same_key(key, c) for c in chain[1:]):
            raise ServerCertError(
                f"{cert_path.absolute()} lists an intermediate first; the server's own "
                f"certificate (the leaf) must come first"
            )
        raise ServerCertError(
            f"{key_path.absolute()} does not match the first certificate in "
            f"{cert_path.absolute()} (half-finished renewal?)"
        )
    if len(chain) > 1 and not any(signed_by(leaf, c) for c in chain[1:]):
        # e.g. a deploy hook that appends a fixed intermediate: the CA issues from several.
        raise ServerCertError(
            f"{cert_path.absolute()}: no certificate after the leaf issued it (issuer "
            f"{leaf.issuer.rfc4514_string()}); serve the chain the CA sent with it "
            f"(fullchain.pem)"
        )
    if not valid_now(leaf):
        # Not yet valid: this clock is behind the CA's, and renewing again would not help.
        started = leaf.not_valid_before_utc <= dt.datetime.now(dt.UTC)
        raise ServerCertError(
            f"{cert_path.absolute()} is valid only from {leaf.not_valid_before_utc:%Y-%m-%d %H:%M}"
            f" to {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; "
            + ("renew it" if started else "check this machine's clock")
        )
    _warn_if_others_read(key_path)  # last: a refused file is no server key to warn about
    return ServerCert(chain_pem, key_pem, leaf)


def _not_a_chain(cert_path: Path, chain_pem: bytes, key_path: Path, key_pem: bytes,
                 exc: ValueError) -> str:  # fmt: skip
    """Why --cert holds no chain: cryptography's own words only when no likelier cause shows."""
    if _PRIVATE_KEY not in chain_pem:
        return f"{cert_path.absolute()} is not a PEM certificate chain: {exc}"
    if BEGIN in key_pem:
        return (
            f"--cert {cert_path.absolute()} holds a private key and --key "
            f"{key_path.absolute()} a certificate: swap them"
        )
    return (
        f"--cert {cert_path.absolute()} holds a private key, not the certificate chain; "
        "give it the full chain (fullchain.pem)"
    )


def _same_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cert: x509.Certificate) -> bool:
    """A certificate whose key cryptography cannot read is no match (and no exception that
    would end the poll thread)."""
    try:
        return same_public_key(key, cert)
    except (ValueError, UnsupportedAlgorithm):
        return False


def _self_signed(cert: x509.Certificate) -> bool:
    """Whether the certificate's own key made its signature. Not by comparing issuer and
    subject: names that differ only in case would read as CA-issued to that test, and a
    CA may issue a leaf under its own name."""
    return signed_by(cert, cert)


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``issuer``'s key made ``cert``'s signature (names are not compared); also
    obtain-cert's check of the chain a CA returns."""
    try:
        public, params = issuer.public_key(), cert.signature_algorithm_parameters
        signature, tbs = cert.signature, cert.tbs_certificate_bytes
        if isinstance(public, rsa.RSAPublicKey) and isinstance(params, PKCS1v15 | PSS):
            hash_alg = cast(hashes.HashAlgorithm, cert.signature_hash_algorithm)
            public.verify(signature, tbs, params, hash_alg)
        elif isinstance(public, ec.EllipticCurvePublicKey) and isinstance(params, ec.ECDSA):
            public.verify(signature, tbs, params)
        elif isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            public.verify(signature, tbs)  # a private CA's intermediate may be EdDSA
        else:
            return False
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def _require_regular(path: Path, what: str) -> None:
    """Refuse a FIFO or device: opening a FIFO waits for a writer, and a reload stuck there
    would stop the poll thread, revocations included, and the server's shutdown."""
    with contextlib.suppress(OSError):  # read_file reports a missing or unreadable file
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ServerCertError(f"{what} {path.absolute()} is not a regular file")


def _warn_if_others_read(key_path: Path) -> None:
    """Whoever reads the server's key can pose as this server to its clients. Its group may
    (README: a service group, mode 0640); other users are warned about, not refused: a
    Kubernetes secret volume mounts its files 0644 unless told otherwise (defaultMode)."""
    with contextlib.suppress(OSError):  # read_file has just read it; a race is not ours
        mode = os.stat(key_path).st_mode
        if mode & stat.S_IROTH:
            where = key_path.absolute()
            log.warning(
                "server key %s is readable by every local user (mode %04o): any of them can "
                "pose as this server to its clients; run: chmod o-r %s (Kubernetes: give "
                "the secret volume defaultMode: 0400)",
                where, stat.S_IMODE(mode), where,
            )  # fmt: skip


def valid_now(leaf: x509.Certificate) -> bool:
    return leaf.not_valid_before_utc <= dt.datetime.now(dt.UTC) < leaf.not_valid_after_utc
