"""Health Watch streams on the plaintext probe port: they hold no worker thread, but each costs
the server memory (about 20 KB) for as long as its caller keeps it open, and a stranger needs no
certificate to open them. Before, one connection opened 5,000 of them (+104 MiB server RSS)."""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.app import RunningServer
from server.request_watch import OPEN_PER_HOST
from tests.conftest import code_of, eventually
from tests.test_health import with_probe  # noqa: F401 (a fixture)

SERVING = health_pb2.HealthCheckResponse.SERVING


def test_one_host_may_keep_only_a_few_health_watches_open(with_probe: RunningServer) -> None:  # noqa: F811
    """A host keeps OPEN_PER_HOST watches open; one more is refused with RESOURCE_EXHAUSTED.
    The allow twin: once it closes one, it may open another."""
    with grpc.insecure_channel(f"127.0.0.1:{with_probe.health_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        def watch() -> Any:
            return stub.Watch(health_pb2.HealthCheckRequest(), timeout=30)

        watches = [watch() for _ in range(OPEN_PER_HOST)]
        try:
            assert {next(w).status for w in watches} == {SERVING}
            assert code_of(lambda: next(watch())) == grpc.StatusCode.RESOURCE_EXHAUSTED
            watches.pop().cancel()

            def opens() -> bool:
                try:
                    watches.append(w := watch())
                    return bool(next(w).status == SERVING)
                except grpc.RpcError:
                    return False

            eventually(opens, timeout=3)
        finally:
            for w in watches:
                w.cancel()
