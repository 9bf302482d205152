"""Turns what the interceptor and the trust watcher report into metrics, audit lines and health."""

from __future__ import annotations

import threading
import time

import grpc

from pinrpc.identity import Fingerprint
from server.audit import Audit
from server.auth import UNKNOWN_METHOD
from server.health import Health
from server.metrics import Metrics
from server.registry import Client
from server.trust import ServerCert
from server.warm import WarmSet

# Peers remembered for "first allowed call of a connection"; forgotten all at once when full,
# which at worst logs a connection twice.
MAX_PEERS = 10_000
# context.peer() releases and retakes the GIL, which cost about 10 % of unary throughput when
# done on every call (docs/PERFORMANCE.md). A connection's first call follows its TLS handshake
# (gRPC connects on first use), so the peer is only looked up this long after a handshake.
NEW_CONNECTION_WINDOW = 10.0


class Observability:
    """Implements both server.auth.Observer and server.trust.TrustEvents."""

    def __init__(
        self, metrics: Metrics, audit: Audit, health: Health, warm: WarmSet | None = None
    ) -> None:
        self.metrics, self.audit, self.health_state = metrics, audit, health
        self.warm = warm
        self._peers: set[str] = set()
        self._lock = threading.Lock()
        self._known: dict[Fingerprint, Client] | None = None
        self._look_until = 0.0  # monotonic time; a float store is atomic, no lock needed

    # -- per call ----------------------------------------------------------------------------

    def denied(
        self,
        context: grpc.ServicerContext,
        method: str,
        fingerprint: Fingerprint | None,
        client: Client | None,
        reason: str,
    ) -> None:
        code = "UNAUTHENTICATED" if fingerprint is None else "PERMISSION_DENIED"
        self.metrics.denials.labels(reason).inc()
        # Only enrolled callers get their method as a label: others could invent names freely.
        name, label = (client.name, method) if client else ("", UNKNOWN_METHOD)
        self.metrics.count_call(name, label, code)
        self.audit.event(
            "call",
            decision="deny",
            reason=reason,
            client=name or None,
            fingerprint=str(fingerprint) if fingerprint else None,
            peer=context.peer(),
            method=method,
        )

    def admitted(self, context: grpc.ServicerContext, method: str, client: Client) -> None:
        if time.monotonic() > self._look_until:
            return  # no handshake lately: no connection can be making its first call
        peer = context.peer()
        if peer in self._peers:
            return
        with self._lock:
            if len(self._peers) >= MAX_PEERS:
                self._peers.clear()
            self._peers.add(peer)
        if self.warm is not None:
            self.warm.seen(client.fingerprint.digest)
        self.audit.event(
            "call",
            decision="allow",
            reason="first call on this connection",
            client=client.name,
            fingerprint=str(client.fingerprint),
            peer=peer,
            method=method,
        )

    def finished(self, client: str, method: str, code: grpc.StatusCode) -> None:
        self.metrics.calls.inc((client, method, code.name))

    # -- trust watcher -----------------------------------------------------------------------

    def server_cert(self, cert: ServerCert) -> None:
        self.metrics.set_cert_expiry(cert.leaf.not_valid_after_utc)

    def clients(self, clients: list[Client]) -> None:
        active = {c.fingerprint: c for c in clients if c.active}
        self.metrics.enrolled.set(len(active))
        self.metrics.revoked.set(len(clients) - len(active))
        known, self._known = self._known, active
        if known is None:
            return  # the first load is the baseline, not a change
        for fp, client in active.items():
            if fp not in known:
                self.audit.event("enroll", client=client.name, fingerprint=str(fp),
                                 allowed_methods=list(client.allowed_methods))  # fmt: skip
        for fp, client in known.items():
            if fp not in active:
                self.audit.event("revoke", client=client.name, fingerprint=str(fp))

    def health(self, serving: bool, registry_ok: bool) -> None:
        self.health_state.set(serving, registry_ok)

    def handshake(self) -> None:
        self._look_until = time.monotonic() + NEW_CONNECTION_WINDOW
        self.metrics.handshakes.inc()

    def rebuilt(self, seconds: float) -> None:
        self.metrics.rebuild_seconds.observe(seconds)
        self.metrics.rebuilds.inc()
