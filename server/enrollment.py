"""Checks a certificate must pass before it may be enrolled as a client identity."""

from __future__ import annotations

import datetime as dt
import re
import string
import warnings
from dataclasses import dataclass
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.utils import CryptographyDeprecationWarning

from pinrpc.cli import ALWAYS_ALLOWED_NAMES
from pinrpc.errors import EnrollmentError, IdentityError
from pinrpc.identity import (
    ED25519_REASON,
    Fingerprint,
    cert_to_pem,
    parse_single_certificate,
    spki_sha256,
)

MIN_RSA_BITS = 2048
# BoringSSL (bundled in grpcio) fails RSA keys with a longer public exponent: measured, a
# client with e = 2^33 + 17 cannot build its credentials and the server answers BAD_E_VALUE.
MAX_RSA_EXPONENT_BITS = 33
# The curves the TLS stack offers for client signatures; others always fail the handshake.
EC_CURVES = ("secp256r1", "secp384r1")
REKEY_HINT = "make a new key pair with `pinrpc keygen`"
# Measured with grpcio 1.85: a client certificate of 8,230 DER bytes completes the handshake,
# one of 8,526 does not (the connection is dropped); keygen's are about 600.
MAX_CERT_BYTES = 8192
_SPACE_CHARS = " \t\n\v\f\r"  # OpenSSL's isspace
_SPACES = re.compile(f"[{_SPACE_CHARS}]+")
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_Ext = TypeVar("_Ext", bound=x509.ExtensionType)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A certificate that passed every check that does not need the registry."""

    cert: x509.Certificate
    fingerprint: Fingerprint
    pem: str
    spki_sha256: str
    subject: str
    has_key_ids: bool
    not_after: dt.datetime


def _extension(cert: x509.Certificate, kind: type[_Ext]) -> _Ext | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def check_certificate(data: bytes, where: str, now: dt.datetime | None = None) -> Candidate:
    """Parse and vet one client certificate; raise EnrollmentError with the reason and fix."""
    try:
        # A serial of zero or below loads with a warning today and will not load at all in a
        # future cryptography, which would make the registry unreadable: refused below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            cert = parse_single_certificate(data, where)
            serial = cert.serial_number
        # Parsing is lazy: malformed extensions, names or keys raise on first use, so touch
        # them all here, inside the try.
        extensions = cert.extensions
        subject = cert.subject.rfc4514_string()
        cert.issuer.rfc4514_string()
        public = cert.public_key()
    except IdentityError as exc:
        raise EnrollmentError(str(exc)) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise EnrollmentError(f"{where} is not a valid certificate: {exc}") from exc
    size = len(cert.public_bytes(serialization.Encoding.DER))
    if size > MAX_CERT_BYTES:
        raise EnrollmentError(
            f"{where} is {size} bytes long: grpcio fails the handshake with client certificates "
            f"over about {MAX_CERT_BYTES} bytes (a very long subject?); {REKEY_HINT}"
        )
    if serial <= 0:
        raise EnrollmentError(
            f"{where} has serial number {serial}, which must be positive (RFC 5280; "
            f"future versions of cryptography refuse to load it); {REKEY_HINT}"
        )
    now = now or dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc <= now:
        raise EnrollmentError(
            f"{where} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; {REKEY_HINT}"
        )
    if cert.not_valid_before_utc > now:
        raise EnrollmentError(
            f"{where} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
            "check the clock of the machine that made it"
        )
    if isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        raise EnrollmentError(f"{where} has an EdDSA key: {ED25519_REASON}")
    if isinstance(public, rsa.RSAPublicKey) and public.key_size < MIN_RSA_BITS:
        raise EnrollmentError(
            f"{where} has a {public.key_size}-bit RSA key; at least {MIN_RSA_BITS} bits are "
            f"required; {REKEY_HINT}"
        )
    if (
        isinstance(public, rsa.RSAPublicKey)
        and (bits := public.public_numbers().e.bit_length()) > MAX_RSA_EXPONENT_BITS
    ):
        raise EnrollmentError(
            f"{where} has an RSA key whose public exponent is {bits} bits long; gRPC's TLS "
            f"stack (BoringSSL) refuses exponents over {MAX_RSA_EXPONENT_BITS} bits, so this "
            f"key could never connect (65537 is the usual exponent); {REKEY_HINT}"
        )
    if not isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise EnrollmentError(f"{where} has an unsupported key type; {REKEY_HINT}")
    if isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name not in EC_CURVES:
        raise EnrollmentError(
            f"{where} has an EC key on {public.curve.name}, which the TLS stack cannot use "
            f"for client authentication (P-256 or P-384 only); {REKEY_HINT}"
        )
    # A key allowed to sign certificates could mint leaves that the handshake accepts.
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise EnrollmentError(
            f"{where} is a CA certificate (basicConstraints CA:TRUE); enroll a client "
            f"certificate that cannot sign others; {REKEY_HINT}"
        )
    if cert.issuer != cert.subject:  # issued by a CA: grpcio could not use it as its own root
        raise EnrollmentError(
            f"{where} is issued by {cert.issuer.rfc4514_string()!r}, not self-signed: enroll "
            f"the client's own self-signed certificate; {REKEY_HINT}"
        )
    # Proof of possession: only the key's holder can make a valid self-signature. A corrupted
    # or re-labelled certificate would otherwise become a trust anchor for the handshake.
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise EnrollmentError(
            f"{where} is not validly self-signed ({exc or 'bad signature'}): it is corrupted "
            f"or was not made by the holder of its key; {REKEY_HINT}"
        ) from exc
    _check_cannot_sign_certificates(cert, where)
    has_ids = (
        extensions is not None
        and _extension(cert, x509.SubjectKeyIdentifier) is not None
        and _extension(cert, x509.AuthorityKeyIdentifier) is not None
    )
    return Candidate(
        cert=cert,
        fingerprint=Fingerprint.of(cert),
        pem=cert_to_pem(cert).decode(),
        spki_sha256=spki_sha256(cert),
        subject=subject,
        has_key_ids=has_ids,
        not_after=cert.not_valid_after_utc,
    )


def _check_cannot_sign_certificates(cert: x509.Certificate, where: str) -> None:
    """The handshake refuses leaves minted by an enrolled key only when the enrolled
    certificate has a keyUsage (critical or not) lacking keyCertSign; without one anything its
    key signs verifies (measured: tests/test_enrollment.py, ..._cannot_mint_leaves_...)."""
    usage = _extension(cert, x509.KeyUsage)
    if usage is not None and usage.key_cert_sign:
        raise EnrollmentError(
            f"{where} allows keyCertSign, so its key could mint other certificates; {REKEY_HINT}"
        )
    if usage is not None and not usage.digital_signature:
        # The client signs the handshake (CertificateVerify): grpcio refuses to, or the server
        # refuses the signature (KEY_USAGE_BIT_INCORRECT).
        raise EnrollmentError(
            f"{where} has a keyUsage without digitalSignature, so its key may not sign the TLS "
            f"handshake; {REKEY_HINT}"
        )
    if usage is None:  # always so for v1 certificates, which cannot carry extensions
        v3 = cert.version == x509.Version.v3
        flaw = "has no keyUsage extension" if v3 else "is an X.509 v1 certificate"
        raise EnrollmentError(
            f"{where} {flaw}, so its key could mint certificates the TLS handshake accepts; "
            f"{REKEY_HINT} (its certificates have keyUsage digitalSignature only)"
        )


def canonical_name(name: x509.Name) -> tuple[tuple[tuple[str, str], ...], ...]:
    """The name as the TLS stack compares names (OpenSSL's canonical encoding): per value,
    ASCII lower-cased, surrounding whitespace trimmed, inner whitespace runs collapsed."""
    return tuple(
        tuple(sorted((attr.oid.dotted_string, _canonical_value(attr.value)) for attr in rdn))
        for rdn in name.rdns
    )


def _canonical_value(value: str | bytes) -> str:
    text = value if isinstance(value, str) else value.hex()
    folded = text.translate(_ASCII_LOWER)  # only ASCII: OpenSSL leaves other letters alone
    return _SPACES.sub(" ", folded).strip(_SPACE_CHARS)


MAX_PATTERNS = 100  # --allow patterns per client
MAX_PATTERN_LENGTH = 256  # characters each; method names are far shorter
# All of a client's together: the audit's enroll line carries them, JSON-escaped (at most twice
# as long), and must stay under the 16 KiB at which collectors (Docker's log drivers) split lines.
MAX_PATTERNS_TOTAL = 4096
_PATTERN_CHARS = re.compile("[!-~]+")  # visible ASCII


def check_patterns(patterns: list[str]) -> list[str]:
    """Method patterns are fnmatch globs on the full method name, '/package.Service/Method'."""
    # Bounded: they are kept in every Identity and written whole in the audit's enroll line.
    if len(patterns) > MAX_PATTERNS:
        raise EnrollmentError(
            f"{len(patterns)} method patterns: at most {MAX_PATTERNS} (use globs like "
            "'/pinrpc.v1.Echo/*')"
        )
    total = sum(map(len, patterns))
    if total > MAX_PATTERNS_TOTAL:
        raise EnrollmentError(
            f"method patterns of {total} characters in all: at most {MAX_PATTERNS_TOTAL} (use "
            "globs like '/pinrpc.v1.Echo/*')"
        )
    for pattern in patterns:
        if len(pattern) > MAX_PATTERN_LENGTH:
            raise EnrollmentError(
                f"method pattern {pattern[:40]!r}... is {len(pattern)} characters long: "
                f"at most {MAX_PATTERN_LENGTH}"
            )
        if not _PATTERN_CHARS.fullmatch(pattern):
            # A method name is visible ASCII; anything else only served to forge the lines
            # of `pinrpc-server list` or to write control sequences to a terminal.
            raise EnrollmentError(
                f"method pattern {pattern!r} holds characters no method name has "
                "(spaces, control characters or non-ASCII)"
            )
        if pattern != "*" and not pattern.startswith("/"):
            raise EnrollmentError(
                f"method pattern {pattern!r} must start with '/' "
                "(like '/pinrpc.v1.Echo/*') or be '*'"
            )
    return list(dict.fromkeys(patterns))


def new_permissions(patterns: list[str], none: bool) -> list[str]:
    """The patterns `permit` sets: given, or none at all only when asked for by name, since no
    patterns is also what a forgotten --allow (or an unset PINRPC_ALLOW) looks like."""
    if none and patterns:
        raise EnrollmentError("give method patterns or --none, not both")
    if not none and not patterns:
        raise EnrollmentError(
            "no method patterns given: pass --allow PATTERN (repeatable), or --none to leave "
            f"the client only {ALWAYS_ALLOWED_NAMES}"
        )
    return check_patterns(patterns)
