"""The per-call check: peer leaf certificate -> enrolled client -> method permission.

The TLS handshake only proves the peer holds the key of *some* certificate chaining to an
enrolled one; an enrolled key could have minted a new leaf. So every call compares the
fingerprint of the leaf itself against the enrolled set. Names in the certificate and request
metadata are never consulted. The check runs inside each call (interceptors get no context),
which also makes a revocation bite on the next call of an already-open connection, and on the
next message of an already-open stream.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import fnmatch
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, cast

import grpc

try:  # grpcio's internal accessor (untyped); see leaf_pem()
    from grpc._cython.cygrpc import (  # type: ignore[import-not-found]
        auth_context as _cy_auth_context,
    )
except ImportError:  # pragma: no cover - another grpcio build: leaf_pem() falls back
    _cy_auth_context = None

from pinrpc.identity import Fingerprint
from server.registry import Client
from server.request_watch import (
    ENDED,
    UNDECODABLE,
    Queued,
    Recheck,
    Refused,
    RequestWatch,
    deny,
    end_call,
    non_blocking,
    tolerant,
    undecodable,
)
from server.trust import EnrolledSet

# Methods any enrolled client may call: identity, health and the API's own description.
ALWAYS_ALLOWED: Final = frozenset(
    {
        "/pinrpc.v1.Echo/WhoAmI",
        "/pinrpc.v1.Identity/Rotate",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)
_PEM_CACHE_LIMIT: Final = 4096
UNKNOWN_METHOD: Final = "(unknown)"
# A refused method name is the caller's to invent, up to gRPC's 16 KiB of metadata. An audit
# line quoting it whole could be 50 times the usual size (multiplying what --audit-rate lets
# onto the disk, past the 16 KiB at which collectors split lines), and a refusal quoting it
# whole went over gRPC's metadata limit: the caller got RESOURCE_EXHAUSTED, not the refusal.
MAX_METHOD: Final = 256
ADMIN_PREFIX: Final = "/pinrpc.v1.Admin/"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling, as the server established it."""

    name: str
    fingerprint: Fingerprint
    allowed_methods: tuple[str, ...]


_caller: contextvars.ContextVar[Identity] = contextvars.ContextVar("pinrpc_caller")


def caller() -> Identity:
    """The authenticated caller of the current call; only valid inside a handler."""
    try:
        return _caller.get()
    except LookupError:
        raise RuntimeError(
            "caller() used outside a call checked by AuthInterceptor (from a thread of your "
            "own, run the work in contextvars.copy_context() taken in the handler)"
        ) from None


def shown_method(method: str) -> str:
    """``method`` for a message, or its first MAX_METHOD characters and how many there were."""
    if len(method) <= MAX_METHOD:
        return method
    return f"{method[:MAX_METHOD]}... ({len(method)} characters)"


def method_allowed(client: Client, method: str) -> bool:
    if method in ALWAYS_ALLOWED:
        return True
    patterns = client.allowed_methods
    if method.startswith(ADMIN_PREFIX):
        # Administration must be granted by name: a bare '*' never includes it.
        patterns = tuple(p for p in patterns if p.startswith(ADMIN_PREFIX))
    return any(fnmatch.fnmatchcase(method, pattern) for pattern in patterns)


@dataclass(slots=True)
class Admitted:
    """A leaf certificate the check admitted in one snapshot, and the methods found allowed."""

    client: Client
    identity: Identity
    methods: set[str]


def leaf_pem(context: grpc.ServicerContext) -> bytes | None:
    """The leaf certificate (PEM) the peer presented in the TLS handshake, if any.

    The public auth_context() copies every property into a new dict with decoded keys: 2.4 us
    per call here, the largest part of the check. grpcio's own accessor underneath it takes
    0.85 us, so it is used when the context is grpcio's sync server context; anything else
    falls back to the public call, which returns the same data (tests/test_auth.py checks
    both agree and that the fast path is taken with the pinned grpcio).
    """
    try:
        call = context._rpc_event.call  # type: ignore[attr-defined]
        pems = _cy_auth_context(call).get(b"x509_pem_cert")
    except (AttributeError, TypeError):
        pems = cast(Mapping[str, list[bytes]], context.auth_context()).get("x509_pem_cert")
    return pems[0] if pems else None


def _pem_to_fingerprint(pem: bytes) -> Fingerprint:
    # Hand-rolled PEM -> DER: the stdlib is several times faster than parsing the certificate.
    body = b"".join(line for line in pem.strip().splitlines() if not line.startswith(b"-----"))
    return Fingerprint.of_der(base64.b64decode(body))


