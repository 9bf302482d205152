"""Load and soak against a real `pinrpc-server serve`: every decision right, memory flat.

Eight enrolled clients make mixed unary and streaming calls, each on its own channel. Part way
through, one of them is revoked and a ninth client is enrolled, both with the admin CLI while
the load runs. Every call is judged: the revoked client must fail from revocation + 1 s on,
everyone else must never fail (the ninth from its first admitted call on: how soon it is
admitted is a benchmark target, scripts/bench, not this test's). The server's RSS is sampled
from /proc throughout.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from pinrpc.channel import secure_channel
from pinrpc.identity import KeyPairFiles
from pinrpc.v1 import echo_pb2, echo_pb2_grpc
from tests.conftest import ECHO_ALL, SERVER_NAME, MakeClient, ServerFiles, enroll, eventually
from tests.security.attacker import BIN, ServerProcess, serve_process

CLIENTS = 8
CALLS = int(os.environ.get("PINRPC_SOAK_CALLS", "2000"))  # per client
REVOKED, LATE = "c7", "late"
LAG = 1.0  # a revocation must bite within this many seconds (SECURITY.md)


@dataclass(frozen=True)
class Outcome:
    client: str
    started: float
    ok: bool
    code: grpc.StatusCode


class Load:
    def __init__(self, devca: ServerFiles, target: str) -> None:
        self.devca, self.target = devca, target
        self.outcomes: list[Outcome] = []
        self.done = 0
        self._lock = threading.Lock()

    def run(self, name: str, files: KeyPairFiles, calls: int) -> None:
        channel = secure_channel(
            self.target, files.cert_path, files.key_path, self.devca.ca_path, SERVER_NAME
        )
        stub = echo_pb2_grpc.EchoStub(channel)
        with channel:
            for i in range(calls):
                started = time.monotonic()
                try:
                    if i % 4 == 3:  # every fourth call streams three messages
                        messages = [
                            echo_pb2.EchoRequest(message=f"{name}-{i}-{j}") for j in range(3)
                        ]
                        replies = list(stub.EchoStream(iter(messages), timeout=10))
                        assert [r.caller for r in replies] == [name] * 3
                    else:
                        reply = stub.Echo(echo_pb2.EchoRequest(message=f"{name}-{i}"), timeout=10)
                        assert (reply.message, reply.caller) == (f"{name}-{i}", name)
                    outcome = Outcome(name, started, True, grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    outcome = Outcome(name, started, False, exc.code())
                with self._lock:
                    self.outcomes.append(outcome)
                    self.done += 1


def admitted(target: str, files: KeyPairFiles, devca: ServerFiles) -> bool:
    """One call on a channel of its own: a refused handshake must not leave a backoff behind."""
    channel = secure_channel(target, files.cert_path, files.key_path, devca.ca_path, SERVER_NAME)
    with channel:
        try:
            echo_pb2_grpc.EchoStub(channel).Echo(echo_pb2.EchoRequest(message="in?"), timeout=5)
        except grpc.RpcError:
            return False
    return True


def admin(*argv: str) -> None:
    subprocess.run([str(BIN / "pinrpc-server"), *argv], capture_output=True, timeout=60, check=True)


def sample_rss(
    server: ServerProcess, stop: threading.Event, samples: list[tuple[float, int]]
) -> None:
    while not stop.wait(0.25):
        samples.append((time.monotonic(), server.rss_kib()))


@pytest.mark.slow
def test_soak_with_revocation_and_enrollment_mid_run(
    devca: ServerFiles, make_client: MakeClient, registry: Path, tmp_path: Path
) -> None:
    clients = {f"c{i}": make_client(f"c{i}") for i in range(CLIENTS)}
    for name, files in clients.items():
        enroll(registry, files.cert_path, name, ECHO_ALL)
    late = make_client(LATE)
    total = CLIENTS * CALLS

    with serve_process(devca.cert, devca.key, registry, tmp_path / "server.log") as server:
        load = Load(devca, f"127.0.0.1:{server.port}")
        threads = [
            threading.Thread(target=load.run, args=(name, files, CALLS), daemon=True)
            for name, files in clients.items()
        ]
        stop, samples = threading.Event(), list[tuple[float, int]]()
        sampler = threading.Thread(target=sample_rss, args=(server, stop, samples), daemon=True)
        start = time.monotonic()
        sampler.start()
        for thread in threads:
            thread.start()

        deadline = start + 600
        while load.done < total * 0.4 and time.monotonic() < deadline:
            time.sleep(0.05)
        admin("revoke", REVOKED, "--registry", str(registry))
        revoked_at = time.monotonic()
        admin("enroll", str(late.cert_path), "--name", LATE, f"--allow={ECHO_ALL}",
              "--registry", str(registry))  # fmt: skip
        enrolled_at = time.monotonic()
        # The late client's load starts once it is admitted: its TLS trust is rebuilt on a
        # 2-core machine busy with this load, which can take longer than a second.
        admitted_after = eventually(lambda: admitted(load.target, late, devca), timeout=30)
        late_thread = threading.Thread(target=load.run, args=(LATE, late, CALLS // 4), daemon=True)
        late_thread.start()

        for thread in [*threads, late_thread]:
            thread.join(timeout=max(deadline - time.monotonic(), 1))
            assert not thread.is_alive(), "the load did not finish within 600 s"
        elapsed = time.monotonic() - start
        stop.set()
        sampler.join(timeout=5)
        assert server.process.poll() is None, "the server died under load"

    wrong = [
        o for o in load.outcomes
        if (o.client == REVOKED and o.ok and o.started > revoked_at + LAG)
        or (o.client != REVOKED and not o.ok)
    ]  # fmt: skip
    assert wrong == [], f"{len(wrong)} wrong decisions, first: {wrong[:5]}"
    revoked_after = [
        o for o in load.outcomes if o.client == REVOKED and o.started > revoked_at + LAG
    ]
    assert revoked_after, "the revoked client made no call after its revocation"
    assert {o.code for o in revoked_after} == {grpc.StatusCode.PERMISSION_DENIED}
    per_client = {name: sum(o.client == name for o in load.outcomes) for name in clients}
    assert per_client == dict.fromkeys(clients, CALLS)
    late_calls = [o for o in load.outcomes if o.client == LATE]
    assert len(late_calls) == CALLS // 4 and enrolled_at < late_calls[0].started

    quarter = len(samples) // 4
    first = statistics.mean(rss for _, rss in samples[:quarter])
    last = statistics.mean(rss for _, rss in samples[-quarter:])
    print(
        f"\nsoak: {len(load.outcomes)} calls in {elapsed:.1f} s = "
        f"{len(load.outcomes) / elapsed:.0f} calls/s; server RSS first quarter {first / 1024:.1f} "
        f"MiB, last quarter {last / 1024:.1f} MiB ({(last / first - 1) * 100:+.1f} %); "
        f"{len(revoked_after)} calls of the revoked client refused; the late client admitted "
        f"{admitted_after:.2f} s after its enrollment"
    )
    assert quarter >= 2, f"too few RSS samples ({len(samples)}) to compare"
    assert last < first * 1.10
