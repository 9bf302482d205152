"""secure_channel(): a gRPC channel that presents a pinrpc client identity."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from pinrpc.errors import IdentityError
from pinrpc.identity import (
    Fingerprint,
    PrivateKey,
    cert_to_pem,
    key_to_pem,
    load_ca_bundle,
    load_certificate,
    load_private_key,
    same_public_key,
)

PASSPHRASE_ENV = "PINRPC_KEY_PASSPHRASE"  # noqa: S105 - a variable name, not a secret
ROOTS_ENV = "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"  # gRPC's replacement for its default roots
REENROLL_HINT = (
    "an expired certificate cannot rotate: make a new key pair (`pinrpc keygen NAME --force`) "
    "and have the operator enroll it with `pinrpc-server enroll NAME.crt --name NAME --replace`"
)


def passphrase_from_env() -> bytes | None:
    """PINRPC_KEY_PASSPHRASE as bytes: any bytes work, UTF-8 or not."""
    return os.environb.get(PASSPHRASE_ENV.encode()) or None


def load_pair(
    cert: Path | str,
    key: Path | str,
    *,
    passphrase: bytes | None = None,
    insecure_key_permissions: bool = False,
) -> tuple[x509.Certificate, PrivateKey]:
    """A certificate and the private key that belongs to it (PINRPC_KEY_PASSPHRASE unless
    ``passphrase``, bytes; b"" means none); grpcio would report a mismatch as nothing more
    than "Socket closed"."""
    if passphrase is None:
        passphrase = passphrase_from_env()
    certificate = load_certificate(Path(cert))
    private_key = load_private_key(
        Path(key), passphrase=passphrase, check_permissions=not insecure_key_permissions
    )
    if not same_public_key(private_key, certificate):
        raise IdentityError(
            f"private key {Path(key).absolute()} does not belong to certificate "
            f"{Path(cert).absolute()}"
        )
    return certificate, private_key


def swap_journal(cert: Path) -> Path:
    """NAME.crt.swap: while it exists, a swap of the pair (`pinrpc rotate` or `keygen`, see
    client/keyfiles.py) is under way or was killed, and the pair in place may be mismatched,
    missing, or one the server no longer admits."""
    return cert.with_name(cert.name + ".swap")


@contextlib.contextmanager
def _no_swap_under_way(cert: Path, key: Path) -> Iterator[None]:
    """A shared lock on the pair's directory, which a swap holds exclusively for milliseconds,
    so a live one is waited for rather than read half-way; then refuse a killed one. Only the
    pinrpc command finishes it: a library call renames nothing, since it may run as a service
    whose user may only read the files, beside the pinrpc command that owns them."""
    try:
        fd = os.open(cert.absolute().parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        fd = -1  # a directory it may not list: read the files unlocked, as before
    try:
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_SH)
        legacy = cert.with_name(cert.name + ".old-until.new")  # what older pinrpc wrote
        if marks := [p for p in (swap_journal(cert), legacy) if os.path.lexists(p)]:
            raise IdentityError(
                f"the key pair {cert.absolute()} is half-way through an interrupted `pinrpc "
                f"rotate` or `keygen` ({marks[0].absolute()}); finish it with `pinrpc whoami "
                f"--server HOST:PORT --cert {cert} --key {key}` (your usual connection flags), "
                f"then start this again"
            )
        yield
    finally:
        if fd >= 0:
            os.close(fd)


def client_credentials(
    cert: Path | str,
    key: Path | str,
    ca: Path | str | None = None,
    *,
    passphrase: bytes | None = None,
    insecure_key_permissions: bool = False,
) -> tuple[grpc.ChannelCredentials, Fingerprint]:
    """Credentials for ``cert``/``key`` (see ``load_pair``) and the fingerprint the server
    will see. A certificate outside its dates is refused here, with what to do: the server
    would refuse it at the handshake, and every call would fail without a reason. A pair
    an interrupted swap left is refused, naming the command that finishes it."""
    with _no_swap_under_way(Path(cert), Path(key)):
        certificate, private_key = load_pair(
            cert, key, passphrase=passphrase, insecure_key_permissions=insecure_key_permissions
        )
    if problem := dates_problem(certificate, cert):
        what, fix = problem
        raise IdentityError(f"client {what}: the server refuses it; {fix}")
    return pair_credentials(certificate, private_key, ca), Fingerprint.of(certificate)


def dates_problem(certificate: x509.Certificate, path: Path | str) -> tuple[str, str] | None:
    """What is wrong with the certificate's dates, and what to do; None if nothing. The
    server refuses such a certificate at the handshake, which gRPC reports on every call as
    nothing more than UNAVAILABLE "Socket closed"."""
    now, where = dt.datetime.now(dt.UTC), Path(path).absolute()
    if certificate.not_valid_after_utc <= now:
        ended = certificate.not_valid_after_utc
        return f"certificate EXPIRED on {ended:%Y-%m-%d %H:%M} UTC ({where})", REENROLL_HINT
    if certificate.not_valid_before_utc > now:
        start = certificate.not_valid_before_utc
        return (
            f"certificate is not valid before {start:%Y-%m-%d %H:%M} UTC ({where})",
            "check this machine's clock",
        )
    return None


def pair_credentials(
    certificate: x509.Certificate, private_key: PrivateKey, ca: Path | str | None = None
) -> grpc.ChannelCredentials:
    """Credentials for a pair ``load_pair`` returned: each file is read once, so a pipe
    (``--cert <(command)``) works."""
    root_pem = load_ca_bundle(Path(ca)) if ca is not None else roots_from_env()
    # grpcio wants an unencrypted PEM; it only ever lives in this process's memory.
    return grpc.ssl_channel_credentials(
        root_certificates=root_pem,
        private_key=key_to_pem(private_key),
        certificate_chain=cert_to_pem(certificate),
    )


def roots_from_env() -> bytes | None:
    """The roots GRPC_DEFAULT_SSL_ROOTS_FILE_PATH names, checked as --ca is: gRPC itself aborts
    the process when it names a directory, falls back to other roots when the file is missing,
    and fails the handshake without a reason when it holds no certificate."""
    path = os.environ.get(ROOTS_ENV)
    if not path:
        return None
    try:
        return load_ca_bundle(Path(path))
    except IdentityError as exc:
        raise IdentityError(f"{ROOTS_ENV}: {exc} (or unset it, or pass --ca)") from exc


def secure_channel(
    target: str,
    cert: Path | str,
    key: Path | str,
    ca: Path | str | None = None,
    server_name: str | None = None,
    *,
    passphrase: bytes | None = None,
    insecure_key_permissions: bool = False,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A channel to ``target`` authenticated by the client certificate ``cert``.

    ``ca`` is a PEM bundle to verify the server with; None means gRPC's default roots, which
    include ISRG Root X1 (Let's Encrypt). ``server_name`` overrides the name checked in the
    server's certificate: for tests and development, when the address differs from it.
    """
    creds, _ = client_credentials(
        cert,
        key,
        ca,
        passphrase=passphrase,
        insecure_key_permissions=insecure_key_permissions,
    )
    opts = list(options)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(target, creds, options=opts)
