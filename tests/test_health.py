"""Health checking and reflection: behind client auth on the mTLS port, alone on the probe port."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pinrpc.v1 import echo_pb2, echo_pb2_grpc
from server.app import RunningServer, start_server
from server.config import ServerConfig
from server.health import Health
from tests.conftest import Connect, MakeClient, ServerFiles, code_of, eventually

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def check(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


def test_health_and_reflection_need_an_enrolled_client(
    connect: Connect, make_client: MakeClient
) -> None:
    alice, mallory = make_client("alice"), make_client("mallory")
    connect.enroll(alice, "alice")  # no --allow: health and reflection are always allowed
    channel = connect.channel(alice.cert_path, alice.key_path)
    assert check(channel) == SERVING
    assert check(channel, "pinrpc.v1.Echo") == SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = stub.ServerReflectionInfo(iter([request]), timeout=5)
    names = {s.name for s in reply.list_services_response.service}
    assert {"pinrpc.v1.Echo", "grpc.health.v1.Health"} <= names
    stranger = connect.channel(mallory.cert_path, mallory.key_path)
    assert code_of(lambda: check(stranger)) == grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def with_probe(devca: ServerFiles, registry: Path) -> Iterator[RunningServer]:
    config = ServerConfig(
        "127.0.0.1:0", devca.cert, devca.key, str(registry), health_listen="127.0.0.1:0"
    )
    with start_server(config) as running:
        yield running


def test_probe_port_serves_health_and_nothing_else(with_probe: RunningServer) -> None:
    assert with_probe.health_port
    with grpc.insecure_channel(f"127.0.0.1:{with_probe.health_port}") as channel:
        assert check(channel) == SERVING
        echo = echo_pb2_grpc.EchoStub(channel)
        unimplemented = grpc.StatusCode.UNIMPLEMENTED
        assert code_of(lambda: echo.WhoAmI(echo_pb2.WhoAmIRequest(), timeout=5)) == unimplemented
    # The mTLS port does not speak plaintext.
    with grpc.insecure_channel(f"127.0.0.1:{with_probe.port}") as channel:
        assert code_of(lambda: check(channel)) == grpc.StatusCode.UNAVAILABLE


def test_probe_port_is_off_by_default(connect: Connect) -> None:
    assert connect.server.health_port is None


def test_expired_server_certificate_is_not_serving(
    devca: ServerFiles, registry: Path, tmp_path: Path
) -> None:
    # An expired certificate refuses to start, so this one expires while serving.
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=3)
    cert, key = devca.ca.issue(["server.test"], not_after=soon).write(tmp_path)
    config = ServerConfig("127.0.0.1:0", cert, key, str(registry), health_listen="127.0.0.1:0")
    with (
        start_server(config) as running,
        grpc.insecure_channel(f"127.0.0.1:{running.health_port}") as channel,
    ):
        eventually(lambda: check(channel) == NOT_SERVING, 5.0)


@pytest.mark.parametrize("strict", [False, True])
def test_registry_outage_health(
    strict: bool, devca: ServerFiles, registry: Path, make_client: MakeClient
) -> None:
    config = ServerConfig(
        "127.0.0.1:0", devca.cert, devca.key, str(registry),
        health_listen="127.0.0.1:0", registry_outage_unhealthy=strict,
    )  # fmt: skip
    with (
        start_server(config) as running,
        grpc.insecure_channel(f"127.0.0.1:{running.health_port}") as channel,
    ):
        assert (check(channel), check(channel, "pinrpc.registry")) == (SERVING, SERVING)
        for path in registry.parent.glob(registry.name + "*"):
            path.unlink()
        running.trust.poll()
        assert check(channel, "pinrpc.registry") == NOT_SERVING
        assert check(channel) == (NOT_SERVING if strict else SERVING)
        assert check(channel, "pinrpc.v1.Echo") == (NOT_SERVING if strict else SERVING)


def test_unknown_service_names_are_not_found_and_leave_nothing_behind(
    with_probe: RunningServer,
) -> None:
    # grpc_health keeps a key per name ever watched; the probe port needs no certificate.
    remembered = with_probe.health.servicer._send_response_callbacks
    invented = health_pb2.HealthCheckRequest(service="invented")
    with grpc.insecure_channel(f"127.0.0.1:{with_probe.health_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(invented, timeout=5)
        assert code_of(lambda: next(watch)) == grpc.StatusCode.NOT_FOUND
        assert code_of(lambda: stub.Check(invented, timeout=5)) == grpc.StatusCode.NOT_FOUND
    assert "invented" not in remembered


@pytest.mark.parametrize("service", ["", "pinrpc.v1.Echo", "pinrpc.registry"])
def test_known_service_names_are_checked_and_watched(
    service: str, with_probe: RunningServer
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{with_probe.health_port}") as channel:
        assert check(channel, service) == SERVING
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        assert next(watch).status == SERVING
        with_probe.health.set(serving=False, registry_ok=False)  # as an expired certificate does
        assert next(watch).status == NOT_SERVING
        watch.cancel()


def test_a_watch_that_ends_while_another_is_sent_to_stops_nothing(
    with_probe: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """grpc_health sends under its lock, each send waiting for gRPC's serving thread, and its
    end-of-Watch callback takes that lock: run on the serving thread, it blocked both for
    good (a whole-suite run hung in a server's stop). The end here waits for the lock at most
    5 s, so that the old code fails this test instead of hanging it."""
    servicer = with_probe.health.servicer
    ending, stuck = threading.Event(), list[str]()
    make_end = health.HealthServicer._on_close_callback

    def observed_end(self: health.HealthServicer, send: Any, service: str) -> Callable[[], None]:
        end = make_end(self, send, service)

        def waiting_end() -> None:
            ending.set()
            if not self._lock.acquire(timeout=5):
                stuck.append(threading.current_thread().name)
                return
            try:
                end()
            finally:
                self._lock.release()

        return waiting_end

    monkeypatch.setattr(health.HealthServicer, "_on_close_callback", observed_end)
    with grpc.insecure_channel(f"127.0.0.1:{with_probe.health_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        ended, kept = (stub.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(2))
        assert next(ended).status == next(kept).status == SERVING
        seen = []

        def send_while_one_ends() -> None:
            with servicer._lock:  # as a send holds it
                ended.cancel()
                seen.append(ending.wait(10))  # the end waits for the lock
                with_probe.health.set(serving=False, registry_ok=True)  # sends to kept

        sender = threading.Thread(target=send_while_one_ends)
        sender.start()
        sender.join(30)
        assert seen == [True] and not sender.is_alive()
        assert stuck == [], "the end of a Watch held gRPC's serving thread"
        assert next(kept).status == NOT_SERVING
        kept.cancel()


INVENTORY = "shop.v1.Inventory"  # a library user's own service


@pytest.fixture
def served_health() -> Iterator[tuple[Health, int]]:
    """Health as start_server builds it for a server that also serves INVENTORY, on a real
    plaintext port (as the probe port is; the mTLS port adds the same servicer)."""
    health = Health(["pinrpc.v1.Admin", INVENTORY])
    health.set(serving=True, registry_ok=True)
    with ThreadPoolExecutor(2) as pool:
        server = grpc.server(pool)
        health.add_to(server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            yield health, port
        finally:
            server.stop(None).wait()


@pytest.mark.parametrize("service", [INVENTORY, "pinrpc.v1.Admin"])
def test_every_served_service_is_checked_and_watched_as_the_whole_server(
    service: str, served_health: tuple[Health, int]
) -> None:
    # Only "" and pinrpc.v1.Echo were answered: probing your own service by name, the usual
    # gRPC practice, was NOT_FOUND.
    health, port = served_health
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        assert check(channel, service) == SERVING
        request = health_pb2.HealthCheckRequest(service=service)
        watch = health_pb2_grpc.HealthStub(channel).Watch(request, timeout=5)
        assert next(watch).status == SERVING
        health.set(serving=False, registry_ok=True)
        assert next(watch).status == NOT_SERVING
        assert check(channel, service) == check(channel) == NOT_SERVING
        watch.cancel()


@pytest.mark.parametrize("service", ["shop.v1.Invented", "shop.v1.inventory", "shop.v1"])
def test_a_name_the_server_does_not_serve_is_still_not_found(
    service: str, served_health: tuple[Health, int]
) -> None:
    health, port = served_health
    request = health_pb2.HealthCheckRequest(service=service)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert code_of(lambda: stub.Check(request, timeout=5)) == grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(request, timeout=5)
        assert code_of(lambda: next(watch)) == grpc.StatusCode.NOT_FOUND
    assert service not in health.servicer._send_response_callbacks
