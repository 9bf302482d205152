"""gRPC health checking: on the mTLS port for clients, and optionally on a plaintext probe port.

The probe port (opened in server/app.py) carries the health service and nothing else, so
Docker or Kubernetes can probe without a client certificate while every other method stays
behind client authentication.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pinrpc.v1 import echo_pb2

ECHO_SERVICE = echo_pb2.DESCRIPTOR.services_by_name["Echo"].full_name
# "" is the whole server, by the health protocol's convention.
SERVICES = ("", ECHO_SERVICE)
# Always tells whether the registry is readable, whatever the whole server reports.
REGISTRY_SERVICE = "pinrpc.registry"


def _status(ok: bool) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return (
        health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
    )


class Health:
    def __init__(self) -> None:
        self.servicer = health.HealthServicer(experimental_non_blocking=True)
        self.state: tuple[bool, bool] | None = None

    def set(self, serving: bool, registry_ok: bool) -> None:
        if (serving, registry_ok) == self.state:
            return
        self.state = (serving, registry_ok)
        for service in SERVICES:
            self.servicer.set(service, _status(serving))
        self.servicer.set(REGISTRY_SERVICE, _status(registry_ok))

    def add_to(self, server: grpc.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
