"""Prometheus metrics, in a registry of their own (no global state), served on --metrics-listen."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.calls = Counter(
            "pinrpc_calls", "Calls handled, by client, method and status code",
            ["client", "method", "code"], registry=r,
        )  # fmt: skip
        self._call_children: dict[tuple[str, str, str], Any] = {}
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
            "pinrpc_trust_rebuilds", "TLS configurations handed to gRPC after a change", registry=r
        )
        self.rebuild_seconds = Histogram(
            "pinrpc_trust_rebuild_seconds",
            "Time to build a new TLS configuration (--tls-reload inline: to prepare it, gRPC "
            "loads it in the next handshake; handover: the whole new listener)",
            registry=r,
        )
        self.handshakes = Counter(
            "pinrpc_tls_handshakes", "TLS handshakes started on the mTLS port", registry=r
        )

    def count_call(self, client: str, method: str, code: str) -> None:
        # labels() validates and locks on every lookup; the per-call path keeps the children.
        key = (client, method, code)
        child = self._call_children.get(key)
        if child is None:
            child = self._call_children[key] = self.calls.labels(client, method, code)
        child.inc()

    def set_cert_expiry(self, not_after: dt.datetime) -> None:
        self.cert_expiry.set(not_after.timestamp())


def serve_metrics(metrics: Metrics, listen: str) -> tuple[Callable[[], None], int]:
    """Start the HTTP endpoint on HOST:PORT; return a function that stops it, and the port."""
    host, _, port = listen.rpartition(":")
    server, thread = start_http_server(int(port), host.strip("[]") or "127.0.0.1", metrics.registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join()

    return stop, int(server.server_port)
