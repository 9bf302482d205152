"""Enrollment requests (pinrpc.v1.Enrollment), on the optional --enrollment-listen port.

Server-only TLS: the caller has no admitted certificate yet. It asks for a nonce, signs it
with its key (proof of possession), and submits its certificate; the request waits in the
registry for an operator. Nonces are single-use and short-lived, and both nonces and pending
requests are bounded in number, so the port cannot be used to fill memory or the registry; and
per peer host (request_watch.peer_host), so that one host cannot use up either bound alone and
lock everyone else out (for a nonce's 5 minutes, or a request's --enrollment-ttl).
"""

from __future__ import annotations

import datetime as dt
import functools
import secrets
import threading
from collections.abc import Sequence

import grpc

from pinrpc import proof
from pinrpc.errors import CapacityError, EnrollmentError, PinrpcError
from pinrpc.identity import check_name
from pinrpc.v1 import enrollment_pb2, enrollment_pb2_grpc
from server.admin import abort_with, timestamp
from server.audit import Audit
from server.enrollment import check_certificate
from server.registry import Pending, Registry
from server.registry_model import refuse_fingerprint_name
from server.request_watch import host_of, peer_host

NONCES_PER_HOST = 16  # outstanding; a client needs one, a few behind one NAT a few more
PENDING_PER_HOST = 10  # waiting requests; the operator approving some makes room again


class NonceBook:
    """Issued nonces until used or expired; at most ``limit`` outstanding, ``per_host`` of
    them for one peer host."""

    def __init__(self, ttl: dt.timedelta, limit: int, per_host: int = NONCES_PER_HOST) -> None:
        self._ttl, self._limit, self._per_host = ttl, limit, per_host
        self._issued: dict[bytes, tuple[dt.datetime, str]] = {}  # nonce -> (expires, host)
        self._lock = threading.Lock()

    def issue(self, host: str) -> tuple[bytes, dt.datetime]:
        now = dt.datetime.now(dt.UTC)
        with self._lock:
            self._issued = {n: (t, h) for n, (t, h) in self._issued.items() if t > now}
            if len(self._issued) >= self._limit:
                raise CapacityError("too many outstanding challenges; try again in a minute")
            if sum(h == host for _, h in self._issued.values()) >= self._per_host:
                raise CapacityError(
                    f"{self._per_host} challenges issued to {host} are still unused; use them "
                    f"or try again in {self._ttl.total_seconds() / 60:g} minutes"
                )
            nonce, expires = secrets.token_bytes(32), now + self._ttl
            self._issued[nonce] = (expires, host)
        return nonce, expires

    def redeem(self, nonce: bytes) -> bool:
        """True once per issued, unexpired nonce."""
        with self._lock:
            expires, _ = self._issued.pop(nonce, (None, ""))
        return expires is not None and expires > dt.datetime.now(dt.UTC)


class EnrollmentService(enrollment_pb2_grpc.EnrollmentServicer):
    def __init__(
        self,
        registry: Registry,
        audit: Audit,
        *,
        request_ttl: dt.timedelta = dt.timedelta(hours=24),
        max_pending: int = 100,
        nonces: NonceBook | None = None,
    ) -> None:
        self._registry, self._audit = registry, audit
        self._ttl, self._max_pending = request_ttl, max_pending
        self._nonces = nonces or NonceBook(dt.timedelta(minutes=5), limit=1000)

    def Challenge(
        self, request: enrollment_pb2.ChallengeRequest, context: grpc.ServicerContext
    ) -> enrollment_pb2.ChallengeResponse:
        try:
            nonce, expires = self._nonces.issue(peer_host(context))
        except PinrpcError as exc:
            abort_with(context, exc)
        return enrollment_pb2.ChallengeResponse(nonce=nonce, expires_at=timestamp(expires))

    def Request(
        self, request: enrollment_pb2.EnrollmentRequest, context: grpc.ServicerContext
    ) -> enrollment_pb2.EnrollmentTicket:
        try:
            data = request.certificate_pem.encode()
            if len(data) > 64 * 1024:
                raise EnrollmentError("the certificate is larger than 65536 bytes")
            candidate = check_certificate(data, "the submitted certificate")
            name = check_name(request.name)
            refuse_fingerprint_name(name)  # approve refuses it as a new name: say so now
            # Redeem only after the cheap checks, but always before trusting the signature.
            if not self._nonces.redeem(request.nonce):
                raise EnrollmentError("unknown, used or expired nonce; ask for a new Challenge")
            if not proof.verify(candidate.cert, request.nonce, request.signature):
                raise EnrollmentError(
                    "the signature does not verify with the certificate's key (proof of "
                    "possession failed)"
                )
            # The host's requests are counted in the registry's transaction that adds this one.
            pending = self._registry.request_enrollment(
                candidate, name, context.peer(), self._ttl, self._max_pending,
                check_waiting=functools.partial(_refuse_crowded_host, peer_host(context)),
            )  # fmt: skip
        except PinrpcError as exc:
            abort_with(context, exc, self._registry.where)
        self._audit.event(
            "enrollment_request", client=name, fingerprint=str(pending.fingerprint),
            peer=pending.peer,
        )  # fmt: skip
        return enrollment_pb2.EnrollmentTicket(
            fingerprint=str(pending.fingerprint), expires_at=timestamp(pending.expires_at)
        )


def _refuse_crowded_host(host: str, waiting: Sequence[Pending]) -> None:
    from_host = sum(host_of(p.peer) == host for p in waiting)
    if from_host >= PENDING_PER_HOST:
        raise CapacityError(
            f"{from_host} enrollment requests from {host} are already waiting for the "
            "operator; try again once they are handled or expired"
        )
