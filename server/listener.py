"""The mTLS listener, and how new roots and server certificates reach it (--tls-reload).

grpcio loads the client roots when credentials are built, in time that grows faster than the
square of their number (docs/PERFORMANCE.md: about 10 s for 10,000 clients here).

* ``inline`` (default): the credentials follow the TrustWatcher, and gRPC builds a changed
  configuration inside the next handshake. Every other new connection waits for that build:
  negligible for a few hundred clients, seconds for thousands.
* ``handover``: a listener's credentials never change. When the roots must grow (an
  enrollment) or the server certificate changed, a builder thread starts a second grpc.server
  on the same port (gRPC binds with SO_REUSEPORT, and add_secure_port releases the GIL while
  it loads the roots), then closes the old server's listening sockets, told apart from any
  other socket on that port number by their inodes. As SO_REUSEPORT would let a second
  process share a busy port, start() first checks that it is free, and once bound that no
  other socket joined it meanwhile (on our address, or a more specific one on our wildcard's
  port); inline mode binds without SO_REUSEPORT. The old server keeps
  serving its open connections until they leave by themselves: every server in this mode
  rotates its connections after ``max_age`` with gRPC's graceful GOAWAY, which clients follow
  without failing a call. Stopping the old server at once instead would fail the calls queued
  on its connections with CANCELLED (measured: about 1.5 per handover under load).
  Revocations need no new listener: the per-call check refuses the next call, and the revoked
  root leaves the TLS store with the next build. Changes made during a build go into the next.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import grpc

from pinrpc.errors import PinrpcError
from server.config import TLS_RELOAD_MODES
from server.server_cert import ServerCert
from server.stderr_helper import CLOSING
from server.trust import TrustWatcher
from server.unforeseen import Unforeseen
from server.warm import WarmSet

log = logging.getLogger("pinrpc.server")
Options = Sequence[tuple[str, Any]]


class ListenError(PinrpcError):
    """A port could not be bound; ``reason`` says why."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"cannot listen on {address}: {reason}")
        self.reason = reason


def listening_sockets(port: int) -> dict[int, socket.socket]:
    """This process's listening TCP sockets on ``port`` (0: any), by inode (duplicates: close
    them after use). The inode names a socket exactly, whatever address it is bound to."""
    found: dict[int, socket.socket] = {}
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:  # no /proc (some containers): a handover then stops the old server
        return found
    for name in names:
        try:
            status = os.fstat(int(name))
            if not stat.S_ISSOCK(status.st_mode) or status.st_ino in found:
                continue
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:  # closed meanwhile, or not a socket family Python knows
            continue
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            if sock.type == socket.SOCK_STREAM and listening and port in (0, sock.getsockname()[1]):
                found[status.st_ino] = sock
                continue
        except (OSError, IndexError, TypeError):
            pass
        sock.close()
    return found


def socket_ids(port: int) -> frozenset[int]:
    """The inodes of this process's listening TCP sockets on ``port`` (0: any)."""
    sockets = listening_sockets(port)
    for sock in sockets.values():
        sock.close()
    return frozenset(sockets)


LOW_PORT_HINT = "ports below 1024 need root or CAP_NET_BIND_SERVICE"


def check_bindable(address: str) -> None:
    """Refuse, with the reason, an address that does not resolve or that none of its
    addresses can bind, so that gRPC never logs a bind failure of its own beside pinrpc's.
    It refuses a port another listener holds, even one bound with SO_REUSEPORT (which
    gRPC would join silently, splitting the connections). SO_REUSEADDR: TIME_WAIT is no
    conflict."""
    host, _, port = address.rpartition(":")
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)  # fmt: skip
    except (OSError, ValueError) as exc:  # gaierror; ValueError: a port that is no number
        raise ListenError(address, bind_reason(exc)) from exc
    failures: list[OSError] = []
    for family, kind, proto, _, where in infos:
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(where)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ListenError(address, "address in use") from exc
            failures.append(exc)
    if failures and len(failures) == len(infos):  # gRPC too serves if one address binds
        raise ListenError(address, bind_reason(failures[0])) from failures[0]


def bind_reason(exc: Exception) -> str:
    """A failed resolve or bind in a sentence: the user's next step where there is one."""
    if isinstance(exc, socket.gaierror):
        return f"the host does not resolve ({exc.strerror})"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return "address in use"
    if isinstance(exc, OSError) and exc.errno == errno.EACCES:
        return f"permission denied ({LOW_PORT_HINT})"
    return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)


