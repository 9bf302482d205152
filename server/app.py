"""run_server(config): wires registry, trust, interceptor and services into a running server."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection

from pinrpc.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    echo_pb2_grpc,
    enrollment_pb2_grpc,
    identity_pb2,
    identity_pb2_grpc,
)
from server.admin import AdminService, IdentityService
from server.audit import Audit
from server.auth import AuthInterceptor
from server.config import ServeError, ServerConfig
from server.fdlimit import HANDSHAKE_OPTIONS, SIDE_PORT_OPTIONS, raise_open_files
from server.handshakes import Handshakes
from server.health import ECHO_SERVICE, Health
from server.listener import Listener, ListenError, Options, bind_reason, check_bindable
from server.metrics import Metrics, serve_metrics
from server.observe import Observability
from server.ratelimit import burst_for
from server.reflection import ScopedReflection
from server.registry import Registry, open_registry
from server.request_watch import PerHost, RequestWatch, queued_in
from server.requests import EnrollmentService
from server.services import EchoService
from server.trust import TrustWatcher
from server.warm import WarmSet

log = logging.getLogger("pinrpc.server")
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name
IDENTITY_SERVICE = identity_pb2.DESCRIPTOR.services_by_name["Identity"].full_name


@dataclass(frozen=True, slots=True)
class RunningServer:
    config: ServerConfig
    port: int
    listener: Listener
    trust: TrustWatcher
    health: Health
    health_port: int | None
    metrics: Metrics
    metrics_port: int | None
    enrollment_port: int | None
    audit: Audit


PINRPC_SERVICES = (ECHO_SERVICE, ADMIN_SERVICE, IDENTITY_SERVICE, HEALTH_SERVICE)


@contextmanager
def start_server(config: ServerConfig) -> Iterator[RunningServer]:
    """Start serving; stop (with ``config.grace`` for in-flight calls) when the block exits."""
    taken = {*PINRPC_SERVICES, reflection.SERVICE_NAME}
    names = [service.name for service in config.services]
    for name in names:
        if name in taken or names.count(name) > 1:
            raise ServeError(f"service {name!r} is served twice (pinrpc serves {sorted(taken)})")
    reflected = (*PINRPC_SERVICES, *filter(_describable, names), reflection.SERVICE_NAME)
    raise_open_files()  # a stranger's unfinished handshakes must not use up the descriptors
    with ExitStack() as stack:
        registry = open_registry(config.registry)
        stack.callback(registry.close)
        health, metrics = Health((*taken, *names)), Metrics()  # health answers each by name
        audit = Audit(rate=config.audit_rate, burst=burst_for(config.audit_rate))
        audit.start()
        stack.callback(audit.stop)  # after the listeners have stopped: their last lines too
        warm = WarmSet(config.warm_start) if config.warm_start else None
        handshakes = Handshakes()
        observe = Observability(metrics, audit, health, handshakes, warm)
        trust = TrustWatcher(
            registry,
            config.cert,
            config.key,
            interval=config.poll_interval,
            warn_days=config.cert_warn_days,
            client_warn_days=config.client_warn_days,
            registry_outage_unhealthy=config.registry_outage_unhealthy,
            events=observe,
            handshakes=handshakes,
        )
        executor = stack.enter_context(ThreadPoolExecutor(config.max_workers))
        interceptor = AuthInterceptor(
            lambda: trust.enrolled, observe, config.max_workers, queued_in(executor)
        )
        trust.subscribe(interceptor.sweep)  # a revoked client's idle streams end at once
        interceptor.requests.start()  # and no caller holds the workers by withholding requests
        stack.callback(interceptor.requests.stop)
        watch = interceptor.requests  # the side ports' callers too, by peer host
        reflect = ScopedReflection(reflected, lambda: trust.enrolled)  # each caller's own view

        def build(options: Options) -> grpc.Server:
            # One per listener (handover builds more); all share the pool and the check.
            server = grpc.server(
                executor, interceptors=[interceptor], options=[*options, *HANDSHAKE_OPTIONS]
            )
            _add_services(server, config, registry, audit, trust, health)
            reflect.add_to(server)
            return server

        listener = Listener(
            build, trust, mode=config.tls_reload, grace=config.grace,
            max_age=config.max_connection_age, interval=config.poll_interval,
            rebuilt=observe.rebuilt, warm=warm,
        )  # fmt: skip
        try:
            port = listener.start(config.listen)
        except ListenError as exc:
            raise ServeError(str(exc)) from exc
        stack.callback(lambda: listener.stop(config.grace))
        trust.start()
        stack.callback(trust.stop)
        log.info("listening on %s (port %d)", config.listen, port)
        health_port = enrollment_port = None
        if config.health_listen:
            probe = _side_server(stack, 2, watch)
            health.add_to(probe)  # and nothing else: probes carry no client certificate
            health_port = _start_side(
                stack, probe, probe.add_insecure_port, config.health_listen,
                "--health-listen", "plaintext health probes",
            )  # fmt: skip
        if config.enrollment_listen:
            requests = _side_server(stack, 4, watch)
            enrollment_pb2_grpc.add_EnrollmentServicer_to_server(
                EnrollmentService(registry, audit, request_ttl=config.enrollment_ttl,
                                  max_pending=config.max_pending),
                requests,
            )  # fmt: skip
            server_only = trust.credentials(client_auth=False)
            enrollment_port = _start_side(
                stack, requests, lambda address: requests.add_secure_port(address, server_only),
                config.enrollment_listen, "--enrollment-listen",
                "enrollment requests, server-only TLS",
            )  # fmt: skip
        metrics_port = None
        if config.metrics_listen:
            try:
                stop_metrics, metrics_port = serve_metrics(metrics, config.metrics_listen)
            except (OSError, ValueError, OverflowError) as exc:
                raise ServeError(
                    f"cannot serve metrics on {config.metrics_listen} (--metrics-listen): "
                    f"{bind_reason(exc)}"
                ) from exc
            stack.callback(stop_metrics)
            host = config.metrics_listen.rpartition(":")[0]  # the port may have been 0
            log.info("metrics on http://%s:%d/metrics", host, metrics_port)
        yield RunningServer(
            config, port, listener, trust, health, health_port, metrics, metrics_port,
            enrollment_port, audit,
        )  # fmt: skip


def _describable(name: str) -> bool:
    # A name reflection lists but cannot describe fails a client's whole-server describe
    # (grpcurl describe), every other service's included: leave it out of the list.
    try:
        descriptor_pool.Default().FindServiceByName(name)
    except KeyError:
        log.warning(
            "service %r is not in the protobuf descriptor pool, so reflection does not list it; "
            "give the full name (my_pb2.DESCRIPTOR.services_by_name[...].full_name)",
            name,
        )
        return False
    return True


def _add_services(
    server: grpc.Server,
    config: ServerConfig,
    registry: Registry,
    audit: Audit,
    trust: TrustWatcher,
    health: Health,
) -> None:
    """The API behind client authentication, with health beside it."""
    echo_pb2_grpc.add_EchoServicer_to_server(EchoService(lambda: trust.enrolled), server)
    admin_pb2_grpc.add_AdminServicer_to_server(AdminService(registry, audit, trust.poll), server)
    identity_pb2_grpc.add_IdentityServicer_to_server(
        IdentityService(registry, audit, trust.poll, config.rotation_overlap), server
    )
    health.add_to(server)
    for service in config.services:
        service.add(server)


def _side_server(stack: ExitStack, workers: int, watch: RequestWatch) -> grpc.Server:
    # gRPC binds with SO_REUSEPORT by default; without it, a busy port (the mTLS one too)
    # fails to bind instead of silently taking a share of that port's connections.
    executor = stack.enter_context(ThreadPoolExecutor(max_workers=workers))
    per_host = PerHost(watch, queued_in(executor))
    options = [("grpc.so_reuseport", 0), *SIDE_PORT_OPTIONS]
    return grpc.server(executor, interceptors=[per_host], options=options)


def _start_side(
    stack: ExitStack, server: grpc.Server, bind: Callable[[str], int], listen: str, flag: str,
    what: str,
) -> int:  # fmt: skip
    """Bind and start a secondary listener, stopped with the rest; returns its port."""
    try:
        check_bindable(listen)  # the reason in pinrpc's line, and no gRPC line beside it
        port = bind(listen)
    except ListenError as exc:
        raise ServeError(f"cannot listen on {listen} ({flag}, {what}): {exc.reason}") from exc
    except RuntimeError:  # grpc's "Failed to bind", with the reason only in its own line
        port = 0
    if port == 0:
        raise ServeError(f"cannot listen on {listen} ({flag}, {what}): address in use or invalid")
    server.start()
    stack.callback(lambda: server.stop(None).wait())
    log.info("%s on %s (port %d)", what, listen, port)
    return port


@contextmanager
def run_server(config: ServerConfig) -> Iterator[int]:
    """The design's entry point: yields the bound port, always stops."""
    with start_server(config) as running:
        yield running.port
