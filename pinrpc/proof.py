"""Proof of possession: a signature by a certificate's key over a message bound to it.

The signed message is a fixed context string, then bytes that tie it to one exchange, then the
exact certificate (DER), so a signature cannot be replayed for another certificate or reused in
another protocol. Enrollment requests bind a server-issued nonce (ENROLLMENT); rotations bind
the caller's current certificate (ROTATION, see rotation_binding).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from pinrpc.identity import Fingerprint, PrivateKey

ENROLLMENT = b"pinrpc-enrollment-v1\x00"
ROTATION = b"pinrpc-rotate-v1\x00"


def rotation_binding(current: Fingerprint) -> bytes:
    """What a rotation proof binds besides the successor: the SHA-256 of the certificate that
    makes the call, which the server takes from the TLS peer, never from the request. A proof
    is then good for one (current, successor) pair only: another client (another current
    certificate) cannot replay it, nor can it vouch for another successor, so no nonce round
    trip is needed. Only the holder of the current key can send it again, for the same pair."""
    return current.digest


def message(context: bytes, bound: bytes, cert: x509.Certificate) -> bytes:
    return context + bound + cert.public_bytes(serialization.Encoding.DER)


def sign(
    key: PrivateKey, bound: bytes, cert: x509.Certificate, context: bytes = ENROLLMENT
) -> bytes:
    data = message(context, bound, cert)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def verify(
    cert: x509.Certificate, bound: bytes, signature: bytes, context: bytes = ENROLLMENT
) -> bool:
    public = cert.public_key()
    data = message(context, bound, cert)
    try:
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            return False
    except InvalidSignature:
        return False
    return True