def _address(field: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A /proc/net/tcp{,6} address: 32-bit words in hex, each in host byte order."""
    raw = b"".join(struct.pack("=I", int(field[i : i + 8], 16)) for i in range(0, len(field), 8))
    found = ipaddress.ip_address(raw)
    mapped = found.ipv4_mapped if isinstance(found, ipaddress.IPv6Address) else None
    return mapped or found


def takes_from(other: str, ours: str) -> bool:
    """A listener on ``other`` gets some of the connections meant for one on ``ours``
    (/proc/net/tcp's "ADDRESS:PORT", in hex). Measured on Linux 6.18 with SO_REUSEPORT on
    both: the same address splits them; otherwise the most specific listener takes every
    connection to its address whichever bound first (127.0.0.1 over 0.0.0.0 and [::],
    0.0.0.0 over a dual-stack [::]), so a wildcard stranger beside a specific us takes none."""
    (other_ip, other_port), (our_ip, our_port) = other.split(":"), ours.split(":")
    if other_port != our_port:
        return False
    theirs, mine = _address(other_ip), _address(our_ip)
    if theirs == mine:
        return True
    # Our wildcard covers its family's addresses; [::] (dual-stack, as gRPC binds it) all.
    return mine.is_unspecified and (mine.version == 6 or theirs.version == 4)


def shared(ours: frozenset[int]) -> bool:
    """Another listening socket (another process's, say) takes some of the connections meant
    for one of ``ours`` (inodes): it shares our address and port, or holds a more specific
    address on our wildcard's port. False without /proc."""
    bound: dict[int, str] = {}  # inode -> local address and port, as the kernel lists them
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):  # no /proc, or no IPv6
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    bound[int(fields[9])] = fields[1]
    addresses = {bound[ino] for ino in ours if ino in bound}
    others = [where for ino, where in bound.items() if ino not in ours]
    return any(takes_from(other, mine) for other in others for mine in addresses)


# A classic BPF program for the port's SO_REUSEPORT group: "return 1", i.e. pick the second
# socket. During a handover the group is [current, new] (sockets join in listen() order), so
# new connections stop reaching the old listener; once it has left the group, index 1 does not
# exist and the kernel falls back to its usual hash.
_PICK_SECOND = struct.pack("HBBI", 0x06, 0, 0, 1)  # BPF_RET | BPF_K, k=1
_SO_ATTACH_REUSEPORT_CBPF: Final = 51  # Linux; not in Python's socket module
WARM_SAVE_INTERVAL = 60.0  # seconds between saves of the --warm-start file
# A failed build is retried at once after a change, otherwise after this many seconds: each
# attempt loads every root again (about 10 s of a core at 10,000 clients).
FAILED_BUILD_RETRY = 30.0
ACCEPT_QUEUE_DRAIN = 0.05  # seconds for the old listener to accept what reached it already


def steer_to_newest(sockets: list[socket.socket]) -> bool:
    """Send the port's new connections to the newest listener; False if the kernel refused."""
    program = ctypes.create_string_buffer(_PICK_SECOND)
    fprog = struct.pack("@HP", 1, ctypes.addressof(program))  # struct sock_fprog, native
    try:
        for sock in sockets:  # one per address family: each has its own group
            sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError:
        return False
    return True


def close_listening(sockets: list[socket.socket]) -> None:
    """Stop accepting on sockets gRPC owns, leaving their accepted connections alone.

    New connections are first steered to the newest listener, and the old one gets a moment
    to accept what is already queued: closing a listener resets its queued connections
    (measured: 3 failed new connections in 30 handovers without the steering, none in 60
    with it). shutdown(SHUT_RD) then takes it out of the group; gRPC's acceptor logs
    "Closing acceptor. Failed accept4: Invalid argument" once per socket: expected here, and
    the stderr helper, told by the CLOSING line, turns each into an INFO line.
    """
    log.info(CLOSING, len(sockets))  # first: the stderr helper then expects gRPC's lines
    if not steer_to_newest(sockets):
        log.warning("could not steer new connections; a few may be reset by this handover")
    time.sleep(ACCEPT_QUEUE_DRAIN)
    for sock in sockets:
        with contextlib.suppress(OSError):  # already closed
            sock.shutdown(socket.SHUT_RD)
        sock.close()


class Listener:
    """Owns the grpc.server on the mTLS port; in handover mode, replaces it when TLS changes."""

    def __init__(
        self,
        build: Callable[[Options], grpc.Server],
        trust: TrustWatcher,
        *,
        mode: str = "inline",
        grace: float = 5.0,
        max_age: float = 120.0,
        interval: float = 0.2,
        rebuilt: Callable[[float], None] = lambda _seconds: None,
        warm: WarmSet | None = None,
    ) -> None:
        if mode not in TLS_RELOAD_MODES:
            raise ValueError(f"unknown --tls-reload mode {mode!r}")
        self._build, self._trust, self.mode = build, trust, mode
        self._grace, self._max_age = grace, max_age
        self._interval, self._rebuilt = interval, rebuilt
        self._host = ""
        self.port = 0
        self._server: grpc.Server | None = None
        self._sockets: frozenset[int] = frozenset()  # the current server's, by inode
        self._cert: ServerCert | None = None
        self._trusted: frozenset[bytes] = frozenset()
        self._build_lock = threading.Lock()  # one build at a time
        self._draining: list[tuple[float, grpc.Server]] = []  # (stop after, old server)
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._retry_at = 0.0  # monotonic time; after a failed build, the next try
        self.handovers = 0
        self._warm = warm
        self._next_save = 0.0
        self._unforeseen = Unforeseen(log, "handover")

    @property
    def draining(self) -> int:
        """Old servers still serving the connections they had."""
        return len(self._draining)

    def start(self, address: str) -> int:
        """Bind ``address`` (HOST:PORT, port 0 picks one) and serve; returns the port."""
        self._host = address.rpartition(":")[0]
        # Every mode: a bad address gets pinrpc's reason, not gRPC's own line beside it. A busy
        # port too: handover's listeners share it with SO_REUSEPORT, and inline's bind fails.
        check_bindable(address)
        before = socket_ids(0)
        server, port, state = self._bind(address, self._warm_start())
        if port == 0:
            raise ListenError(address, "address in use or invalid")
        self._sockets = socket_ids(port) - before
        # check_bindable() ran before the roots loaded (seconds for thousands of clients): a
        # server started meanwhile on the same port may have joined it too. The later of
        # two such servers sees the other one here, and gives up (both do if both bound
        # before either looked: never a shared port).
        if self.mode == "handover" and shared(self._sockets):
            server.stop(None)
            raise ListenError(address, "address in use")
        server.start()
        self._server, self.port, (self._cert, self._trusted) = server, port, state
        if self.mode == "handover":
            self._thread = threading.Thread(target=self._run, name="pinrpc-handover", daemon=True)
            self._thread.start()
        return port

    def _warm_start(self) -> frozenset[bytes] | None:
        """The recently connected clients, if trusting only them first saves time."""
        if self._warm is None or self.mode != "handover":
            return None
        active = self._trust.enrolled.by_digest.keys()
        first, known = self._warm.first(active)
        if not first or len(first) == len(active):
            return None
        log.info(
            "warm start: trusting the %d client(s) seen most recently first (of %d seen "
            "before); all %d follow by handover",
            len(first), known, len(active),
        )  # fmt: skip
        return first

    def _bind(
        self, address: str, only: frozenset[bytes] | None = None
    ) -> tuple[grpc.Server, int, tuple[ServerCert | None, frozenset[bytes]]]:
        """A new server bound to ``address`` (port 0 if it could not), and what it trusts."""
        state: tuple[ServerCert | None, frozenset[bytes]] = (None, frozenset())
        if self.mode == "inline":
            # Without SO_REUSEPORT a busy port fails here instead of splitting the connections.
            server = self._build((("grpc.so_reuseport", 0),))
            creds = self._trust.credentials()
        else:
            # Connections rotate gracefully, so an old server empties within max_age.
            server = self._build(
                (
                    ("grpc.max_connection_age_ms", int(self._max_age * 1000)),
                    ("grpc.max_connection_age_grace_ms", int(self._grace * 1000)),
                )
            )
            creds, cert, trusted = self._trust.pinned_credentials(only)
            state = (cert, trusted)
        try:
            return server, server.add_secure_port(address, creds), state
        except RuntimeError as exc:  # "Failed to bind", the reason only in gRPC's debug log
            raise ListenError(address, "address in use or invalid") from exc

    def stale(self) -> bool:
        """The listener lacks an enrolled client's root or serves an old certificate."""
        if self.mode != "handover":
            return False
        trust = self._trust
        new_cert = trust.server_cert is not self._cert
        return new_cert or not trust.enrolled.by_digest.keys() <= self._trusted

    def refresh(self) -> bool:
        """Hand over to a new listener if stale (blocks for the build); True if it did."""
        with self._build_lock:
            if self._stopped.is_set() or not self.stale():
                return False
            started = time.monotonic()
            address = f"{self._host}:{self.port}"
            # Only the current server's sockets: others on this port number (--health-listen
            # on another address, say) are not ours to close.
            before = listening_sockets(self.port)
            old_sockets = [sock for ino, sock in before.items() if ino in self._sockets]
            for ino, sock in before.items():
                if ino not in self._sockets:
                    sock.close()
            try:
                new, port, state = self._bind(address)
            except ListenError as exc:
                return self._failed(str(exc), old_sockets)
            except Exception:  # unforeseen, logged by the caller: the duplicates must not leak
                for sock in old_sockets:
                    sock.close()
                raise
            if port != self.port:
                new.stop(None)
                return self._failed(f"cannot bind {address} again", old_sockets)
            self._sockets = socket_ids(port) - frozenset(before)
            new.start()
            old, self._server, self._failing, self._retry_at = self._server, new, False, 0.0
            self.handovers += 1
            self._cert, self._trusted = state
            assert old is not None
            if old_sockets:
                close_listening(old_sockets)
                # Its connections leave within max_age (+10 % jitter) and the grace.
                self._draining.append((started + 1.1 * self._max_age + self._grace + 1, old))
            else:  # no /proc here: stopping is the only way to close the old listener
                old.stop(self._grace)
        took = time.monotonic() - started
        self._rebuilt(took)
        log.info(
            "handed port %d to a new listener trusting %d client(s), built in %.2f s",
            self.port, len(self._trusted), took,
        )  # fmt: skip
        return True

    def _failed(self, reason: str, sockets: list[socket.socket]) -> bool:
        for sock in sockets:
            sock.close()
        if not self._failing:  # keep serving with the old listener
            log.error("handover failed, keeping the current listener: %s", reason)
        self._failing, self._retry_at = True, time.monotonic() + FAILED_BUILD_RETRY
        return False

    def _run(self) -> None:
        # A warm start's full set is built at once, not after the first poll interval: the
        # clients outside the first listener wait for it.
        self._refresh_guarded()
        while not self._stopped.is_set():
            # Woken at once by a change; the timeout reaps, and retries a failed handover.
            changed = self._trust.changed.wait(self._interval)
            self._trust.changed.clear()
            if changed or time.monotonic() >= self._retry_at:
                self._refresh_guarded()
            now = time.monotonic()
            self._reap(now)
            if self._warm is not None and now >= self._next_save:
                self._next_save = now + WARM_SAVE_INTERVAL
                self._warm.save(self._trust.enrolled.by_digest.keys())

    def _refresh_guarded(self) -> None:
        """refresh(); an unforeseen failure is retried like a failed build, not the end of
        every later handover."""
        if not self._unforeseen.run(self.refresh):
            self._retry_at = time.monotonic() + FAILED_BUILD_RETRY

    def _reap(self, now: float) -> None:
        with self._build_lock:
            done = [server for until, server in self._draining if until <= now]
            self._draining = [(until, s) for until, s in self._draining if until > now]
        for server in done:
            server.stop(self._grace)

    def stop(self, grace: float | None) -> None:
        """Stop serving: in-flight calls get ``grace`` seconds; waits until stopped."""
        self._stopped.set()
        self._trust.changed.set()  # wake the builder
        # Waits in steps, here and below: a signal that another thread took runs its Python
        # handler only when the main thread wakes (a library user's handler included).
        while self._thread is not None and self._thread.is_alive():
            self._thread.join(0.5)  # a build in progress finishes first
        servers = [server for _, server in self._draining]
        if self._server is not None:
            servers.append(self._server)
        for event in [server.stop(grace) for server in servers]:
            while not event.wait(0.5):
                pass
        if self._warm is not None:
            self._warm.save(self._trust.enrolled.by_digest.keys())
