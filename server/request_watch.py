"""A call's one request, read under watch: no caller may hold the worker threads by never
sending it.

grpcio's sync server reads the request of a unary call (and of a server-streaming one) on a
worker thread *before* any handler runs, and waits for it without a time limit. Calls whose
request never came held every worker, and a caller did not even need a permission for it:
the read came before pinrpc's check (docs/SECURITY.md). pinrpc therefore registers those
methods as request-streaming ones (the bytes on the wire are the same), so that the check
runs first, and reads the one request itself, here:

- every call waiting for its request is registered with its caller and the time it began;
- a caller with a request overdue (``GRACE``) is *held back* for ``HOLD_BACK`` seconds:
  meanwhile, whenever other calls are queued for a thread, it may have at most ``limit``
  calls waiting; further ones are refused at once with RESOURCE_EXHAUSTED, and the sweep
  ends its overdue calls beyond the limit the same way.

A well-behaved client sends a request with its call's headers, so it never waits ``GRACE``.
Large requests over a slow link can (seen from here they are requests sent a byte at a time),
and they are left alone as long as no call waits for a thread. An attacker gets one ``GRACE``
of the pool, then at most ``limit`` threads while anyone else needs one, until it has
behaved for ``HOLD_BACK`` seconds.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, NoReturn

import grpc

log = logging.getLogger("pinrpc.server")

GRACE = 1.0  # seconds a request may take to arrive before its caller is held back
HOLD_BACK = 10.0  # seconds a held-back caller stays limited after its last overdue request
SWEEP_EVERY = 0.25
OVERDUE = "too many calls of this client are waiting for their request; send it with the call"
NO_REQUEST = "requires exactly one request message"  # grpcio's words for a unary call's
# What a request that could not be decoded becomes (see tolerant): the check runs first.
UNDECODABLE: Final = object()


class RequestWatch:
    """Calls waiting for their one request, by caller; ``sweep()`` ends the overdue ones."""

    def __init__(self) -> None:
        # context -> (caller, since, limit, queued, recheck); one dict operation each way, no
        # lock: atomic under the GIL, and the sweep reads a copy.
        self._waiting: dict[grpc.ServicerContext, Waiting] = {}
        self._held_back: dict[Hashable, float] = {}  # caller -> until (time.monotonic)
        # A sweep ends a call by taking its record out of _waiting, under this lock, and leaves
        # the status here, with whether the call's check refused it (and reported that). The
        # call's own thread, finding its record gone, must not run: it takes the lock, which
        # waits for the sweep to end the call (after the report: once ended, the call's peer
        # reads as '').
        self._ending: dict[grpc.ServicerContext, tuple[grpc.StatusCode, str, bool]] = {}
        self._claiming = threading.Lock()
        # Bumped by end_callers() before it looks: a call checked before that, registered after
        # it had looked, compares this with the value it read before its check (``seen``).
        self.generation = 0
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def first(
        self,
        requests: Iterator[Any],
        context: grpc.ServicerContext,
        caller: Hashable,
        limit: int,
        queued: Queued,
        seen: int,
        recheck: Recheck = lambda _: None,
    ) -> Any:
        """The call's request; the call is aborted if none comes, if it cannot be decoded, or if
        ``caller`` is held back and already waits for ``limit`` of them while calls are
        ``queued`` for a thread of its pool. ``recheck`` checks the call again (it raises to
        refuse): here if end_callers() ran since ``generation`` was ``seen`` (before the check),
        and by end_callers() when it ends the call."""
        if self._held_back:  # nearly always empty: then no lookup, no hashing of ``caller``
            until = self._held_back.get(caller)
            if (
                until is not None
                and time.monotonic() < until
                and queued()
                and self.waiting(caller) >= limit
            ):
                deny(context, grpc.StatusCode.RESOURCE_EXHAUSTED, OVERDUE)
        record = self._waiting[context] = (caller, time.monotonic(), limit, queued, recheck)
        while self.generation != seen:  # a revocation's sweep may have missed this call
            seen = self.generation
            if self._waiting.pop(context, None) is None:
                self._ended(context)  # or not
            recheck(context)  # out of the table, so that no sweep reports it too
            self._waiting[context] = record
        try:
            request = next(requests, None)
        finally:
            if self._waiting.pop(context, None) is None:  # a sweep ended the call: not ours
                self._ended(context)
        if request is None:
            code: grpc.StatusCode | None = context.code()  # type: ignore[attr-defined]
            if code is not None:  # a stream's re-check ended it, and sent the status already
                details: bytes = context.details()  # type: ignore[attr-defined]
                deny(context, code, details.decode())
            deny(context, grpc.StatusCode.UNIMPLEMENTED, NO_REQUEST)
        if request is UNDECODABLE:
            undecodable(context)
        return request

    def _ended(self, context: grpc.ServicerContext) -> NoReturn:
        """Abort the handler of a call a sweep has ended, once the sweep is done with it."""
        with self._claiming:
            code, details, refused = self._ending.pop(context)
        try:
            deny(context, code, details)
        except Exception as exc:
            if refused:
                raise Refused from exc
            raise

    def waiting(self, caller: Hashable) -> int:
        return sum(1 for who, *_ in self._waiting.copy().values() if who == caller)

    def sweep(self) -> int:
        """Hold back the callers with an overdue request and, while calls are queued for a
        thread, end their overdue calls beyond the limit; return how many calls were ended."""
        now = time.monotonic()
        overdue: dict[Hashable, list[tuple[float, grpc.ServicerContext, int, Queued]]] = {}
        for context, (caller, since, limit, queued, _) in self._waiting.copy().items():
            if now - since >= GRACE:
                overdue.setdefault(caller, []).append((since, context, limit, queued))
        ended = 0
        for caller, calls in overdue.items():
            if caller not in self._held_back:
                log.warning("holding back %s: its calls' requests are overdue", caller)
            self._held_back[caller] = now + HOLD_BACK
            _, _, limit, queued = calls[0]  # one pool per caller: one limit, one queue
            if not queued():
                continue  # nobody waits for a thread: slow, but harmless
            calls.sort(key=lambda call: call[0])  # the oldest keep their threads
            for _, context, _, _ in calls[limit:]:
                ended += self._end(context, grpc.StatusCode.RESOURCE_EXHAUSTED, OVERDUE)
        for caller, until in list(self._held_back.items()):
            if until <= now:
                del self._held_back[caller]
        return ended

    def end_callers(self, gone: Callable[[Hashable], bool], details: str) -> None:
        """End the waiting calls of the callers ``gone`` names (PERMISSION_DENIED), each
        checked again first, so that the refusal is reported like any other."""
        self.generation += 1
        for context, (caller, *_, recheck) in self._waiting.copy().items():
            if gone(caller):
                self._end(context, grpc.StatusCode.PERMISSION_DENIED, details, recheck)

    def _end(
        self,
        context: grpc.ServicerContext,
        code: grpc.StatusCode,
        details: str,
        recheck: Recheck | None = None,
    ) -> bool:
        """End a waiting call, unless its request came first (then it runs)."""
        with self._claiming:
            if self._waiting.pop(context, None) is None:
                return False  # its request came, or another sweep ended it
            refused = False
            if recheck is not None:
                try:
                    recheck(context)
                except Exception:  # abort() recorded the status, and the check reported it
                    refused = True
            self._ending[context] = (code, details, refused)
            end_call(context, code, details)
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pinrpc-requests", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stopped.wait(SWEEP_EVERY):
            try:
                self.sweep()
            except Exception:  # the next sweep tries again; a dead thread would watch nothing
                log.exception("sweeping the calls that wait for their request")


Queued = Callable[[], bool]  # whether calls wait for a thread of the pool a call runs in
Recheck = Callable[[grpc.ServicerContext], object]  # the check again; raises to refuse
Waiting = tuple[Hashable, float, int, Queued, Recheck]


class Refused(Exception):
    """A re-check refused the call and reported it: its end counts nothing more."""


def queued_in(executor: ThreadPoolExecutor) -> Queued:
    """Whether calls wait for one of ``executor``'s threads: its work queue is the only place
    that knows (a private attribute of ThreadPoolExecutor since Python 3.2)."""
    work = executor._work_queue
    return lambda: not work.empty()


def end_call(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End a call from outside its handler, with ``code``: recorded on the context (for the
    metrics) and sent through grpcio's call object; the public cancel() sends CANCELLED."""
    context.set_code(code)
    context.set_details(details)
    try:
        context._rpc_event.call.cancel(code.value[0], details)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        context.cancel()  # type: ignore[no-untyped-call]  # untyped in grpc-stubs


