"""Remote administration (pinrpc.v1.Admin) and self-rotation (pinrpc.v1.Identity).

Both run the same checks as the local CLI (server/enrollment.py, the registry's rules) and
record who changed what in the audit log. Expected failures map to gRPC status codes through
one table. An administrator allowed only some Admin methods acts within its own permissions.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import re
from collections.abc import Callable, Sequence
from typing import NoReturn

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from pinrpc import proof
from pinrpc.errors import (
    ERROR_METADATA,
    CapacityError,
    ConflictError,
    EnrollmentError,
    IdentityError,
    NotFoundError,
    PinrpcError,
    RegistryError,
)
from pinrpc.identity import Fingerprint, check_name
from pinrpc.listing import PAGE_BYTES, PAGE_SIZE
from pinrpc.v1 import admin_pb2, admin_pb2_grpc, identity_pb2, identity_pb2_grpc
from server.audit import Audit
from server.auth import ADMIN_PREFIX, Identity, caller
from server.enrollment import Candidate, check_certificate, check_patterns, new_permissions
from server.registry import Client, Registry, now_utc
from server.registry_model import After, Guard

MAX_CERT_BYTES = 64 * 1024


class OutOfReachError(PinrpcError):
    """A narrow administrator's change reaches beyond its own permissions."""


class PageError(PinrpcError):
    """A List request's page_size or page_token is not one this server can answer."""


