"""run_server(config): wires registry, trust, interceptor and services into a running server."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from pinrpc.errors import PinrpcError
from pinrpc.v1 import echo_pb2_grpc
from server.auth import AuthInterceptor
from server.registry import open_registry
from server.services import EchoService
from server.trust import TrustWatcher

log = logging.getLogger("pinrpc.server")


class ServeError(PinrpcError):
    """The server could not start."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str
    cert: Path
    key: Path
    registry: str
    max_workers: int = 32
    poll_interval: float = 0.2
    cert_warn_days: int = 14
    grace: float = 5.0


@dataclass(frozen=True, slots=True)
class RunningServer:
    config: ServerConfig
    port: int
    server: grpc.Server
    trust: TrustWatcher


@contextmanager
def start_server(config: ServerConfig) -> Iterator[RunningServer]:
    """Start serving; stop (with ``config.grace`` for in-flight calls) when the block exits."""
    with ExitStack() as stack:
        registry = open_registry(config.registry)
        stack.callback(registry.close)
        trust = TrustWatcher(
            registry,
            config.cert,
            config.key,
            interval=config.poll_interval,
            warn_days=config.cert_warn_days,
        )
        executor = stack.enter_context(ThreadPoolExecutor(config.max_workers))
        server = grpc.server(executor, interceptors=[AuthInterceptor(lambda: trust.enrolled)])
        echo_pb2_grpc.add_EchoServicer_to_server(EchoService(), server)
        try:
            port = server.add_secure_port(config.listen, trust.credentials())
        except RuntimeError as exc:
            raise ServeError(f"cannot listen on {config.listen}: {exc}") from exc
        if port == 0:
            raise ServeError(f"cannot listen on {config.listen} (address in use or invalid)")
        server.start()
        stack.callback(lambda: server.stop(config.grace).wait())
        trust.start()
        stack.callback(trust.stop)
        log.info("listening on %s (port %d)", config.listen, port)
        yield RunningServer(config, port, server, trust)


@contextmanager
def run_server(config: ServerConfig) -> Iterator[int]:
    """The design's entry point: yields the bound port, always stops."""
    with start_server(config) as running:
        yield running.port