class Observer(Protocol):
    """What the interceptor reports; metrics and the audit log implement it (server/observe.py)."""

    def denied(
        self,
        context: grpc.ServicerContext,
        method: str,
        fingerprint: Fingerprint | None,
        client: Client | None,
        reason: str,
        served: bool,  # False: no handler serves ``method``, a name the caller may have invented
    ) -> None: ...

    def admitted(self, context: grpc.ServicerContext, method: str, client: Client) -> None: ...

    def finished(self, client: str, method: str, code: grpc.StatusCode) -> None: ...


class NullObserver:
    def denied(self, *_: object) -> None:
        pass

    def admitted(self, *_: object) -> None:
        pass

    def finished(self, *_: object) -> None:
        pass


class StreamCap:
    """The streaming calls each client certificate holds open, up to a limit.

    A blocking stream holds one of the server's worker threads for as long as it is open:
    without a cap, one client could hold them all and stall everyone else's calls. The open
    streams are kept, so that a change can end those whose caller it no longer admits.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[bytes, set[_Stream]] = {}
        self._lock = threading.Lock()

    def acquire(self, stream: _Stream) -> bool:
        key = stream.identity.fingerprint.digest
        with self._lock:
            held = self._open.get(key, set())
            if len(held) >= self.limit:
                return False
            held.add(stream)
            self._open[key] = held
            return True

    def release(self, stream: _Stream) -> None:
        key = stream.identity.fingerprint.digest
        with self._lock:
            held = self._open[key]
            held.discard(stream)
            if not held:
                del self._open[key]

    def streams(self) -> list[_Stream]:
        with self._lock:
            return [stream for held in self._open.values() for stream in held]


def streams_per_client(max_workers: int) -> int:
    """A quarter of the worker threads: one client can never hold the whole pool."""
    return max(1, max_workers // 4)


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(
        self,
        enrolled: Callable[[], EnrolledSet],
        observer: Observer | None = None,
        max_workers: int = 32,  # the server's thread pool: ServerConfig.max_workers
        queued: Queued = lambda: True,  # whether calls wait for one of its threads
    ) -> None:
        self._enrolled = enrolled
        self._observer: Observer = observer or NullObserver()
        self._streams = StreamCap(streams_per_client(max_workers))
        # Calls waiting for their request; its sweep runs from start_server (server/app.py).
        self.requests = RequestWatch()
        self._queued = queued
        # For the uncached path (a new snapshot, refused leaves): base64 + SHA-256 once per PEM.
        self._fingerprints: dict[bytes, Fingerprint] = {}
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def _fingerprint(self, pem: bytes) -> Fingerprint:
        fp = self._fingerprints.get(pem)
        if fp is None:
            fp = _pem_to_fingerprint(pem)
            if len(self._fingerprints) >= _PEM_CACHE_LIMIT:
                self._fingerprints.clear()
            self._fingerprints[pem] = fp
        return fp

    def authorize(
        self, context: grpc.ServicerContext, method: str, *, remember: bool = True
    ) -> Identity:
        """Return the caller's identity or abort the call with the reason.

        ``remember``: cache an allowed (certificate, method) pair in the current snapshot, and
        let metrics name the method; off for method names that no handler serves, which callers
        may invent without bound.
        """
        pem = leaf_pem(context)
        if pem is None:
            self._observer.denied(context, method, None, None, "no_certificate", remember)
            deny(context, grpc.StatusCode.UNAUTHENTICATED, "no client certificate presented")
        enrolled = self._enrolled()
        known = enrolled.admitted.get(pem)
        if known is None or method not in known.methods:
            known = self._check(context, enrolled, pem, method, remember)
        self._observer.admitted(context, method, known.client)
        return known.identity

    def _check(
        self,
        context: grpc.ServicerContext,
        enrolled: EnrolledSet,
        pem: bytes,
        method: str,
        remember: bool,
    ) -> Admitted:
        """The uncached path: leaf fingerprint -> enrolled client -> method permission."""
        fp = self._fingerprint(pem)
        client = enrolled.lookup(fp)
        if client is None:
            self._observer.denied(context, method, fp, None, "not_enrolled", remember)
            deny(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"client certificate {fp} is not enrolled or was revoked",
            )
        if not method_allowed(client, method):
            self._observer.denied(context, method, fp, client, "method_not_allowed", remember)
            deny(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"client {client.name!r} ({fp}) may not call {shown_method(method)}",
            )
        known = enrolled.admitted.get(pem)
        if known is None:
            known = Admitted(client, Identity(client.name, fp, client.allowed_methods), set())
        if remember:
            # Only enrolled certificates and served methods get here: the memo stays bounded.
            known.methods.add(method)
            enrolled.admitted[pem] = known
        return known

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = continuation(handler_call_details)
        if handler is None:
            # Authenticate before admitting that a method does not exist (never cached: the
            # names are the caller's).
            return grpc.stream_unary_rpc_method_handler(self._unimplemented(method))
        # The services are fixed once the server starts: wrap each method's handler once.
        wrapped = self._wrapped[method] = _wrap(
            handler,
            method,
            self._enrolled,
            self.authorize,
            self._observer.finished,
            self._streams,
            self.requests,
            self._read,
        )
        return wrapped

    def sweep(self) -> None:
        """End at once the open streams whose caller the current snapshot no longer admits.

        Called by the trust watcher after each change: an idle stream re-checks only at its
        next message, and until then it held its worker thread, even after a revocation.
        """
        enrolled = self._enrolled()
        for stream in self._streams.streams():
            if stream.snapshot is not enrolled:
                stream.revisit(enrolled)
        self.requests.end_callers(
            lambda fp: isinstance(fp, Fingerprint) and enrolled.lookup(fp) is None,
            "client certificate is not enrolled or was revoked",
        )

    def _read(
        self,
        requests: Iterator[Any],
        context: grpc.ServicerContext,
        who: Identity,
        seen: int,
        recheck: Recheck,
    ) -> Any:
        """The call's one request, read after the check (server/request_watch.py)."""
        return self.requests.first(
            requests, context, who.fingerprint, self._streams.limit, self._queued, seen, recheck
        )

    def _unimplemented(self, method: str) -> Callable[[Any, grpc.ServicerContext], Any]:
        # Registered as request-streaming (intercept_service): answered without reading.
        def behavior(_requests: Any, context: grpc.ServicerContext) -> Any:
            identity = self.authorize(context, method, remember=False)
            # Unknown names are caller-chosen: keep them out of metric labels.
            self._observer.finished(identity.name, UNKNOWN_METHOD, grpc.StatusCode.UNIMPLEMENTED)
            context.abort(grpc.StatusCode.UNIMPLEMENTED, f"method {shown_method(method)} not found")

        return behavior


