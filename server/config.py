"""What `pinrpc-server serve` is asked to do. Kept apart from server.app so that the admin
commands, which only need the registry, start without importing grpc and the services (0.13 s of
their 0.23 s start-up here, and revocation is timed from the command's launch)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from pinrpc.errors import PinrpcError

if TYPE_CHECKING:
    import grpc

# --tls-reload: server/listener.py says what each one does.
TLS_RELOAD_MODES: Final = ("inline", "handover")


class ServeError(PinrpcError):
    """The server could not start."""


@dataclass(frozen=True, slots=True)
class Service:
    """A service of your own, served on the mTLS port behind pinrpc's check like its own.

    ``name`` is its full name, which reflection lists
    (``my_pb2.DESCRIPTOR.services_by_name["Inventory"].full_name``); ``add`` registers it on a
    gRPC server, e.g. ``lambda s: my_pb2_grpc.add_InventoryServicer_to_server(inventory, s)``.
    ``add`` runs once per listener (``--tls-reload handover`` builds more than one), so share
    one servicer. Its handlers read the caller with ``server.auth.caller()``; a client calls its
    methods only if its ``--allow`` patterns name them."""

    name: str
    add: Callable[[grpc.Server], None]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str
    cert: Path
    key: Path
    registry: str
    max_workers: int = 32
    poll_interval: float = 0.2
    cert_warn_days: int = 14
    client_warn_days: int = 14
    registry_outage_unhealthy: bool = False  # NOT_SERVING while the registry is unreadable
    rotation_overlap: dt.timedelta = dt.timedelta(hours=24)  # old certificate's grace after Rotate
    enrollment_listen: str | None = None  # enrollment requests (server-only TLS); off by default
    enrollment_ttl: dt.timedelta = dt.timedelta(hours=24)  # how long a request waits
    max_pending: int = 100
    grace: float = 5.0
    health_listen: str | None = None  # plaintext gRPC health for probes; off by default
    metrics_listen: str | None = None  # Prometheus endpoint; off by default
    audit_rate: float = 50.0  # audit lines per second, sustained (bursts of 4x)
    tls_reload: str = "inline"  # or "handover" (server/listener.py): for large fleets
    max_connection_age: float = 120.0  # handover: connections rotate, old listeners empty
    warm_start: Path | None = None  # handover: serve the clients seen before first
    services: tuple[Service, ...] = ()  # yours, beside pinrpc's own (library use only)