def deny(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    """End the call with ``code`` from inside its handler (context.abort raises)."""
    context.abort(code, details)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer`` returning UNDECODABLE instead of raising.

    grpcio deserializes before the behaviour runs: a raising deserializer ended the call with
    INTERNAL before any check (no audit line, no metric) and logged a traceback per message.
    """
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # any failure, as grpcio itself catches
            return UNDECODABLE

    return deserialize


def undecodable(context: grpc.ServicerContext) -> NoReturn:
    deny(context, grpc.StatusCode.INVALID_ARGUMENT, "request could not be decoded")


Read = Callable[[Iterator[Any], grpc.ServicerContext], Any]


def reading_first(
    handler: grpc.RpcMethodHandler[Any, Any],
    read: Read,
    hold: Callable[[grpc.ServicerContext], None],
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` registered as request-streaming, its one request read (and decoded, see
    tolerant) by ``read``; other handlers as they are. A stream that answers without a thread
    (health's Watch) is ``hold``-ed once its request has come, for as long as it stays open."""
    kwargs: dict[str, Any] = {
        "request_deserializer": tolerant(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        unary = handler.unary_unary
        return grpc.stream_unary_rpc_method_handler(
            lambda requests, context: unary(read(requests, context), context), **kwargs
        )
    if handler.unary_stream is not None:
        stream = handler.unary_stream
        if not getattr(stream, "experimental_non_blocking", False):
            return grpc.stream_stream_rpc_method_handler(
                lambda requests, context: stream(read(requests, context), context), **kwargs
            )

        def answer_later(
            requests: Iterator[Any], context: grpc.ServicerContext, send: Callable[[Any], None]
        ) -> None:
            request = read(requests, context)
            hold(context)
            stream(request, context, send)  # type: ignore[call-arg]

        return grpc.stream_stream_rpc_method_handler(non_blocking(answer_later, stream), **kwargs)
    return handler


def non_blocking(behavior: Callable[..., None], like: object) -> Any:
    """``behavior`` marked as grpcio's experimental non-blocking form, as ``like`` is (there is
    no other way to tell grpcio than these attributes)."""
    behavior.__dict__.update(
        experimental_non_blocking=True,
        experimental_thread_pool=getattr(like, "experimental_thread_pool", None),
    )
    return behavior


def peer_host(context: grpc.ServicerContext) -> str:
    """What a listener without client certificates knows of its caller: the peer's address
    without its port, and for IPv6 its /64, which one host commonly holds whole (a new address
    per call would otherwise be a new caller each time)."""
    return host_of(context.peer())


def host_of(peer: str) -> str:
    """peer_host() of a peer address as context.peer() gives it (and pending requests keep)."""
    host = peer.rpartition(":")[0]  # "ipv4:1.2.3.4", "ipv6:%5B2001:db8::1%5D"
    if not host.startswith("ipv6:"):
        return host
    address = urllib.parse.unquote(host[5:]).strip("[]").partition("%")[0]  # no zone
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        return host
    if ip.ipv4_mapped is not None:  # gRPC names these ipv4: already; in case it does not
        return f"ipv4:{ip.ipv4_mapped}"
    return f"ipv6:{ipaddress.IPv6Network((ip, 64), strict=False)}"


# Streams that hold no thread (health's Watch) cost the server about 20 KB each for as long as
# their caller keeps them open, and the side ports ask for no certificate: at most this many
# per peer host, and in all, per listener.
OPEN_PER_HOST = 8
OPEN_IN_ALL = 1024
TOO_MANY_OPEN = "too many streams of this host are open; close one first"
ENDED = "the call ended before it was answered"  # nobody reads it: the client has gone


class PerHost(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """For listeners without client certificates (health, enrollment requests): each peer
    host is a caller of ``watch``, with ``limit`` calls while held back, and may keep
    OPEN_PER_HOST threadless streams open."""

    def __init__(self, watch: RequestWatch, queued: Queued, limit: int = 1) -> None:
        self._watch, self._queued, self._limit = watch, queued, limit
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        self._open: dict[str, int] = {}  # host -> its open streams; no entry when none
        self._open_in_all = 0
        self._lock = threading.Lock()

    def _hold(self, context: grpc.ServicerContext) -> None:
        host = peer_host(context)
        with self._lock:
            held = self._open.get(host, 0)
            if held >= OPEN_PER_HOST or self._open_in_all >= OPEN_IN_ALL:
                deny(context, grpc.StatusCode.RESOURCE_EXHAUSTED, TOO_MANY_OPEN)
            self._open[host] = held + 1
            self._open_in_all += 1
        if not context.add_callback(lambda: self._release(host)):
            self._release(host)  # it has ended already: no behaviour may subscribe it
            deny(context, grpc.StatusCode.CANCELLED, ENDED)

    def _release(self, host: str) -> None:
        with self._lock:
            self._open_in_all -= 1
            if self._open[host] == 1:
                del self._open[host]
            else:
                self._open[host] -= 1

    def _read(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        watch = self._watch  # no check to repeat: seen is now
        return watch.first(
            requests, context, peer_host(context), self._limit, self._queued, watch.generation
        )

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = continuation(handler_call_details)
            if handler is None:
                return None
            # The services are fixed once the server starts: wrap each method once.
            wrapped = self._wrapped[method] = reading_first(handler, self._read, self._hold)
        return wrapped