# A client ends a call at its own deadline with a cancel (RST_STREAM), which can reach us before
# our copy of the deadline passes: ours starts when the headers arrive, a little later. 0.06-8.4
# ms early were measured under test load; a cancel this close to the deadline counts as it.
DEADLINE_SLACK = 0.1  # seconds


def _past_deadline(context: grpc.ServicerContext) -> bool:
    return context.time_remaining() <= DEADLINE_SLACK


def _final_code(context: grpc.ServicerContext, completed: bool) -> grpc.StatusCode:
    # Set by abort() or set_code(); None when the handler just returned. (Missing in grpc-stubs.)
    code: grpc.StatusCode | None = context.code()  # type: ignore[attr-defined]
    if code is None:
        if completed:
            return grpc.StatusCode.OK
        if context.is_active():
            return grpc.StatusCode.UNKNOWN  # the handler raised
        # The call ended under the handler: the client cancelled it or its deadline passed.
        if _past_deadline(context):
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return code


def _ended_as(context: grpc.ServicerContext) -> grpc.StatusCode:
    """How a call whose handler returned normally ended for the client: OK, unless its
    deadline passed or gRPC cancelled it (grpcio's call state; the public API cannot tell)."""
    if _past_deadline(context):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if getattr(getattr(context, "_state", None), "client", None) == "cancelled":
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.OK


def _count_at_end(
    context: grpc.ServicerContext,
    name: str,
    method: str,
    finished: Callable[[str, str, grpc.StatusCode], None],
) -> None:
    """Count a call that found no request (UNIMPLEMENTED) once it has ended: a client's cancel
    (RST_STREAM) ends the requests too, before gRPC reports the cancel, and then the client got
    CANCELLED or DEADLINE_EXCEEDED, not our answer."""

    def count() -> None:
        ended = _ended_as(context)
        ok = ended is grpc.StatusCode.OK
        finished(name, method, grpc.StatusCode.UNIMPLEMENTED if ok else ended)

    if not context.add_callback(count):
        count()  # it has ended already


