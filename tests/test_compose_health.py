"""The compose demo's server healthcheck: the exact command, run against real servers.

scripts/compose-smoke runs it in Docker; this runs it here, in seconds, including the states
the demo never reaches (NOT_SERVING, nothing listening), which must make it exit non-zero.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.app import RunningServer, start_server
from server.config import ServerConfig
from tests.conftest import ServerFiles

ROOT = Path(__file__).resolve().parent.parent
PROBE = "127.0.0.1:8081"  # the server's --health-listen in docker-compose.yml


def _exec_form(text: str, prefix: str) -> list[str]:
    """The one health probe, in JSON exec form, on a line starting with prefix."""
    lines = (s.strip() for s in text.splitlines())
    (line,) = (s for s in lines if s.startswith(prefix) and "HealthStub" in s)
    command: list[str] = json.loads(line.removeprefix(prefix).strip())
    return command


def compose_check() -> list[str]:
    return _exec_form((ROOT / "docker-compose.yml").read_text(), "test:")


def test_the_demo_probes_grpc_health_as_docs_operations_says() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    check = compose_check()
    assert check[:3] == ["CMD", "python3", "-c"] and len(check) == 4
    assert check[3].count(PROBE) == 1
    assert f"- --health-listen={PROBE}\n" in compose
    assert "- --unhealthy-without-registry\n" in compose
    operations = (ROOT / "docs" / "OPERATIONS.md").read_text()
    assert _exec_form(operations, "CMD") == check[1:]
    # The CI override replaces pebble's image only; the server and its healthcheck stay.
    ci = (ROOT / "docker-compose.ci.yml").read_text()
    assert re.findall(r"^  (\S+):$", ci, re.M) == ["pebble"]


def run_check(port: int) -> subprocess.CompletedProcess[str]:
    code = compose_check()[3].replace(PROBE, f"127.0.0.1:{port}")
    # sys.executable for python3: the image's venv holds the same grpcio and health package.
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )


@pytest.fixture
def demo_server(devca: ServerFiles, registry: Path) -> Iterator[RunningServer]:
    """Started as docker-compose.yml starts it (the probe port on an ephemeral port)."""
    config = ServerConfig(
        "127.0.0.1:0", devca.cert, devca.key, str(registry),
        health_listen="127.0.0.1:0", registry_outage_unhealthy=True,
    )  # fmt: skip
    with start_server(config) as running:
        yield running


def test_serving_passes(demo_server: RunningServer) -> None:
    assert demo_server.health_port
    done = run_check(demo_server.health_port)
    assert done.returncode == 0, done.stderr


def test_unreadable_registry_fails(demo_server: RunningServer, registry: Path) -> None:
    assert demo_server.health_port
    for path in registry.parent.glob(registry.name + "*"):
        path.unlink()
    demo_server.trust.poll()  # the 0.2 s poll, now
    done = run_check(demo_server.health_port)
    assert done.returncode == 1 and done.stderr == ""  # an answer: NOT_SERVING


def test_the_mtls_port_fails(demo_server: RunningServer) -> None:
    # A server without a probe port answers plaintext on no port; its TLS port refuses it.
    done = run_check(demo_server.port)
    assert done.returncode != 0 and "StatusCode.UNAVAILABLE" in done.stderr


def test_nothing_listening_fails() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        done = run_check(port)
    assert done.returncode != 0 and "StatusCode.UNAVAILABLE" in done.stderr
