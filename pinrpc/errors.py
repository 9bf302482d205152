"""The error hierarchy shared by the library, the server and both CLIs.

Every message is one line that says what failed, where, and what to do next. Code raises these
at its boundaries (``raise ... from exc``) so the CLIs can print them without a traceback.
"""

from __future__ import annotations

# Trailing metadata on a status the pinrpc server gave for one of these errors (value: the
# class name). A client tells by it that the server answered: a registry outage is UNAVAILABLE,
# which otherwise reads like a server it could not reach.
ERROR_METADATA = "pinrpc-error"


class PinrpcError(Exception):
    """Base class: an expected failure with a message fit for a user."""


class IdentityError(PinrpcError):
    """A key or certificate could not be made, read or written."""


class KeyPermissionError(IdentityError):
    """A private key file is readable by other users."""


class EnrollmentError(PinrpcError):
    """A certificate is not acceptable as a client identity."""


class RegistryError(PinrpcError):
    """The registry could not be read or changed."""


class NotFoundError(RegistryError):
    """No client matches the given name or fingerprint."""


class ConflictError(RegistryError):
    """The name or fingerprint is already taken."""


class CapacityError(RegistryError):
    """A bounded queue (pending enrollment requests, nonces) is full."""


class ServerCertError(PinrpcError):
    """The server's own certificate or key files are unusable."""


class AcmeError(PinrpcError):
    """obtain-cert could not get the server a certificate (the CA, the challenge, the files)."""


class AnswerError(PinrpcError):
    """A server answered with what the protocol does not allow (a timestamp out of range)."""


class OutputError(PinrpcError):
    """Standard output could not be written: `> out.json` on a full disk (ENOSPC, EDQUOT, EIO)."""
