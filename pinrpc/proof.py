"""Proof of possession for enrollment requests: sign a server-issued nonce with the key.

The signed message binds the nonce to the exact certificate and carries a fixed context
string, so the signature cannot be replayed for another certificate or reused elsewhere.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from pinrpc.identity import PrivateKey

CONTEXT = b"pinrpc-enrollment-v1\x00"


def message(nonce: bytes, cert: x509.Certificate) -> bytes:
    return CONTEXT + nonce + cert.public_bytes(serialization.Encoding.DER)


def sign(key: PrivateKey, nonce: bytes, cert: x509.Certificate) -> bytes:
    data = message(nonce, cert)
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(data, ec.ECDSA(hashes.SHA256()))


def verify(cert: x509.Certificate, nonce: bytes, signature: bytes) -> bool:
    public = cert.public_key()
    data = message(nonce, cert)
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
