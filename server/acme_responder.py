"""obtain-cert's HTTP-01 challenge responder: a tiny HTTP server that answers the CA's token
requests for the duration of an order (server/acme.py runs the order).

It is separate because it is a server open to anyone while a run lasts, with concerns of its
own (a thread per connection, a per-host cap, a connection timeout, the open-file limit) that
the ACME client flow does not share; and it needs nothing from the optional acme extra.
"""

from __future__ import annotations

import http.server
import logging
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import cast

from pinrpc.errors import AcmeError
from server.fdlimit import raise_open_files
from server.request_watch import host_of

# server.acme's name, as before the responder had a module of its own: one logger for a run.
log = logging.getLogger("server.acme")

# The CA's validators send their GET as soon as they connect and read the answer at once, on a
# fresh connection each (no keep-alive): one still open after this long is a stranger's, idle or
# trickling, holding a thread and a descriptor.
_CONNECTION_TIMEOUT_S = 5.0
# Connections one host (an IPv4 address, an IPv6 /64) may hold at once, beyond one per challenge:
# a validator fetches each token once per validation, so even an address that validates every
# name at once stays within one per challenge; the spare covers validators sharing an address
# and an operator's own curl. One more is closed at once, before it costs a thread.
_SPARE_PER_HOST = 16


class _ChallengeHandler(http.server.BaseHTTPRequestHandler):
    # Set per responder through a subclass, so no module-level mutable state is shared.
    answers: Mapping[str, bytes] = {}

    def do_GET(self) -> None:
        body = self.answers.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        # The default writes to stderr; the CLI keeps stderr for its one error line.
        log.debug("http-01 %s: " + format, self.client_address[0], *args)


class _ResponderServer(http.server.ThreadingHTTPServer):
    """Thread per connection, as the CA may validate several names at once, but a connection
    costs a stranger something: at most ``per_host`` at a time per host, and none kept open
    longer than _CONNECTION_TIMEOUT_S (the handler's per-read timeout misses a trickler)."""

    # socketserver's 5 drops the SYNs of a burst (resent after 1 s, 3 s, ...): a stranger's
    # connects would push the CA's out of the queue even before any is refused.
    request_queue_size = socket.SOMAXCONN

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[http.server.BaseHTTPRequestHandler],
        per_host: int,
    ) -> None:
        self._per_host = per_host
        self._lock = threading.Lock()
        self._open: dict[socket.socket, tuple[str, float]] = {}  # -> host, accepted at
        self._hosts: Counter[str] = Counter()
        self._next_sweep = 0.0
        super().__init__(address, handler)

    def verify_request(self, request: object, client_address: object) -> bool:
        address = cast(tuple[str, int], client_address)[0]
        host = host_of(f"ipv6:[{address}]:0" if ":" in address else f"ipv4:{address}:0")
        with self._lock:
            if self._hosts[host] >= self._per_host:
                log.debug("http-01 %s: too many connections, closed", address)
                return False  # socketserver closes it
            self._hosts[host] += 1
            self._open[cast(socket.socket, request)] = (host, time.monotonic())
        return True

    def shutdown_request(self, request: object) -> None:
        with self._lock:  # before the close: service_actions never shuts down a reused fd
            host, _ = self._open.pop(cast(socket.socket, request), ("", 0.0))
            if host:
                self._hosts[host] -= 1
                if not self._hosts[host]:
                    del self._hosts[host]
        super().shutdown_request(request)  # type: ignore[arg-type]

    def handle_error(self, request: object, client_address: object) -> None:
        # A connection reset mid-request: socketserver would print a traceback on stderr, which
        # the CLI keeps for its one error line, once for every reset a stranger sends.
        address = cast(tuple[str, int], client_address)[0]
        log.debug("http-01 %s: connection ended: %r", address, sys.exc_info()[1])

    def service_actions(self) -> None:
        # serve_forever calls this after each accept and every half second: sweep once a second.
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 1.0
        with self._lock:
            for sock, (_, since) in self._open.items():
                if now - since > _CONNECTION_TIMEOUT_S:
                    with suppress(OSError):  # its handler thread then reads EOF and ends
                        sock.shutdown(socket.SHUT_RDWR)


class _HTTP6Server(_ResponderServer):
    address_family = socket.AF_INET6


@contextmanager
def http01_responder(host: str, port: int, answers: Mapping[str, bytes]) -> Iterator[None]:
    # An idle client is dropped after a read waits this long (the default: never).
    attributes = {"answers": dict(answers), "timeout": _CONNECTION_TIMEOUT_S}
    handler = type("_Handler", (_ChallengeHandler,), attributes)
    server_class = _HTTP6Server if ":" in host else _ResponderServer
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    raise_open_files()  # as serve does: strangers' connections must not use up the descriptors
    try:
        server = server_class((host, port), handler, len(answers) + _SPARE_PER_HOST)
    except PermissionError as exc:
        raise AcmeError(
            f"no permission to listen on {where} for HTTP-01; run with the right to bind "
            f"ports below 1024, or use --http-port and forward port 80 to it"
        ) from exc
    except OSError as exc:
        raise AcmeError(
            f"cannot listen on {where} for HTTP-01 ({exc.strerror or exc}); check --http-host, "
            f"stop whatever uses that port or choose another --http-port"
        ) from exc
    thread = threading.Thread(target=server.serve_forever, name="acme-http01", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
