"""Prometheus metrics, in a registry of their own (no global state), served on --metrics-listen."""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import io
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from server.ratelimit import TokenBucket


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls = CallCounter()
        r.register(self.calls)
        self.denials = Counter(
            "pinrpc_denials", "Calls refused by the interceptor, by reason", ["reason"], registry=r
        )
        self.enrolled = Gauge("pinrpc_enrolled_clients", "Active enrolled clients", registry=r)
        self.revoked = Gauge("pinrpc_revoked_clients", "Revoked client certificates", registry=r)
        self.cert_expiry = Gauge(
            "pinrpc_server_certificate_expiry_timestamp_seconds",
            "When the served certificate expires (Unix time)",
            registry=r,
        )
        self.rebuilds = Counter(
            "pinrpc_trust_rebuilds",
            "TLS configurations prepared for gRPC after a change",
            registry=r,
        )
        self.rebuild_seconds = Histogram(
            "pinrpc_trust_rebuild_seconds",
            "Time to build a new TLS configuration (--tls-reload inline: to prepare it, gRPC "
            "loads it in the next handshake; handover: the whole new listener)",
            registry=r,
        )

    def count_handshakes(self, total: Callable[[], int]) -> None:
        """pinrpc_tls_handshakes_total, read from server.handshakes at each scrape."""
        self.registry.register(
            ReadCounter("pinrpc_tls_handshakes", "TLS handshakes started on the mTLS port", total)
        )

    def set_cert_expiry(self, not_after: dt.datetime) -> None:
        self.cert_expiry.set(not_after.timestamp())


class CallCounter(Collector):
    """pinrpc_calls_total{client,method,code}, counted without a lock on the per-call path.

    A labelled prometheus Counter validates and locks on every increment (0.46 us against
    0.13 us here, docs/PERFORMANCE.md). Each thread counts in a dict only it writes, so no
    increment is lost, and a scrape adds the dicts up.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._tables: list[dict[tuple[str, str, str], int]] = []
        self._lock = threading.Lock()  # guards _tables, taken once per thread and per scrape

    def inc(self, key: tuple[str, str, str]) -> None:
        try:
            counts: dict[tuple[str, str, str], int] = self._local.counts
        except AttributeError:
            counts = self._local.counts = {}
            with self._lock:
                self._tables.append(counts)
        counts[key] = counts.get(key, 0) + 1

    def _totals(self) -> dict[tuple[str, str, str], int]:
        with self._lock:
            tables = list(self._tables)
        totals: dict[tuple[str, str, str], int] = {}
        for table in tables:
            for key, n in table.copy().items():  # copy(): one step under the GIL
                totals[key] = totals.get(key, 0) + n
        return totals

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            "pinrpc_calls",
            "Calls handled, by client, method and status code",
            labels=["client", "method", "code"],
        )
        for labels, n in sorted(self._totals().items()):
            family.add_metric(labels, n)
        yield family


class ReadCounter(Collector):
    """A counter kept elsewhere (no Python runs where it is counted), read when scraped."""

    def __init__(self, name: str, documentation: str, read: Callable[[], int]) -> None:
        self._name, self._documentation, self._read = name, documentation, read

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, value=self._read())


# A connection holds a thread for at most this long, however it trickles its request (the
# socket timeout alone bounds each read, not their sum); beyond MAX_CONNECTIONS, new ones are
# closed. One scrape takes milliseconds, and wsgiref serves one request per connection.
CONNECTION_TIMEOUT = 5.0
MAX_CONNECTIONS = 16
# Bytes read from a connection: a scrape's request is a few hundred. The standard library alone
# takes 100 header lines of 64 KiB each, and 16 such requests grew the server by 100 MB.
MAX_REQUEST = 16 * 1024
# Every scrape holds the GIL the mTLS port needs: 8 strangers scraping in a loop cut its calls
# from about 2,400 to 300 a second, and to 5 at 10,000 clients, where one rendering takes 0.1 s.
# So connections beyond ACCEPT_RATE a second (in bursts as large) wait in the kernel's backlog,
# unaccepted, and a scrape gets the last rendering again once fresh ones have taken more than
# RENDER_SHARE of one core (over a reserve of RENDER_RESERVE seconds). Prometheus scrapes a few
# times a minute and never meets either limit.
ACCEPT_RATE = 20
RENDER_SHARE = 0.1
RENDER_RESERVE = 0.25


class _Capped(io.RawIOBase):
    """The connection's bytes, up to ``MAX_REQUEST``; beyond, OSError ends the connection."""

    def __init__(self, connection: socket.socket) -> None:
        self._connection, self._left = connection, MAX_REQUEST

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._left <= 0:
            raise OSError(f"request larger than {MAX_REQUEST} bytes")
        n = self._connection.recv_into(buffer, min(len(buffer), self._left))
        self._left -= n
        return n


