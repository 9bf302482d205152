"""What a stranger's unfinished connections may cost the server: file descriptors, for a while.

Every TCP connection gRPC accepts holds a descriptor until its TLS handshake ends, and nobody
needs a certificate to open one. Measured (tests/security/test_fd_exhaustion.py): under a soft
RLIMIT_NOFILE of 1,024, systemd's default, about 1,010 connections held by one local host that
never sent a byte left an enrolled client's calls waiting until their deadline, with gRPC
logging "File descriptor limit reached. Retrying." once a second; gRPC waited 120 s for those
handshakes by default. So ``serve`` raises the soft limit to the hard one (systemd's hard
default is 524,288), as nginx and others do, every port ends handshakes after 20 s, and the
ports open to strangers close connections idle for as long.
"""

from __future__ import annotations

import logging
import resource
from typing import Final

log = logging.getLogger("pinrpc.server")

# Long enough for a slow client, and for the handshakes that wait while --tls-reload inline
# rebuilds the trust store (8 s at 10,000 clients, docs/PERFORMANCE.md); gRPC's default: 120 s.
HANDSHAKE_TIMEOUT: Final = 20.0
HANDSHAKE_OPTIONS: Final = (("grpc.server_handshake_timeout_ms", int(HANDSHAKE_TIMEOUT * 1000)),)
# Anyone finishes the health and enrollment ports' handshakes, and a gRPC client then holds its
# idle connection for good (measured: still open after 45 s): close one with no call in flight
# after as long. Open calls there are bounded per host (request_watch.py, health.py).
# Their largest legitimate message is an enrollment request (a certificate of up to 64 KiB):
# refuse a stranger's bigger one before it is buffered. BDP probing off keeps each
# connection's HTTP/2 window at its small default; grown, it let strangers' 4 MB messages hold
# memory per connection (measured: 32 connections took the server from 60 to 573 MB).
SIDE_PORT_MAX_MESSAGE: Final = 128 * 1024
SIDE_PORT_OPTIONS: Final = (
    *HANDSHAKE_OPTIONS,
    ("grpc.max_connection_idle_ms", int(HANDSHAKE_TIMEOUT * 1000)),
    ("grpc.max_receive_message_length", SIDE_PORT_MAX_MESSAGE),
    ("grpc.http2.bdp_probe", 0),
)
# Below this many descriptors, one host can hold them all within a handshake timeout.
FLOOR: Final = 4096
UNLIMITED_TARGET: Final = 1 << 20  # Linux's default fs.nr_open, above which setrlimit fails


def raise_open_files() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return the soft limit now.

    Process-wide, and harmless to repeat. Nothing in the server uses select(), which cannot
    watch descriptors above 1,023."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
        else:
            log.info("raised the open-file limit (RLIMIT_NOFILE) from %d to %d", soft, target)
            soft = target
    if soft != resource.RLIM_INFINITY and soft < FLOOR:
        log.warning(
            "the open-file limit is %d (hard limit %d): a single host holding that many "
            "unfinished connections can lock every client out; raise it to at least %d "
            "(systemd: LimitNOFILE=, docs/OPERATIONS.md)",
            soft, hard, FLOOR,
        )  # fmt: skip
    return soft