class _Stream:
    """One streaming call's admission, kept current for as long as the call is open.

    A stream outlives the snapshot it was admitted under, so each message read or sent is
    checked again, but only when ``enrolled()`` returns a new snapshot: an identity comparison
    per message, the full check once per change.
    """

    __slots__ = (
        "_cap", "_check", "_context", "_ended", "_enrolled", "_lock", "_method", "identity",
        "refused", "snapshot",
    )  # fmt: skip

    def __init__(
        self,
        context: grpc.ServicerContext,
        method: str,
        enrolled: Callable[[], EnrolledSet],
        check: Callable[[grpc.ServicerContext, str], Identity],
    ) -> None:
        self._context, self._method, self._enrolled, self._check = context, method, enrolled, check
        # Taken before the check: if the check saw a newer one, that costs one re-check.
        self.snapshot = enrolled()
        self.identity = check(context, method)
        self._cap: StreamCap | None = None
        self._ended = False  # end() ran: a later hold() must not keep a place under the cap
        # The stream's own thread and StreamCap's sweep re-check; hold() and end(), which for a
        # non-blocking stream run on different threads (end() on grpcio's, at the call's end).
        self._lock = threading.Lock()
        self.refused = False  # by a re-check, which reported (and counted) the refusal itself

    def hold(self, cap: StreamCap) -> None:
        """Count this stream against its client's cap, or refuse it."""
        if not cap.acquire(self):
            deny(
                self._context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"client {self.identity.name!r} already has {cap.limit} streams open, the most "
                "one client may hold at once; close one first",
            )
        with self._lock:
            ended = self._ended
            if not ended:
                self._cap = cap
        if ended:  # a cancel or reset after its request came: end() found no place to give back
            cap.release(self)
            deny(self._context, grpc.StatusCode.CANCELLED, ENDED)  # and no behaviour runs
        if self._enrolled() is not self.snapshot:
            self.recheck()  # a change between the check and now, which no sweep saw

    def end(self, finished: Callable[[str, str, grpc.StatusCode], None], completed: bool) -> None:
        """Give back the stream's place under the cap and count the call, once."""
        with self._lock:
            self._ended = True
            cap, self._cap = self._cap, None
        if cap is not None:
            cap.release(self)
        if self.refused:
            return
        name, method, context = self.identity.name, self._method, self._context
        code = _final_code(context, completed)
        if code is grpc.StatusCode.OK:
            code = _ended_as(context)  # a deadline or a cancel may have ended the requests
        if code is not grpc.StatusCode.OK:
            finished(name, method, code)
        # gRPC may report a cancel only after the handler saw the requests end and returned:
        # only the call's end tells.
        elif not context.add_callback(lambda: finished(name, method, _ended_as(context))):
            finished(name, method, _ended_as(context))  # it has ended already

    def recheck(self) -> None:
        """Abort the call (as the first check would) unless its caller is still admitted."""
        with self._lock:
            if not self.refused:
                current = self._enrolled()
                try:
                    self._check(self._context, self._method)
                except Exception:
                    self.refused = True
                    raise
                self.snapshot = current
                return
        # The sweep refused it already, and reported it: end the handler without a second line.
        deny(self._context, grpc.StatusCode.PERMISSION_DENIED, "no longer admitted")

    def recheck_call(self, _context: grpc.ServicerContext) -> None:
        """recheck(), as the request watch calls it (request_watch.Recheck)."""
        self.recheck()

    def revisit(self, enrolled: EnrolledSet) -> None:
        """From the trust watcher: end the call now if ``enrolled`` no longer admits it."""
        client = enrolled.lookup(self.identity.fingerprint)
        if client is not None and method_allowed(client, self._method):
            return  # still admitted: its own thread re-checks at the next message
        if self.refused or not self._context.is_active():
            return
        try:
            self.recheck()
        except Exception:  # abort() recorded the status; send it, which frees the thread
            code: grpc.StatusCode = self._context.code()  # type: ignore[attr-defined]
            details: bytes = self._context.details()  # type: ignore[attr-defined]
            end_call(self._context, code, details.decode())

    def checked(self, messages: Iterator[Any]) -> Iterator[Any]:
        enrolled = self._enrolled
        for message in messages:
            if enrolled() is not self.snapshot:
                self.recheck()
            if message is UNDECODABLE:
                undecodable(self._context)
            yield message

    def guarded(self, send: Callable[[Any], None]) -> Callable[[Any], None]:
        """``send`` for a non-blocking handler, which may call it from any thread (health's from
        the trust watcher's): a refusal ends the call with its status instead of raising."""

        def checked_send(response: Any) -> None:
            if response is not None and self._enrolled() is not self.snapshot:
                if not self._context.is_active():
                    return  # ended already, maybe by an earlier refusal
                try:
                    self.recheck()
                except Exception:  # abort() records the status, then raises a bare Exception
                    response = None  # None ends the call with the recorded status
            send(response)

        return checked_send


