"""Prototype: build new TLS credentials off the handshake path and hand the port over.

pinrpc's TrustWatcher hands a new configuration to grpcio's dynamic credentials; grpcio then
builds it (loading every enrolled root, quadratic in their number) inside the next handshake,
and other handshakes wait. This prototype never rebuilds inside a handshake:

* revocations only swap the enrolled set the per-call check reads (the interceptor denies the
  next call at once; the revoked root stays in the TLS store until the next rebuild, which is
  harmless because every call is checked);
* enrollments (new roots) build a *second* grpc.server on the same port (gRPC sets
  SO_REUSEPORT), in the polling thread: add_secure_port releases the GIL while it loads the
  roots, and the old listener keeps accepting meanwhile; then the old server stops with a
  grace period (GOAWAY: open channels move to the new listener on their own);
* changes that arrive during a build are batched into the next build;
* roots are passed sorted by subject, the order BoringSSL's X509_STORE keeps them in, which
  makes its insert-and-resort loading several times cheaper (still quadratic).

Run: python -m bench.prototype_trust --listen 127.0.0.1:0 --cert C --key K --registry DB
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import grpc

from pinrpc.v1 import echo_pb2_grpc
from server.app import ServerConfig
from server.auth import AuthInterceptor
from server.registry import SqliteRegistry
from server.services import EchoService
from server.trust import EnrolledSet, load_server_cert, nobody_root, subject_order

log = logging.getLogger("pinrpc.prototype")
MAX_WORKERS = cast(int, ServerConfig.__dataclass_fields__["max_workers"].default)


_KEYS: dict[bytes, tuple[int, bytes]] = {}  # digest -> sort key: parse each cert only once


def sorted_roots(enrolled: EnrolledSet) -> bytes:
    def key(digest: bytes) -> tuple[int, bytes]:
        if digest not in _KEYS:
            _KEYS[digest] = subject_order(enrolled.by_digest[digest].cert_pem)
        return _KEYS[digest]

    digests = sorted(enrolled.by_digest, key=key)
    return "".join(enrolled.by_digest[d].cert_pem for d in digests).encode()


class HandoverServer:
    def __init__(self, listen: str, cert: Path, key: Path, registry: str) -> None:
        self._registry = SqliteRegistry(Path(registry), create=False)
        self._cert_path, self._key_path = cert, key
        self._executor = ThreadPoolExecutor(MAX_WORKERS)
        self._generation = self._registry.generation()
        self.enrolled = EnrolledSet.build(self._registry.clients())
        self._interceptor = AuthInterceptor(lambda: self.enrolled)
        self._nobody = nobody_root()
        self._stop = threading.Event()
        self.server, self.port = self._build(listen, self.enrolled)
        self._in_roots = set(self.enrolled.by_digest)
        self._thread = threading.Thread(target=self._run, name="handover", daemon=True)

    def _build(self, address: str, enrolled: EnrolledSet) -> tuple[grpc.Server, int]:
        started = time.monotonic()
        cert = load_server_cert(self._cert_path, self._key_path)
        roots = sorted_roots(enrolled) if enrolled.by_digest else self._nobody
        server = grpc.server(self._executor, interceptors=[self._interceptor])
        echo_pb2_grpc.add_EchoServicer_to_server(EchoService(), server)
        creds = grpc.ssl_server_credentials(
            [(cert.key_pem, cert.chain_pem)], root_certificates=roots, require_client_auth=True
        )
        port = server.add_secure_port(address, creds)
        if port == 0:
            raise RuntimeError(f"cannot listen on {address}")
        server.start()
        log.info(
            "listener with %d roots ready in %.3f s",
            len(enrolled.by_digest),
            time.monotonic() - started,
        )
        return server, port

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.server.stop(1.0).wait()
        self._executor.shutdown()
        self._registry.close()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.poll()
            except Exception:  # keep serving the last good state, like TrustWatcher
                log.exception("poll failed")

    def poll(self) -> None:
        generation = self._registry.generation()
        if generation == self._generation:
            return
        enrolled = EnrolledSet.build(self._registry.clients())
        self._generation, self.enrolled = generation, enrolled  # per-call check: immediate
        if set(enrolled.by_digest) <= self._in_roots:
            return  # only revocations: the interceptor enforces them, no TLS rebuild
        new, _ = self._build(f"127.0.0.1:{self.port}", enrolled)
        old, self.server = self.server, new
        self._in_roots = set(enrolled.by_digest)
        old.stop(30.0)  # closes the old listener now; in-flight calls get 30 s
        log.info("handed port %d over to the new listener", self.port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--registry", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    server = HandoverServer(args.listen, args.cert, args.key, args.registry)
    server.start()
    log.info("listening on %s (port %d)", args.listen, server.port)
    try:
        stop.wait()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
