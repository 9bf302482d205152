"""SIGTERM to a real `pinrpc-server serve`: in-flight calls finish, new ones are refused."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

from pinrpc.channel import secure_channel
from pinrpc.v1 import echo_pb2, echo_pb2_grpc
from tests.conftest import (
    ECHO_ALL,
    SERVER_NAME,
    MakeClient,
    ServerFiles,
    enroll,
    eventually,
    whoami,
)
from tests.security.attacker import BIN, serve_process

GRACE = 5.0  # ServerConfig.grace, which `pinrpc-server serve` uses


def listing(registry: Path) -> object:
    done = subprocess.run(
        [str(BIN / "pinrpc-server"), "list", "--json", "--registry", str(registry)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return json.loads(done.stdout)


def test_sigterm_lets_an_open_stream_finish_and_refuses_new_calls(
    devca: ServerFiles, make_client: MakeClient, registry: Path, tmp_path: Path
) -> None:
    alice = make_client("alice")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    before = listing(registry)
    with serve_process(devca.cert, devca.key, registry, tmp_path / "server.log") as server:
        target = f"127.0.0.1:{server.port}"

        def channel() -> grpc.Channel:
            return secure_channel(
                target, alice.cert_path, alice.key_path, devca.ca_path, SERVER_NAME
            )

        outbox: queue.Queue[str | None] = queue.Queue()

        def requests() -> Iterator[echo_pb2.EchoRequest]:
            # Bounded: each get times out, so a stuck test cannot hang forever.
            while (message := outbox.get(timeout=10)) is not None:
                yield echo_pb2.EchoRequest(message=message)

        with channel() as open_channel:
            call = echo_pb2_grpc.EchoStub(open_channel).EchoStream(requests(), timeout=30)
            replies = iter(call)
            outbox.put("before")
            assert next(replies).message == "before"
            # The audit's writer thread runs: the stream's line is out before any shutdown.
            eventually(lambda: "first call on this connection" in server.log.read_text(), 10)

            server.process.send_signal(signal.SIGTERM)
            terminated = time.monotonic()

            def fresh_call_refused() -> bool:
                with channel() as fresh:
                    try:
                        whoami(echo_pb2_grpc.EchoStub(fresh))
                    except grpc.RpcError as exc:
                        code = exc.code()
                    else:
                        return False  # the signal is not handled yet
                if code == grpc.StatusCode.CANCELLED:
                    return False  # connected just before the listener closed: try again
                assert code == grpc.StatusCode.UNAVAILABLE, code
                return True

            # New connections are refused while the stream is still open.
            eventually(fresh_call_refused, timeout=GRACE / 2)
            # The in-flight stream keeps working, slowly, within the grace period.
            for message in ("during-1", "during-2"):
                time.sleep(0.5)
                outbox.put(message)
                assert next(replies).message == message
            outbox.put(None)
            assert list(replies) == []
            assert call.code() == grpc.StatusCode.OK
            assert time.monotonic() - terminated < GRACE

        assert server.process.wait(timeout=GRACE + 10) == 0
    log = server.log.read_text()
    assert "stopping: finishing in-flight calls" in log
    assert "Traceback" not in log
    assert listing(registry) == before
