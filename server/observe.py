"""Turns what the interceptor and the trust watcher report into metrics, audit lines and health."""

from __future__ import annotations

import datetime as dt
import threading

import grpc

from pinrpc.identity import Fingerprint
from server.audit import Audit
from server.auth import UNKNOWN_METHOD, shown_method
from server.handshakes import Handshakes
from server.health import Health
from server.metrics import Metrics
from server.registry import Client
from server.server_cert import ServerCert
from server.warm import WarmSet

# Peers remembered for "first allowed call of a connection", in two generations of up to this
# many: when the current one is full it becomes the previous one, and a peer found there is
# carried over, so only a connection idle for a whole generation can be logged twice.
MAX_PEERS = 10_000
# context.peer() releases and retakes the GIL, which cost about 10 % of unary throughput when
# done on every call (docs/PERFORMANCE.md). A connection's first call follows its TLS handshake
# (gRPC connects on first use), so the peer is only looked up while a recent handshake has not
# yet been followed by a new connection's first call (server/handshakes.py). A lookup that
# finds an open connection is paid for a handshake that may never call: one refused at the
# handshake (a stranger's) stayed pending for its whole window, so one ClientHello every 10 s
# put peer() on every call of every client. Each pending handshake now buys this many such
# lookups, then counts as done: a new connection's first call comes within a few calls.
MAX_MISSES = 200


class Observability:
    """Implements both server.auth.Observer and server.trust.TrustEvents."""

    def __init__(
        self,
        metrics: Metrics,
        audit: Audit,
        health: Health,
        handshakes: Handshakes,
        warm: WarmSet | None = None,
    ) -> None:
        self.metrics, self.audit, self.health_state = metrics, audit, health
        self.handshakes, self.warm = handshakes, warm
        metrics.count_handshakes(handshakes.total)
        self._peers: set[str] = set()  # called in this generation
        self._older: set[str] = set()  # called in the previous one
        self._lock = threading.Lock()
        self._known: dict[Fingerprint, Client] | None = None
        self._misses = 0  # lookups that found an open connection (approximate: no lock)

    # -- per call ----------------------------------------------------------------------------

    def denied(
        self,
        context: grpc.ServicerContext,
        method: str,
        fingerprint: Fingerprint | None,
        client: Client | None,
        reason: str,
        served: bool,
    ) -> None:
        code = "UNAUTHENTICATED" if fingerprint is None else "PERMISSION_DENIED"
        self.metrics.denials.labels(reason).inc()
        # Only enrolled callers of served methods get the method as a label: other names are
        # the caller's to invent. (The audit line keeps it: its rate limit bounds those.)
        name = client.name if client else ""
        label = method if client and served else UNKNOWN_METHOD
        self.metrics.calls.inc((name, label, code))
        self.audit.event(
            "call",
            decision="deny",
            reason=reason,
            client=name or None,
            fingerprint=str(fingerprint) if fingerprint else None,
            peer=context.peer(),
            method=shown_method(method),
        )

    def admitted(self, context: grpc.ServicerContext, method: str, client: Client) -> None:
        # Every recent handshake was followed by its first call: no connection is new.
        if not self.handshakes.pending():
            return
        peer = context.peer()
        if peer in self._peers:
            self._misses += 1
            if self._misses >= MAX_MISSES:
                self._misses = 0
                self.handshakes.claim()  # the oldest pending one: it had its chance
            return
        with self._lock:
            if peer in self._peers:
                return  # two first calls of one connection raced: the other one logs it
            carried = peer in self._older  # an open connection that called last generation
            if len(self._peers) >= MAX_PEERS:
                self._older, self._peers = self._peers, set()
            self._peers.add(peer)
            if carried:
                return
            self.handshakes.claim()  # this connection's handshake, or an older one
        if self.warm is not None:
            self.warm.seen(client.fingerprint.digest)
        self.audit.event(
            "call",
            decision="allow",
            reason="first call on this connection",
            client=client.name,
            fingerprint=str(client.fingerprint),
            peer=peer,
            method=shown_method(method),  # one no handler serves is the caller's to invent
        )

    def finished(self, client: str, method: str, code: grpc.StatusCode) -> None:
        # _name_ is Enum's documented attribute behind the .name property, without the
        # property's Python-level lookup: 1 % of server CPU per call, measured.
        self.metrics.calls.inc((client, method, code._name_))

    # -- trust watcher -----------------------------------------------------------------------

    def server_cert(self, cert: ServerCert) -> None:
        self.metrics.set_cert_expiry(cert.leaf.not_valid_after_utc)

    def clients(self, clients: list[Client]) -> None:
        active = {c.fingerprint: c for c in clients if c.active}
        # Those the enrolled set trusts ("trusting N"): an expired certificate stays active.
        now = dt.datetime.now(dt.UTC)
        self.metrics.enrolled.set(sum(1 for c in active.values() if c.not_after > now))
        # Revoked only: a certificate retired at the end of a rotation's overlap was not.
        self.metrics.revoked.set(sum(1 for c in clients if c.revoked_at is not None))
        known, self._known = self._known, active
        if known is None:
            return  # the first load is the baseline, not a change
        for fp, client in active.items():
            if fp not in known:
                self.audit.event("enroll", client=client.name, fingerprint=str(fp),
                                 allowed_methods=list(client.allowed_methods))  # fmt: skip
            elif client.allowed_methods != known[fp].allowed_methods:  # `permit`, from anywhere
                self.audit.event("permit", client=client.name, fingerprint=str(fp),
                                 allowed_methods=list(client.allowed_methods))  # fmt: skip
        latest = {c.fingerprint: c for c in clients}
        for fp, client in known.items():
            if fp not in active:
                client = latest.get(fp, client)
                # The end of a rotation's overlap retires a certificate: nobody revoked it.
                event = "retire" if client.revoked_at is None and client.retire_at else "revoke"
                self.audit.event(event, client=client.name, fingerprint=str(fp))

    def health(self, serving: bool, registry_ok: bool) -> None:
        self.health_state.set(serving, registry_ok)

    def rebuilt(self, seconds: float) -> None:
        self.metrics.rebuild_seconds.observe(seconds)
        self.metrics.rebuilds.inc()