def _wrap(
    handler: grpc.RpcMethodHandler[Any, Any],
    method: str,
    enrolled: Callable[[], EnrolledSet],
    check: Callable[[grpc.ServicerContext, str], Identity],
    finished: Callable[[str, str, grpc.StatusCode], None],
    streams: StreamCap,
    watch: RequestWatch,
    read: Callable[[Iterator[Any], grpc.ServicerContext, Identity, int, Recheck], Any],
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler, with the check (and the caller's identity) around its behaviour.

    Methods that take one request are registered as request-streaming ones, so that the check
    runs before that request is read (``read``, server/request_watch.py). The watch's
    generation is read before the check: a revocation that comes between the check and the
    read is then seen, and the call checked again (``recheck``)."""

    def recheck(context: grpc.ServicerContext) -> None:
        try:
            check(context, method)
        except Exception as exc:  # abort() recorded the status, and the check reported it
            raise Refused from exc

    def unary(behavior: Callable[[Any, grpc.ServicerContext], Any]) -> Any:
        def run(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            seen = watch.generation
            identity = check(context, method)
            token = _caller.set(identity)
            completed = refused = False
            try:
                request = read(requests, context, identity, seen, recheck)
                result = behavior(request, context)
                completed = True
                return result
            except Refused:
                refused = True
                raise
            finally:
                _caller.reset(token)
                if not refused:
                    code = _final_code(context, completed)
                    if not completed and code is grpc.StatusCode.UNIMPLEMENTED:
                        _count_at_end(context, identity.name, method, finished)
                    else:
                        finished(identity.name, method, code)

        return run

    def request_stream(behavior: Callable[[Iterator[Any], grpc.ServicerContext], Any]) -> Any:
        def run(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            stream = _Stream(context, method, enrolled, check)
            token = _caller.set(stream.identity)
            completed = False
            try:
                stream.hold(streams)
                result = behavior(stream.checked(requests), context)
                completed = True
                return result
            finally:
                _caller.reset(token)
                stream.end(finished, completed)

        return run

    def response_stream(
        behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]], requests_too: bool
    ) -> Any:
        def run(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            seen = watch.generation
            stream = _Stream(context, method, enrolled, check)
            token = _caller.set(stream.identity)
            completed = False
            try:
                stream.hold(streams)
                if requests_too:
                    request: Any = stream.checked(requests)
                else:
                    request = read(requests, context, stream.identity, seen, stream.recheck_call)
                yield from stream.checked(behavior(request, context))
                completed = True
            finally:
                # A generator may be finalised from another thread (and Context).
                with contextlib.suppress(ValueError):
                    _caller.reset(token)
                stream.end(finished, completed)

        return run

    def answer_later(behavior: Callable[..., None]) -> Any:
        """grpcio's experimental non-blocking form (health's Watch): the behaviour returns at
        once and answers later through ``send``, so the stream holds no worker thread."""

        def run(
            requests: Iterator[Any], context: grpc.ServicerContext, send: Callable[[Any], None]
        ) -> None:
            seen = watch.generation
            stream = _Stream(context, method, enrolled, check)

            def done() -> None:
                stream.end(finished, True)

            if not context.add_callback(done):
                return done()  # the call ended already
            request = read(requests, context, stream.identity, seen, stream.recheck_call)
            stream.hold(streams)
            token = _caller.set(stream.identity)
            try:
                behavior(request, context, stream.guarded(send))
            finally:
                _caller.reset(token)

        return non_blocking(run, behavior)

    kwargs = {
        "request_deserializer": tolerant(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)
    if handler.unary_stream is not None:
        if getattr(handler.unary_stream, "experimental_non_blocking", False):
            behavior = answer_later(cast(Callable[..., None], handler.unary_stream))
        else:
            behavior = response_stream(handler.unary_stream, requests_too=False)
        return grpc.stream_stream_rpc_method_handler(behavior, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(request_stream(handler.stream_unary), **kwargs)
    if handler.stream_stream is not None:
        behavior = response_stream(handler.stream_stream, requests_too=True)
        return grpc.stream_stream_rpc_method_handler(behavior, **kwargs)
    raise ValueError("RpcMethodHandler without a behaviour")
