"""A stranger on the plaintext probe port calls Health/List, which the server does not serve:
refused, without writing the server's log (a real `pinrpc-server serve`)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import ServerFiles, code_of
from tests.security.attacker import serve_process

_CALLS = 200  # each was a 14-line ERROR traceback: 2,928 calls in 2 s wrote 41,000 lines


def _probe_port(log: Path) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        match = re.search(r"plaintext health probes on \S+ \(port (\d+)\)", log.read_text())
        if match:
            return int(match.group(1))
        time.sleep(0.05)
    raise AssertionError(log.read_text())


def test_list_on_the_probe_port_is_refused_without_a_log_line(
    devca: ServerFiles, registry: Path, tmp_path: Path
) -> None:
    extra = ("--health-listen", "127.0.0.1:0")
    with serve_process(devca.cert, devca.key, registry, tmp_path / "serve.log", *extra) as server:
        port = _probe_port(server.log)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            # The allow beside it: the probe's own call is answered.
            serving = stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert serving == health_pb2.HealthCheckResponse.SERVING
            before = server.log.read_text()
            for _ in range(_CALLS):
                listing = code_of(lambda: stub.List(health_pb2.HealthListRequest(), timeout=5))
                assert listing == grpc.StatusCode.UNIMPLEMENTED
        # Not a fixed settle time, which a loaded machine can outlast: a server that exited
        # has passed on every line it would write (its helper's too), plus one "stopping".
        assert server.terminate() == 0
        written = server.log.read_text()[len(before) :]
        assert "Traceback" not in written and written.count("\n") < 5, written[:2000]
