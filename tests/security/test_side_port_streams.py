"""Health Watch streams on the plaintext probe port: they hold no worker thread, but each costs
the server memory (about 20 KB) for as long as its caller keeps it open, and a stranger needs no
certificate to open them. Before, one connection opened 5,000 of them (+104 MiB server RSS)."""

from __future__ import annotations

import threading
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.app import RunningServer
from server.request_watch import OPEN_PER_HOST, PerHost
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


def test_a_watch_that_ends_before_it_is_held_subscribes_nothing(
    with_probe: RunningServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stranger's Watch ends (cancel, reset) after its request came but before the port
    counted it (a hook holds it there): its health subscription must not outlive it. Before,
    the behaviour ran on the ended call and left health's servicer a subscriber it never drops,
    one per such race, each sent every later status change."""
    arrived, done = threading.Event(), threading.Event()
    hold = PerHost._hold

    def late(self: PerHost, context: grpc.ServicerContext) -> None:
        arrived.set()
        try:
            eventually(lambda: not context.is_active(), timeout=10)
            hold(self, context)
        finally:
            done.set()

    monkeypatch.setattr(PerHost, "_hold", late)
    with grpc.insecure_channel(f"127.0.0.1:{with_probe.health_port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert arrived.wait(10)
        watch.cancel()
        assert done.wait(10)
    subscribers = with_probe.health.servicer._send_response_callbacks  # upstream's own table
    assert not any(subscribers.values())
