"""Variants A and B: a bare grpcio server with the same Echo service, no pinrpc in the path.

Same generated stubs and thread-pool size as pinrpc's server (ServerConfig.max_workers), so the
only difference to variant C is pinrpc's own code: trust reload and the per-call check.
Three more variants split that difference in steps: ``--interceptor noop`` (B plus a
pass-through interceptor: the price of grpcio's interceptor machinery), ``--interceptor leaf``
(pinrpc's AuthInterceptor that reads the peer's leaf certificate but looks nothing up: the floor
of any per-call leaf check in grpcio's Python API) and ``--interceptor auth`` (pinrpc's
AuthInterceptor over a fixed enrolled set, without metrics and audit). ``--gc-settle`` gives B
the garbage collector settings pinrpc's server process uses (server/gc_tuning.py), so that C can
also be compared with a B on the same footing.
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
from server.auth import AuthInterceptor, Identity, leaf_pem
from server.config import ServerConfig
from server.gc_tuning import settle
from server.registry import Client, open_registry
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


class LeafOnly(AuthInterceptor):
    """AuthInterceptor, its handler wrapper and the caller's identity, with a check that reads
    the peer's leaf certificate and then admits the call without looking it up."""

    def __init__(self, identity: Identity) -> None:
        # One snapshot for good: a new one per call would make every stream message re-check.
        nobody = EnrolledSet.build([])
        super().__init__(lambda: nobody)
        self._identity = identity

    def authorize(
        self, context: grpc.ServicerContext, method: str, *, remember: bool = True
    ) -> Identity:
        if leaf_pem(context) is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate presented")
        return self._identity


def enrolled(registry: str) -> list[Client]:
    reg = open_registry(registry, create=False)
    try:
        return reg.clients()
    finally:
        reg.close()


def enrolled_check(registry: str) -> AuthInterceptor:
    snapshot = EnrolledSet.build(enrolled(registry))
    return AuthInterceptor(lambda: snapshot)


def interceptors(kind: str, registry: str | None) -> list[grpc.ServerInterceptor]:  # type: ignore[type-arg]
    if kind == "noop":
        return [PassThrough()]
    if kind == "auth" and registry:
        return [enrolled_check(registry)]
    if kind == "leaf" and registry:
        client = enrolled(registry)[0]
        return [LeafOnly(Identity(client.name, client.fingerprint, client.allowed_methods))]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--mtls", action="store_true", help="require a client cert from --roots")
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    parser.add_argument("--roots", type=Path, help="PEM bundle of accepted client certificates")
    parser.add_argument("--interceptor", choices=["none", "noop", "leaf", "auth"], default="none")
    parser.add_argument("--registry", help="enrolled clients for --interceptor leaf and auth")
    parser.add_argument(
        "--gc-settle", action="store_true", help="the collector settings pinrpc's server uses"
    )
    args = parser.parse_args(argv)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with ThreadPoolExecutor(MAX_WORKERS) as executor:
        server = grpc.server(executor, interceptors=interceptors(args.interceptor, args.registry))
        if args.interceptor in ("leaf", "auth"):
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
        if args.gc_settle:
            settle()
        print(f"listening (port {port})", file=sys.stderr, flush=True)
        stop.wait()
        server.stop(1.0).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
