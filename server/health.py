"""gRPC health checking: on the mTLS port for clients, and optionally on a plaintext probe port.

The probe port (opened in server/app.py) carries the health service and nothing else, so
Docker or Kubernetes can probe without a client certificate while every other method stays
behind client authentication.

Both ports answer the services the server serves (pinrpc's and yours, each as the whole
server is) and pinrpc.registry, and NOT_FOUND for any other name, Watch included:
grpc_health's servicer keeps one entry per name ever watched, for good, so invented names
would grow the server's memory without bound (the probe port needs no certificate).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pinrpc.v1 import echo_pb2

ECHO_SERVICE = echo_pb2.DESCRIPTOR.services_by_name["Echo"].full_name
# "" is the whole server, by the health protocol's convention.
SERVICES = ("", ECHO_SERVICE)
# Always tells whether the registry is readable, whatever the whole server reports.
REGISTRY_SERVICE = "pinrpc.registry"


def _status(ok: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return (
        health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
    )


class Health:
    def __init__(self, served: Iterable[str] = ()) -> None:
        """``served``: the full names of the services the server serves, yours included (a
        probe names the service it depends on); fixed here, so the servicer's table is too."""
        self.servicer = health.HealthServicer(experimental_non_blocking=True)
        self.state: tuple[bool, bool] | None = None
        self.services = tuple(dict.fromkeys((*SERVICES, *served)))
        self.known = frozenset((*self.services, REGISTRY_SERVICE))

    def set(self, serving: bool, registry_ok: bool) -> None:
        if (serving, registry_ok) == self.state:
            return
        self.state = (serving, registry_ok)
        for service in self.services:
            self.servicer.set(service, _status(serving))
        self.servicer.set(REGISTRY_SERVICE, _status(registry_ok))

    def add_to(self, server: grpc.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(KnownOnly(self.servicer, self.known), server)


class KnownOnly:
    """The upstream servicer, asked only about the names in ``known`` (List names no service)."""

    def __init__(self, upstream: health.HealthServicer, known: frozenset[str]) -> None:
        self._upstream = upstream
        self._known = known

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self._refuse_unknown(request, context)
        reply: health_pb2.HealthCheckResponse = self._upstream.Check(request, context)
        return reply

    def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: Callable[[health_pb2.HealthCheckResponse | None], None]
        | None = None,
    ) -> Iterator[health_pb2.HealthCheckResponse] | None:
        self._refuse_unknown(request, context)
        replies: Iterator[health_pb2.HealthCheckResponse] | None = self._upstream.Watch(
            request,
            cast(grpc.ServicerContext, _CloseOffServeThread(context)),
            send_response_callback,
        )
        return replies

    # grpcio's non-blocking form, as upstream's Watch has it: grpcio passes a callback and no
    # worker thread waits on the stream (without it, each Watch would hold one for good).
    Watch.__dict__.update(experimental_non_blocking=True, experimental_thread_pool=None)

    def _refuse_unknown(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> None:
        if request.service not in self._known:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")

    def List(
        self, request: health_pb2.HealthListRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthListResponse:
        # Upstream's servicer has no List: its stub raised NotImplementedError, which gRPC logged
        # as a 14-line traceback per call, so any caller of the probe port could flood the log.
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")


class _CloseOffServeThread:
    """The call's context, whose end-of-call callbacks run on a thread of their own.

    Upstream's Watch and set() send under the servicer's lock, and a send waits for gRPC's
    serving thread to report it done; upstream's end-of-Watch callback takes that lock, and
    gRPC runs such callbacks on that same serving thread: a Watch ending while another was
    sent to blocked both for good, and the server with them (grpc/grpc#43403)."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context

    def add_callback(self, callback: Callable[[], None]) -> bool:
        def start() -> None:
            threading.Thread(target=callback, name="pinrpc-health-end", daemon=True).start()

        added: bool = self._context.add_callback(start)
        return added

    def __getattr__(self, name: str) -> object:
        return getattr(self._context, name)