class _Handler(WSGIRequestHandler):
    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(CONNECTION_TIMEOUT)
        self.rfile.close()  # the socket stays open: it is closed with the connection
        self.rfile = io.BufferedReader(_Capped(self.connection))
        # Shutting the socket down ends a read or write blocked in this handler's thread.
        self._deadline = threading.Timer(CONNECTION_TIMEOUT, self._cut)
        self._deadline.daemon = True
        self._deadline.start()

    def _cut(self) -> None:
        with contextlib.suppress(OSError):  # already closed: the request finished meanwhile
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._deadline.cancel()
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a line per scrape would drown the server's own


class _Exposition:
    """The WSGI app: the registry as Prometheus text, rendered anew within RENDER_SHARE."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry, self._lock = registry, threading.Lock()
        self._budget, self._refilled = RENDER_RESERVE, time.monotonic()  # seconds of rendering
        self._body: bytes | None = None
        self._gzipped: bytes | None = None  # the same body, compressed once when asked for

    def __call__(
        self, environ: dict[str, str], start_response: Callable[..., object]
    ) -> list[bytes]:
        # Prometheus asks for gzip: the text of 10,000 clients' calls is about 1.8 MB, 0.15 MB
        # compressed (10 ms, once per rendering).
        gzipped = "gzip" in environ.get("HTTP_ACCEPT_ENCODING", "")
        headers = [("Content-Type", CONTENT_TYPE_LATEST)]
        if gzipped:
            headers.append(("Content-Encoding", "gzip"))
        body = self.render(gzipped)
        start_response("200 OK", headers)
        return [body]

    def render(self, gzipped: bool = False) -> bytes:
        with self._lock:  # scrapes at once share one rendering
            now = time.monotonic()
            self._budget = min(RENDER_RESERVE, self._budget + (now - self._refilled) * RENDER_SHARE)
            self._refilled = now
            body = self._body
            if body is None or self._budget > 0:
                body = self._body = generate_latest(self._registry)
                self._gzipped = None
            if not gzipped:
                self._budget -= time.monotonic() - now
                return body
            if self._gzipped is None:
                self._gzipped = gzip.compress(body, compresslevel=6)
            self._budget -= time.monotonic() - now  # compressing spends the budget too
            return self._gzipped


class _Server(ThreadingWSGIServer):
    """prometheus_client's thread-per-connection server, with a bound on the threads and on
    the rate at which it accepts connections."""

    def __init__(self, family: int, address: tuple[str, int]) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._accepts = TokenBucket(ACCEPT_RATE, ACCEPT_RATE)
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        while not self._accepts.take():  # a token comes within 1 / ACCEPT_RATE s
            time.sleep(1 / ACCEPT_RATE)
        return super().get_request()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # timeouts and resets are routine
            super().handle_error(request, client_address)


def serve_metrics(metrics: Metrics, listen: str) -> tuple[Callable[[], None], int]:
    """Start the HTTP endpoint on HOST:PORT; return a function that stops it, and the port."""
    host, _, port = listen.rpartition(":")
    info = socket.getaddrinfo(host.strip("[]") or "127.0.0.1", int(port), type=socket.SOCK_STREAM)
    family, address = info[0][0], str(info[0][4][0])
    server = _Server(family, (address, int(port)))  # getaddrinfo's port wraps around at 65536
    server.set_app(_Exposition(metrics.registry))
    thread = threading.Thread(target=server.serve_forever, name="pinrpc-metrics", daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return stop, int(server.server_port)
