"""A port number for a process that takes its port from a flag or a config file.

Such a port is free when chosen and bound later by another process, so something can take it in
between. A port the kernel hands out (bind to port 0) is the worst choice: it comes from the
ephemeral range, which every outgoing connection of the suite also draws from, and a listener's
SO_REUSEADDR does not let it share a port with a connected socket (seen in a full run:
"Address already in use" for obtain-cert's responder). So the port is picked below that range,
where only an explicit bind can take it, or above it where a machine's range leaves no room
below (containers often set 1024-65535); with no room either side, the kernel picks.
"""

from __future__ import annotations

import errno
import random
import socket
from pathlib import Path

_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Ports handed out by this process: a caller that picks several before binding any (pebble's
# four, a server's two) must not get one twice, which a random pick alone allows.
_GIVEN: set[int] = set()


def _outside_ephemeral() -> range:
    """Up to 12,000 ports below the ephemeral range, or above it if none are free of it."""
    try:
        low, high = (int(n) for n in _RANGE.read_text().split()[:2])
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's defaults
    below = range(max(1024, low - 12000), low)
    return below if below else range(high + 1, min(65536, high + 12001))


def _bindable(port: int) -> bool:
    """Free on the IPv4 wildcard (so on every IPv4 address) and on IPv6's, where there is one."""
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):  # noqa: S104
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False  # any other error: no such family here, nothing to collide with
    return True


def free_port() -> int:
    """A TCP port nothing is bound to now, outside the kernel's ephemeral range if it can be."""
    candidates = _outside_ephemeral()
    if not candidates:  # the range spans every unprivileged port: only the kernel's pick is left
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])
    for _ in range(200):
        port = random.choice(candidates)
        if port not in _GIVEN and _bindable(port):
            _GIVEN.add(port)
            return port
    raise RuntimeError(f"no free port in {candidates.start}-{candidates.stop - 1} after 200 tries")