# Most specific first: the first matching class decides.
STATUS_OF: tuple[tuple[type[PinrpcError], grpc.StatusCode], ...] = (
    (OutOfReachError, grpc.StatusCode.PERMISSION_DENIED),
    (PageError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (RegistryError, grpc.StatusCode.UNAVAILABLE),
    (EnrollmentError, grpc.StatusCode.INVALID_ARGUMENT),
    (IdentityError, grpc.StatusCode.INVALID_ARGUMENT),
)


# A status message travels in a header: over 16 KiB the caller got RESOURCE_EXHAUSTED
# "Stream removed" instead of the answer (a 100 KB name, quoted in the error).
MAX_MESSAGE = 2000
# A refusal's audit line quotes its reason, which may quote the caller's input.
MAX_AUDIT_ERROR = 300
ROTATE = "/pinrpc.v1.Identity/Rotate"
ADMIN_ALL = f"{ADMIN_PREFIX}*"
_GLOB = re.compile(r"[*?[]")  # fnmatch's special characters
# Stands for the registry's path or URL in what a remote caller reads: where the server keeps
# its files is none of its business (the local CLI's messages name it, for the operator).
WITHHELD = "[location withheld]"


def abort_with(context: grpc.ServicerContext, exc: PinrpcError, hide: str = "") -> NoReturn:
    """End the call with ``exc``'s status and message, ``hide`` (the registry's ``where``)
    replaced by WITHHELD."""
    code = next((c for kind, c in STATUS_OF if isinstance(exc, kind)), grpc.StatusCode.INTERNAL)
    context.set_trailing_metadata(((ERROR_METADATA, type(exc).__name__),))
    message = str(exc).replace(hide, WITHHELD) if hide else str(exc)
    # It may quote the caller's input: keep it under gRPC's header limits.
    if len(message) > MAX_MESSAGE:
        message = f"{message[: MAX_MESSAGE - 40]}... ({len(message)} characters in all)"
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def timestamp(when: dt.datetime | None) -> Timestamp | None:
    if when is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(when)
    return stamp


def to_proto(client: Client) -> admin_pb2.Client:
    return admin_pb2.Client(
        name=client.name,
        fingerprint=str(client.fingerprint),
        spki_sha256=client.spki_sha256,
        allowed_methods=client.allowed_methods,
        subject=client.subject,
        enrolled_at=timestamp(client.enrolled_at),
        not_after=timestamp(client.not_after),
        revoked_at=timestamp(client.revoked_at),
        retire_at=timestamp(client.retire_at),
        # "Admitted right now": the server refuses an expired certificate too (trust.py).
        active=client.active and client.not_after > now_utc(),
    )


def _candidate_from(pem: str) -> tuple[bytes, str]:
    data = pem.encode()
    if len(data) > MAX_CERT_BYTES:
        raise EnrollmentError(f"the certificate is larger than {MAX_CERT_BYTES} bytes")
    return data, "the submitted certificate"


def _check_rotation_proof(successor: Candidate, signature: bytes, current: Fingerprint) -> None:
    """Refuse a successor whose key the caller does not hold: a self-signature alone let any
    client claim another's public certificate (docs/SECURITY.md, findings fixed).
    INVALID_ARGUMENT (EnrollmentError), as for the enrollment port's failed proof: the request
    is wrong in itself. PERMISSION_DENIED is the method ACL's answer, which `pinrpc` explains
    as a permission problem with the caller's certificate."""
    if not signature:
        raise EnrollmentError(
            "the rotation carries no proof that you hold the new certificate's key (an older "
            "pinrpc client?); update pinrpc and rotate again"
        )
    if not proof.verify(successor.cert, proof.rotation_binding(current), signature, proof.ROTATION):
        raise EnrollmentError(
            "the proof does not verify with the new certificate's key for this caller's "
            "certificate (proof of possession failed)"
        )


def covers(held: str, granted: str) -> bool:
    """Whether every method that pattern ``granted`` allows, ``held`` allows too, as
    server/auth.py's method_allowed reads them (Admin methods only by patterns naming the Admin
    service). Sound, not complete: what it cannot show covered counts as not covered."""
    if granted.startswith(ADMIN_PREFIX) and not held.startswith(ADMIN_PREFIX):
        return False
    if held in (granted, "*"):
        return True
    if not _GLOB.search(granted):  # one method, by name
        return fnmatch.fnmatchcase(granted, held)
    stem = held.removesuffix("*")  # a literal prefix and '*' covers any pattern with that prefix
    return stem != held and not _GLOB.search(stem) and granted.startswith(stem)


def _full(patterns: Sequence[str]) -> bool:
    """Allowed every Admin method (as far as ``covers`` can show)."""
    return any(covers(p, ADMIN_ALL) for p in patterns)


def _reach(who: Identity, patterns: Sequence[str], holder: str) -> None:
    """A caller not allowed every Admin method may grant only patterns its own cover, and
    revoke, re-permit or re-key only clients whose patterns its own cover: without this
    `Permit` alone granted its caller all of Admin, and `Revoke` alone ended the operator's.
    ``holder``: whose ``patterns`` they are, for the refusal ('' for the requested ones)."""
    held = who.allowed_methods
    if _full(held):
        return  # a full administrator: it could grant itself anything anyway
    beyond = [p for p in patterns if not any(covers(h, p) for h in held)]
    if beyond:
        whose = f"held by {holder!r}" if holder else "requested"
        raise OutOfReachError(
            f"client {who.name!r} is not allowed all of {ADMIN_ALL}, so it may only grant, and "
            f"act on clients holding, patterns its own permissions cover: {beyond[0]!r} "
            f"({whose}) is not"
        )


def _within_reach(who: Identity) -> Guard:
    """The clients a change acts on, checked inside its transaction: checked on an earlier
    read, another admin's Permit or re-key could land between the check and the change."""

    def guard(clients: Sequence[Client]) -> None:
        for client in clients:
            _reach(who, client.allowed_methods, client.name)

    return guard


def _guards(who: Identity) -> tuple[Guard, After]:
    """The change's checks, both inside its transaction: before it, the caller's reach on the
    clients it acts on; after it, if it acted on a full administrator, that one remains.

    Without the second, one full admin (or a stolen key of one) could revoke, strip or re-key
    every full admin, itself included, and only a shell on the server could undo it. Remaining
    means a current (not retiring), unexpired certificate: a retiring one ends on its own."""
    within_reach = _within_reach(who)
    acted_on: list[Client] = []

    def guard(clients: Sequence[Client]) -> None:
        within_reach(clients)
        acted_on[:] = clients  # what this transaction acts on

    def after(remaining: Callable[[], Sequence[Client]]) -> None:
        if not any(_full(c.allowed_methods) for c in acted_on):
            return  # the full administrators are as before: spare the read of every row
        now = now_utc()
        active = remaining()
        if not any(c.current and c.not_after > now and _full(c.allowed_methods) for c in active):
            raise ConflictError(
                f"this change would leave no client allowed all of {ADMIN_ALL}, and nobody "
                "could administer the server remotely; give another client those permissions "
                "first, or make the change on the server machine with `pinrpc-server`"
            )

    return guard, after


# List's next_page_token: the fingerprint of the last certificate listed, after a version tag.
# A position, not server memory: any replica on the registry, or this one after a restart,
# continues from it. Unsigned and tied to no caller on purpose: the List permission is checked
# on every page and List shows every client to anyone it admits, so a forged token only picks
# where a listing starts, and the fingerprint is one the page just showed. (Not the row id:
# ids are internal, change with copy-registry, and gaps in them would tell how many changes
# were rolled back.)
CURSOR_VERSION = "p1"
MAX_TOKEN = 1024  # characters; the server's own are 67
# An answer to a List without page_size or page_token (a client from before paging) is refused
# past gRPC's default receive limit, which bounds what one call makes the server read and hold
# (`pinrpc admin list` from before paging took up to 256 MiB: past this it must be upgraded).
UNPAGED_BYTES = 4 * 1024 * 1024
START_AGAIN = "start the listing again without one"


def page_token(last: Client) -> str:
    return f"{CURSOR_VERSION}.{last.fingerprint.hex}"


def read_page_token(token: str) -> Fingerprint:
    version, _, position = token.partition(".")
    if len(token) > MAX_TOKEN or not re.fullmatch(r"p[0-9]{1,9}", version):
        raise PageError(f"page_token is not a token this server issues; {START_AGAIN}")
    if version != CURSOR_VERSION:
        raise PageError(
            f"page_token is of version {version!r}, this server reads {CURSOR_VERSION!r} "
            f"(issued by another pinrpc version?); {START_AGAIN}"
        )
    if not re.fullmatch(r"[0-9a-f]{64}", position):
        raise PageError(f"page_token does not name a certificate; {START_AGAIN}")
    return Fingerprint(bytes.fromhex(position))


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, registry: Registry, audit: Audit, refresh: Callable[[], None]) -> None:
        self._registry, self._audit, self._refresh = registry, audit, refresh

    def _changed(self, action: str, client: Client, **fields: object) -> None:
        self._refresh()  # effective for the next connection, not after the next poll
        who = caller()
        self._audit.event(
            "admin", action=action, by=who.name, by_fingerprint=str(who.fingerprint),
            client=client.name, fingerprint=str(client.fingerprint), **fields,
        )  # fmt: skip

    def _refused(
        self, context: grpc.ServicerContext, method: str, who: Identity, exc: PinrpcError
    ) -> NoReturn:
        """A refused change leaves a deny line, in the calls' bucket: any admin can send
        refusals in a flood, which must not push real changes out of the trail."""
        reason = "beyond_own_permissions" if isinstance(exc, OutOfReachError) else "refused"
        self._audit.event(
            "call", decision="deny", reason=reason, client=who.name,
            fingerprint=str(who.fingerprint), peer=context.peer(),
            method=f"{ADMIN_PREFIX}{method}", error=str(exc)[:MAX_AUDIT_ERROR],
        )  # fmt: skip
        abort_with(context, exc, self._registry.where)

    def Enroll(
        self, request: admin_pb2.EnrollRequest, context: grpc.ServicerContext
    ) -> admin_pb2.Client:
        who = caller()
        try:
            candidate = check_certificate(*_candidate_from(request.certificate_pem))
            allowed = check_patterns(list(request.allowed_methods))
            name = check_name(request.name)
            _reach(who, allowed, "")
            # A re-key revokes the client's certificates and may keep their permissions.
            guard, after = _guards(who)
            client = self._registry.enroll(
                candidate, name, allowed, replace=request.replace, guard=guard, after=after
            )
        except PinrpcError as exc:
            self._refused(context, "Enroll", who, exc)
        # A re-key also revokes the client's old certificates: the server's `revoke` lines for
        # them name nobody, so this line says who did it.
        self._changed("enroll", client, replace=request.replace)
        return to_proto(client)

    def Revoke(
        self, request: admin_pb2.RevokeRequest, context: grpc.ServicerContext
    ) -> admin_pb2.Client:
        who = caller()
        try:
            guard, after = _guards(who)
            client, *others = self._registry.revoke(request.client, guard=guard, after=after)
        except PinrpcError as exc:
            self._refused(context, "Revoke", who, exc)
        # By name, a client in a rotation's overlap loses its retiring certificates too: their
        # `revoke` lines name nobody, so this line says who ended them.
        self._changed("revoke", client, also_revoked=[str(c.fingerprint) for c in others])
        answer = to_proto(client)
        answer.also_revoked.extend(to_proto(c) for c in others)
        return answer

    def Permit(
        self, request: admin_pb2.PermitRequest, context: grpc.ServicerContext
    ) -> admin_pb2.Client:
        who = caller()
        try:
            allowed = new_permissions(list(request.allowed_methods), request.none)
            _reach(who, allowed, "")
            guard, after = _guards(who)
            client = self._registry.permit(request.client, allowed, guard=guard, after=after)
        except PinrpcError as exc:
            self._refused(context, "Permit", who, exc)
        self._changed("permit", client, allowed_methods=list(client.allowed_methods))
        return to_proto(client)

    def List(
        self, request: admin_pb2.ListRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListResponse:
        """A page is one range read of the registry, from the token's position: no read of
        every row, nothing held between pages."""
        try:
            if request.page_size < 0:
                raise PageError(
                    f"page_size {request.page_size} is negative: ask for 1 to {PAGE_SIZE} "
                    "clients a page"
                )
            if not request.page_size and not request.page_token:
                # A client from before paging: it sends neither field and reads only `clients`.
                return self._unpaged()
            after = read_page_token(request.page_token) if request.page_token else None
            size = min(request.page_size or PAGE_SIZE, PAGE_SIZE)
            try:
                clients = self._registry.clients_after(after, size + 1)  # +1: is there more?
            except NotFoundError as exc:
                raise PageError(
                    f"page_token names a certificate the registry does not hold (another "
                    f"registry?); {START_AGAIN}"
                ) from exc
        except PinrpcError as exc:
            abort_with(context, exc, self._registry.where)
        answer = admin_pb2.ListResponse()
        used = 0
        for client in clients[:size]:
            record = to_proto(client)
            used += record.ByteSize()
            if answer.clients and used > PAGE_BYTES:  # large records: a shorter page
                break
            answer.clients.append(record)
        if len(answer.clients) < len(clients):
            answer.next_page_token = page_token(clients[len(answer.clients) - 1])
        return answer

    def _unpaged(self) -> admin_pb2.ListResponse:
        """Every client in one answer, read a page at a time and refused past UNPAGED_BYTES:
        read whole, any List caller made the server hold every row (and its answer) per call."""
        answer, after = admin_pb2.ListResponse(), None
        while True:
            clients = self._registry.clients_after(after, PAGE_SIZE)
            answer.clients.extend(to_proto(client) for client in clients)
            # As sent: each record's tag and length too, which a sum of theirs would miss.
            if answer.ByteSize() > UNPAGED_BYTES:
                raise CapacityError(
                    f"the registry's clients take more than {UNPAGED_BYTES} bytes, more than a "
                    "client that does not ask for pages can receive; list them a page at a "
                    "time (update pinrpc)"
                )
            if len(clients) < PAGE_SIZE:
                return answer
            after = clients[-1].fingerprint

    def Get(self, request: admin_pb2.GetRequest, context: grpc.ServicerContext) -> admin_pb2.Client:
        try:
            return to_proto(self._registry.find(request.client))
        except PinrpcError as exc:
            abort_with(context, exc, self._registry.where)


class IdentityService(identity_pb2_grpc.IdentityServicer):
    def __init__(
        self,
        registry: Registry,
        audit: Audit,
        refresh: Callable[[], None],
        overlap: dt.timedelta,
    ) -> None:
        self._registry, self._audit, self._refresh = registry, audit, refresh
        self._overlap = overlap

    def Rotate(
        self, request: identity_pb2.RotateRequest, context: grpc.ServicerContext
    ) -> identity_pb2.RotateResponse:
        who = caller()
        overlap = self._overlap
        if request.HasField("overlap_seconds"):
            overlap = min(overlap, dt.timedelta(seconds=request.overlap_seconds))
        try:
            successor = check_certificate(*_candidate_from(request.certificate_pem))
            _check_rotation_proof(successor, request.proof, who.fingerprint)
            client, previous, *older = self._registry.rotate(who.fingerprint, successor, overlap)
        except PinrpcError as exc:
            # A call line, in the calls' bucket: any client can send refused rotations in a
            # flood, which must not push real changes out of the trail. A failed proof is how
            # a squat on someone else's certificate shows.
            self._audit.event(
                "call", decision="deny", reason="rotation_refused", client=who.name,
                fingerprint=str(who.fingerprint), peer=context.peer(), method=ROTATE,
                error=str(exc)[:MAX_AUDIT_ERROR],
            )  # fmt: skip
            abort_with(context, exc, self._registry.where)
        # The caller swaps its files as soon as we answer: trust the successor first.
        self._refresh()
        # Older keys this rotation cut short: their own `retire` lines come only when they end.
        early = [
            {
                "fingerprint": str(c.fingerprint),
                "retire_at": c.retire_at and c.retire_at.isoformat(),
            }
            for c in older
        ]
        self._audit.event(
            "rotate", client=client.name, fingerprint=str(client.fingerprint),
            previous=str(who.fingerprint), overlap_seconds=overlap.total_seconds(),
            retired_early=early,
        )  # fmt: skip
        return identity_pb2.RotateResponse(client=to_proto(client), previous=to_proto(previous))
