"""Security fixtures: the usual in-process server, with a spy that counts handler entries.

A call that reaches a servicer method has passed the TLS handshake and the per-call check, so
"the handler count did not move" is the strongest evidence that an attack got nowhere.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pinrpc.v1 import echo_pb2
from server.app import RunningServer, start_server
from server.config import ServerConfig
from server.services import EchoService
from tests.conftest import ServerFiles


class HandlerCalls:
    """How many WhoAmI calls reached the servicer, and as whom."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.names: list[str] = []

    def add(self, name: str) -> None:
        with self._lock:
            self.names.append(name)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.names)


@pytest.fixture
def handler_calls(monkeypatch: pytest.MonkeyPatch) -> HandlerCalls:
    calls = HandlerCalls()
    original = EchoService.WhoAmI

    def counting(
        self: EchoService, request: echo_pb2.WhoAmIRequest, context: grpc.ServicerContext
    ) -> echo_pb2.WhoAmIResponse:
        response = original(self, request, context)
        calls.add(response.name)
        return response

    # Patched on the class before the server registers its bound methods.
    monkeypatch.setattr(EchoService, "WhoAmI", counting)
    return calls


@pytest.fixture
def server(
    devca: ServerFiles, registry: Path, handler_calls: HandlerCalls
) -> Iterator[RunningServer]:
    """tests/conftest.py's server, started after the spy is in place."""
    config = ServerConfig(
        listen="127.0.0.1:0",
        cert=devca.cert,
        key=devca.key,
        registry=str(registry),
        poll_interval=0.1,
        grace=1.0,
    )
    with start_server(config) as running:
        yield running
