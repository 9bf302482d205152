"""The client roots from the registry, and the watcher that keeps the TLS credentials current.

grpcio has no verify callback, so the set of enrolled certificates *is* the set of trusted
roots (each self-signed client certificate is its own trust anchor). A background thread polls
the registry's generation counter and the certificate files (read and checked by
server/server_cert.py); when either changed it prepares a new configuration. With --tls-reload
inline it waits in each listener's slot, and the credential fetcher (called by gRPC's C core at
every new handshake, server/handshakes.py) hands it over once; otherwise the fetcher returns
None, because building a configuration blocks handshakes. With --tls-reload handover the
credentials stay as built and server/listener.py builds a new listener instead.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from pinrpc.errors import PinrpcError, RegistryError, ServerCertError
from pinrpc.identity import (
    Fingerprint,
    cert_to_pem,
    generate_key,
    self_signed_certificate,
)
from server.handshakes import SLOT_KEY, Handshakes, fetcher
from server.registry import ChangeNotifier, Client, Registry
from server.server_cert import BEGIN, ServerCert, load_server_cert, valid_now
from server.unforeseen import Unforeseen

if TYPE_CHECKING:
    from server.auth import Admitted

log = logging.getLogger("pinrpc.trust")
EXPIRY_SCAN_SECONDS = 3600.0  # scanning every enrolled client is cheap, but not every poll


def file_signature(*paths: Path) -> tuple[tuple[int, ...], ...] | None:
    """What changes when a file is rewritten, a symlink (certbot's live/) is re-pointed, or
    who may read it changes: a chmod, chown or ACL change (ctime; an ACL may leave the mode
    as it was) that makes the key unreadable must show now, not at the next restart (which
    would then fail)."""
    try:
        stats = [os.stat(p) for p in paths]
    except OSError:
        return None
    return tuple((s.st_ino, s.st_mtime_ns, s.st_size, s.st_ctime_ns) for s in stats)


def nobody_root() -> bytes:
    """A root nobody holds the key to: with no enrolled client, no client cert can verify."""
    key = generate_key("p256")
    return cert_to_pem(self_signed_certificate(key, "pinrpc-no-clients-enrolled"))


def subject_order(pem: str) -> tuple[int, bytes]:
    """Approximately BoringSSL's X509_NAME_cmp key: (length, bytes) of the canonical subject.

    grpcio adds roots one by one to a store that re-sorts on every insert; handing them over in
    the store's own order makes loading 2-3x faster (docs/PERFORMANCE.md). A slightly wrong
    order costs time, never correctness.
    """
    cert = x509.load_pem_x509_certificate(pem.encode())
    attrs = [
        x509.NameAttribute(a.oid, " ".join(str(a.value).lower().split()))
        if a.oid != NameOID.COUNTRY_NAME
        else a
        for a in cert.subject
    ]
    der = x509.Name(attrs).public_bytes()
    body = der[2:] if der[1] < 0x80 else der[2 + (der[1] & 0x7F) :]
    return len(body), body


@dataclass(frozen=True, slots=True)
class EnrolledSet:
    """An immutable snapshot of the active clients, keyed by certificate digest."""

    by_digest: Mapping[bytes, Client] = field(default_factory=dict)
    roots_pem: bytes = b""
    clients: tuple[Client, ...] = ()  # everything read, to rebuild without the registry
    next_change: dt.datetime | None = None  # when a rotation overlap or a certificate ends
    # The per-call check's memo for THIS snapshot (server.auth), keyed by the leaf PEM that
    # gRPC reports: a new snapshot (any enrollment or revocation) starts empty, so a cached
    # answer can never outlive a change.
    admitted: dict[bytes, Admitted] = field(default_factory=dict)

    @classmethod
    def build(
        cls, clients: list[Client], order: Callable[[Client], tuple[int, bytes]] | None = None
    ) -> EnrolledSet:
        # An expired certificate is refused at new handshakes only: open connections must
        # lose it here, and the snapshot is rebuilt when the next one expires.
        now = dt.datetime.now(dt.UTC)
        active = [c for c in clients if c.active and c.not_after > now]
        roots = sorted(active, key=order) if order else active
        ends = [c.retire_at for c in active if c.retire_at] + [c.not_after for c in active]
        return cls(
            by_digest={c.fingerprint.digest: c for c in active},
            roots_pem="".join(c.cert_pem for c in roots).encode(),
            clients=tuple(clients),
            next_change=min(ends, default=None),
        )

    def due(self) -> bool:
        """A retiring certificate's overlap, or a certificate, has ended: rebuild the snapshot."""
        return self.next_change is not None and self.next_change <= dt.datetime.now(dt.UTC)

    def lookup(self, fingerprint: Fingerprint) -> Client | None:
        return self.by_digest.get(fingerprint.digest)


class TrustEvents(Protocol):
    """What the watcher reports: health, metrics and the audit log listen (server/observe.py)."""

    def server_cert(self, cert: ServerCert) -> None: ...

    def clients(self, clients: list[Client]) -> None: ...

    def health(self, serving: bool, registry_ok: bool) -> None: ...

    def rebuilt(self, seconds: float) -> None: ...


class NullEvents:
    def server_cert(self, cert: ServerCert) -> None:
        pass

    def clients(self, clients: list[Client]) -> None:
        pass

    def health(self, serving: bool, registry_ok: bool) -> None:
        pass

    def rebuilt(self, seconds: float) -> None:
        pass


class TrustWatcher:
    """Keeps the enrolled set and the server certificate current, without restarts."""

    def __init__(
        self,
        registry: Registry,
        cert_path: Path,
        key_path: Path,
        *,
        interval: float = 0.2,
        warn_days: int = 14,
        events: TrustEvents | None = None,
        client_warn_days: int = 14,
        registry_outage_unhealthy: bool = False,
        handshakes: Handshakes | None = None,
    ) -> None:
        self._registry = registry
        self._cert_path, self._key_path = cert_path, key_path
        self._interval = interval
        self._warn_days = warn_days
        self._events: TrustEvents = events or NullEvents()
        self.handshakes = handshakes or Handshakes()
        # The slots of the credentials that follow every change, and whether they want roots.
        self._following: list[tuple[dict[str, grpc.ServerCertificateConfiguration], bool]] = []
        self._client_warn_days = client_warn_days
        self._registry_outage_unhealthy = registry_outage_unhealthy
        self._next_expiry_scan = 0.0
        self._expiry_warned: dict[bytes, float] = {}
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._unforeseen = Unforeseen(log, "trust reload")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nobody = nobody_root()
        self._registry_failing = False
        # Not None: file_signature() returns None for a missing file, which must count as new.
        self._bad_cert_signature: object = object()
        self._cert_problem: str | None = None  # why the files are refused, as last logged
        self._next_cert_check = 0.0
        self._cert_warned: float | None = None  # monotonic time of the last expiry warning
        self._cert_expired_logged = False
        # Initial load: failures here are fatal, the caller reports them.
        self._generation = registry.generation()
        # digest -> subject_order(), cached; None: the certificate does not parse
        self._orders: dict[bytes, tuple[int, bytes] | None] = {}
        clients = registry.clients()
        self.enrolled = EnrolledSet.build(self._parsable(clients), self._root_order)
        self._cert_signature = file_signature(cert_path, key_path)
        self.server_cert = load_server_cert(cert_path, key_path)
        self.changed = threading.Event()  # set on every change (server.listener waits on it)
        self._subscribers: list[Callable[[], None]] = []  # called after each new enrolled set
        self._announce_cert("serving")
        self._announce_clients(clients)
        self._events.health(self.healthy, not self._registry_failing)

    # -- gRPC side -------------------------------------------------------------------------

    def _config(
        self, cert: ServerCert, enrolled: EnrolledSet, client_auth: bool
    ) -> grpc.ServerCertificateConfiguration:
        roots = (enrolled.roots_pem or self._nobody) if client_auth else None
        return grpc.ssl_server_certificate_configuration(
            [(cert.key_pem, cert.chain_pem)], root_certificates=roots
        )

    def credentials(
        self, *, client_auth: bool = True, follow: bool = True
    ) -> grpc.ServerCredentials:
        """Credentials that follow every change; without client_auth, server-only TLS.

        ``follow=False``: keep what they were built with (--tls-reload handover); the fetcher
        then only counts handshakes (those of client-authenticated credentials).
        """
        return self._credentials(client_auth, follow)[0]

    def pinned_credentials(
        self, only: frozenset[bytes] | None = None
    ) -> tuple[grpc.ServerCredentials, ServerCert, frozenset[bytes]]:
        """mTLS credentials that never change, with the certificate and clients they hold.

        ``only``: trust just these of the active clients (a warm start, server/warm.py).
        """
        return self._credentials(True, False, only)

    def _credentials(
        self, client_auth: bool, follow: bool, only: frozenset[bytes] | None = None
    ) -> tuple[grpc.ServerCredentials, ServerCert, frozenset[bytes]]:
        slot: dict[str, grpc.ServerCertificateConfiguration] = {}
        with self._lock:
            cert, enrolled = self.server_cert, self.enrolled
            if follow:  # from here on, every change leaves a configuration in the slot
                self._following.append((slot, client_auth))
        if only is not None:
            chosen = [c for d, c in enrolled.by_digest.items() if d in only]
            enrolled = EnrolledSet.build(chosen, self._root_order)
        # Built outside the lock: gRPC loads the roots when the credentials are used.
        initial = self._config(cert, enrolled, client_auth)
        # Only handshakes on the mTLS port are counted.
        fetch = self.handshakes.fetcher(slot) if client_auth else fetcher(slot)
        # grpc-stubs omits that the fetcher may return None ("keep the current config").
        typed = cast(Callable[[], grpc.ServerCertificateConfiguration], fetch)
        creds = grpc.dynamic_ssl_server_credentials(
            initial, typed, require_client_authentication=client_auth
        )
        return creds, cert, frozenset(enrolled.by_digest)

    # -- polling ---------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on the watcher's thread after each new enrolled set."""
        self._subscribers.append(callback)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pinrpc-trust", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        # PostgreSQL wakes us on NOTIFY; the interval stays as the fallback consistency check.
        notifier = self._registry if isinstance(self._registry, ChangeNotifier) else None
        while not self._stop.is_set():
            if notifier is not None:
                notifier.wait_for_change(self._interval)
            else:
                self._stop.wait(self._interval)
            if not self._stop.is_set():
                self._unforeseen.run(self.poll)  # poll() handles the failures it foresees

    def poll(self) -> None:
        """Pick up registry and certificate file changes; never raises."""
        with self._poll_lock:
            self.handshakes.expire()
            self._poll_registry()
            self._poll_server_cert()
            self._warn_expiring_clients()
            self._check_server_cert_expiry()
            self._events.health(self.healthy, not self._registry_failing)

    @property
    def healthy(self) -> bool:
        """Our certificate is valid (and, if so configured, the registry is readable)."""
        outage = self._registry_failing and self._registry_outage_unhealthy
        return valid_now(self.server_cert.leaf) and not outage

    def _poll_registry(self) -> None:
        generation, clients = self._generation, None
        try:
            generation = self._registry.generation()
            if generation != self._generation:
                clients = self._registry.clients()
            self._registry_recovered()
        except (RegistryError, PinrpcError, ValueError) as exc:
            if not self._registry_failing:
                log.error("registry unreadable, keeping the last good enrolled set: %s", exc)
                self._registry_failing = True
            generation = self._generation
        if clients is None:
            if not self.enrolled.due():
                return
            # A rotation overlap ended or a certificate expired: drop it, registry or not.
            clients = list(self.enrolled.clients)
        enrolled = EnrolledSet.build(self._parsable(clients), self._root_order)
        with self._lock:
            previous, self.enrolled, self._generation = self.enrolled, enrolled, generation
        # A change of permissions only (permit) leaves the roots as they were: handshakes need
        # not wait for gRPC to load them all again (seconds at a few thousand clients, inline).
        if enrolled.roots_pem != previous.roots_pem:
            self._hand_over()
        self.changed.set()
        for callback in self._subscribers:
            try:
                callback()
            except Exception:  # poll() never raises; the next change calls it again
                log.exception("after a registry change")
        self._announce_clients(clients)

    def _hand_over(self) -> None:
        """Leave the current configuration in every following slot, for its next handshake
        (a newer one replaces one not taken yet)."""
        with self._lock:
            cert, enrolled, following = self.server_cert, self.enrolled, list(self._following)
        for slot, client_auth in following:
            start = time.perf_counter()
            slot[SLOT_KEY] = self._config(cert, enrolled, client_auth)
            if client_auth:  # the enrollment port's server-only TLS is no trust rebuild
                self._events.rebuilt(time.perf_counter() - start)

    def _parsable(self, clients: list[Client]) -> list[Client]:
        """The clients whose certificate parses. One that does not (a damaged or hand-edited
        row) could never complete a handshake, and would otherwise fail every build and end
        the poll thread, revocations included. Logged once per certificate."""
        for client in clients:
            digest = client.fingerprint.digest
            if digest not in self._orders:
                try:
                    self._orders[digest] = subject_order(client.cert_pem)
                except ValueError as exc:
                    self._orders[digest] = None
                    log.error(
                        "client %r (%s) is not trusted: its certificate in the registry does "
                        "not parse (%s); revoke it and enroll its certificate again",
                        client.name, client.fingerprint, exc,
                    )  # fmt: skip
        return [c for c in clients if self._orders[c.fingerprint.digest] is not None]

    def _root_order(self, client: Client) -> tuple[int, bytes]:
        return self._orders.get(client.fingerprint.digest) or (0, b"")

    def _warn_expiring_clients(self) -> None:
        """Once a day per client whose certificate ends within ``client_warn_days``."""
        now = time.monotonic()
        if now < self._next_expiry_scan:
            return
        self._next_expiry_scan = now + EXPIRY_SCAN_SECONDS
        horizon = dt.datetime.now(dt.UTC) + dt.timedelta(days=self._client_warn_days)
        for client in self.enrolled.by_digest.values():
            if client.not_after > horizon:
                continue
            last = self._expiry_warned.get(client.fingerprint.digest)
            if last is not None and now - last < 86400:
                continue
            self._expiry_warned[client.fingerprint.digest] = now
            log.warning(
                "client %r (%s) certificate expires %s UTC; it should rotate its key pair",
                client.name,
                client.fingerprint,
                f"{client.not_after:%Y-%m-%d %H:%M}",
            )

    def _registry_recovered(self) -> None:
        if self._registry_failing:
            log.warning("registry readable again")
            self._registry_failing = False

    def _poll_server_cert(self) -> None:
        signature = file_signature(self._cert_path, self._key_path)
        if signature == self._bad_cert_signature:
            return
        if signature == self._cert_signature:  # untouched, e.g. its directory searchable again
            self._cert_files_usable()
            return
        try:
            cert = load_server_cert(self._cert_path, self._key_path)
            if cert.leaf_only and self.server_cert.chain_pem.count(BEGIN) > 1:
                # `cat cert.pem chain.pem > fullchain.pem` shows a poll the leaf alone, whole.
                raise ServerCertError(
                    f"{self._cert_path.absolute()} holds a leaf without the intermediate "
                    f"that the certificate served now has (half-written, or cert.pem in "
                    f"place of fullchain.pem?); restart the server to serve a leaf alone"
                )
        except ServerCertError as exc:
            # Mid-renewal states look like this; the next complete write fixes it. Logged once
            # per reason: not at every poll, nor again at the hourly retry.
            if str(exc) != self._cert_problem:
                self._cert_problem = str(exc)
                log.error(
                    "server certificate not reloaded, still serving the previous one: %s", exc
                )
            self._bad_cert_signature = signature
            return
        self._cert_files_usable()
        if cert == self.server_cert:  # the same files (a chmod back, a touch): nothing to hand over
            self._cert_signature = signature
            return
        with self._lock:
            self.server_cert, self._cert_signature = cert, signature
        self._hand_over()
        self.changed.set()
        self._announce_cert("reloaded")

    def _cert_files_usable(self) -> None:
        if self._cert_problem is not None:
            self._cert_problem = None
            log.warning(
                "server certificate files usable again: %s, %s",
                self._cert_path.absolute(),
                self._key_path.absolute(),
            )

    # -- logging ---------------------------------------------------------------------------

    def _announce_cert(self, verb: str) -> None:
        cert = self.server_cert
        log.info("%s server certificate: %s", verb, cert.describe())
        if cert.leaf_only:  # once per certificate loaded: a touched file loads no new one
            log.warning(
                "server certificate %s holds no intermediate, only a leaf issued by %s: "
                "clients that verify with ordinary roots will fail; serve the full chain "
                "(fullchain.pem, not cert.pem)",
                self._cert_path.absolute(),
                cert.leaf.issuer.rfc4514_string(),
            )
        # A new certificate: check it now, and warn about it afresh.
        self._next_cert_check, self._cert_warned, self._cert_expired_logged = 0.0, None, False
        self._check_server_cert_expiry()
        self._events.server_cert(cert)

    def _check_server_cert_expiry(self) -> None:
        """Warn once a day within ``warn_days`` of the end; log once when it has ended.

        Checked hourly and at the moment of expiry. A refused file is retried then too: a
        certificate that was not yet valid may have become valid.
        """
        now = time.monotonic()
        if now < self._next_cert_check:
            return
        self._bad_cert_signature = object()
        not_after = self.server_cert.leaf.not_valid_after_utc
        left = (not_after - dt.datetime.now(dt.UTC)).total_seconds()
        self._next_cert_check = now + (
            min(EXPIRY_SCAN_SECONDS, left) if left > 0 else EXPIRY_SCAN_SECONDS
        )
        if left <= 0:
            if not self._cert_expired_logged:
                self._cert_expired_logged = True
                log.error(
                    "server certificate expired at %s UTC; clients refuse it: renew it now",
                    f"{not_after:%Y-%m-%d %H:%M}",
                )
            return
        warned = self._cert_warned
        if left < self._warn_days * 86400 and (warned is None or now - warned >= 86400):
            self._cert_warned = now
            log.warning(
                "server certificate expires in %.1f days (%s); renew it (certbot renew)",
                left / 86400,
                not_after.isoformat(),
            )

    def _announce_clients(self, clients: list[Client]) -> None:
        self._events.clients(clients)
        count = len(self.enrolled.by_digest)
        if count == 0:
            log.warning("no enrolled clients: nobody can connect until one is enrolled")
        else:
            log.info("trusting %d enrolled client certificate(s)", count)
