"""Variants A and B: a bare grpcio server with the same Echo service, no pinrpc in the path.

Same generated stubs and thread-pool size as pinrpc's server (ServerConfig.max_workers), so the
only difference to variant C is pinrpc's own code: trust reload and the per-call check.
Two more variants split that difference: ``--interceptor noop`` (B plus a pass-through
interceptor: the price of grpcio's interceptor machinery) and ``--interceptor auth`` (B plus
pinrpc's AuthInterceptor over a fixed enrolled set, without metrics and audit), and
``--interceptor prewrap`` (the same check, but handlers wrapped once at start-up).
Prints "(port N)" to stderr once serving; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import grpc

from pinrpc.v1 import echo_pb2, echo_pb2_grpc
from server.app import ServerConfig
from server.auth import AuthInterceptor
from server.registry import open_registry
from server.services import EchoService
from server.trust import EnrolledSet

MAX_WORKERS = cast(int, ServerConfig.__dataclass_fields__["max_workers"].default)


class BareEcho(echo_pb2_grpc.EchoServicer):
    def WhoAmI(
        self, request: echo_pb2.WhoAmIRequest, context: grpc.ServicerContext
    ) -> echo_pb2.WhoAmIResponse:
        return echo_pb2.WhoAmIResponse(name="bare")

    def Echo(
        self, request: echo_pb2.EchoRequest, context: grpc.ServicerContext
    ) -> echo_pb2.EchoResponse:
        return echo_pb2.EchoResponse(message=request.message, caller="bare")

    def EchoStream(
        self, request_iterator: Iterator[echo_pb2.EchoRequest], context: grpc.ServicerContext
    ) -> Iterator[echo_pb2.EchoResponse]:
        for request in request_iterator:
            yield echo_pb2.EchoResponse(message=request.message, caller="bare")


class PassThrough(grpc.ServerInterceptor):  # type: ignore[type-arg]
    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        return continuation(handler_call_details)


class _Recorder:
    """Catches what the generated add_EchoServicer_to_server registers."""

    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]

    def add_generic_rpc_handlers(self, _: object) -> None:
        pass

    def add_registered_method_handlers(
        self, _service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.handlers = handlers


def add_prewrapped(server: grpc.Server, servicer: BareEcho, check: AuthInterceptor) -> None:
    """The per-call check without an interceptor: each handler is wrapped once, at start-up.

    grpcio runs interceptors per call and pinrpc's interceptor builds a new wrapped handler per
    call; this variant measures what the same check costs when neither happens.
    """
    recorder = _Recorder()
    echo_pb2_grpc.add_EchoServicer_to_server(servicer, recorder)  # type: ignore[arg-type]
    service = "pinrpc.v1.Echo"
    wrapped = {}
    for name, handler in recorder.handlers.items():
        method = f"/{service}/{name}"
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            wrapped[name] = grpc.unary_unary_rpc_method_handler(
                _checked_unary(handler.unary_unary, method, check), **kwargs
            )
        elif handler.stream_stream is not None:
            wrapped[name] = grpc.stream_stream_rpc_method_handler(
                _checked_stream(handler.stream_stream, method, check), **kwargs
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
    server.add_registered_method_handlers(service, wrapped)  # type: ignore[attr-defined]


def _checked_unary(behavior: Any, method: str, check: AuthInterceptor) -> Any:
    def run(request: Any, context: grpc.ServicerContext) -> Any:
        check.authorize(context, method)
        return behavior(request, context)

    return run


def _checked_stream(behavior: Any, method: str, check: AuthInterceptor) -> Any:
    def run(requests: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        check.authorize(context, method)
        yield from behavior(requests, context)

    return run


def enrolled_check(registry: str) -> AuthInterceptor:
    reg = open_registry(registry, create=False)
    enrolled = EnrolledSet.build(reg.clients())
    reg.close()
    return AuthInterceptor(lambda: enrolled)


def interceptors(kind: str, registry: str | None) -> list[grpc.ServerInterceptor]:  # type: ignore[type-arg]
    if kind == "noop":
        return [PassThrough()]
    if kind == "auth" and registry:
        return [enrolled_check(registry)]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--mtls", action="store_true", help="require a client cert from --roots")
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    parser.add_argument("--roots", type=Path, help="PEM bundle of accepted client certificates")
    parser.add_argument(
        "--interceptor", choices=["none", "noop", "auth", "prewrap"], default="none"
    )
    parser.add_argument("--registry", help="enrolled clients for --interceptor auth")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with ThreadPoolExecutor(MAX_WORKERS) as executor:
        server = grpc.server(executor, interceptors=interceptors(args.interceptor, args.registry))
        if args.interceptor == "prewrap":
            add_prewrapped(server, BareEcho(), enrolled_check(args.registry))
        elif args.interceptor == "auth":
            echo_pb2_grpc.add_EchoServicer_to_server(EchoService(), server)
        else:
            echo_pb2_grpc.add_EchoServicer_to_server(BareEcho(), server)
        if args.mtls:
            creds = grpc.ssl_server_credentials(
                [(args.key.read_bytes(), args.cert.read_bytes())],
                root_certificates=args.roots.read_bytes(),
                require_client_auth=True,
            )
            port = server.add_secure_port(args.listen, creds)
        else:
            port = server.add_insecure_port(args.listen)
        server.start()
        print(f"listening (port {port})", file=sys.stderr, flush=True)
        stop.wait()
        server.stop(1.0).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
