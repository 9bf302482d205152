"""The audit's limits: calls cannot crowd out changes, and no drop goes unreported."""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest

from pinrpc import secure_channel
from pinrpc.v1 import echo_pb2, echo_pb2_grpc
from server import audit as audit_module
from server import cli as server_cli
from server import metrics as metrics_module
from server.app import RunningServer, start_server
from server.audit import Audit
from server.config import ServerConfig
from server.ratelimit import MAX_BURST, burst_for
from tests.conftest import (
    ECHO_ALL,
    SERVER_NAME,
    Connect,
    MakeClient,
    ServerFiles,
    code_of,
    enroll,
    revoke,
)
from tests.security.attacker import serve_process
from tests.test_observe import audit_lines, observed, scrape, written  # noqa: F401 (a fixture)
from tests.test_server import SERVE_UNCHECKED


def events(lines: list[dict[str, object]], event: str) -> list[dict[str, object]]:
    return [line for line in lines if line["event"] == event]


# -- finding: one bucket for everything let a flood of calls push changes out --------------------


def test_a_flood_of_denials_cannot_push_a_revocation_out_of_the_trail(
    devca: ServerFiles, registry: Path, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    enroll(registry, bob.cert_path, "bob")  # WhoAmI only: every Echo is refused
    config = ServerConfig("127.0.0.1:0", devca.cert, devca.key, str(registry), audit_rate=1)
    stop = threading.Event()
    with start_server(config) as running, caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        stub = Connect(running, devca).stub(bob.cert_path, bob.key_path)

        def flood() -> None:
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline:
                code_of(lambda: stub.Echo(echo_pb2.EchoRequest(message="x"), timeout=5))

        flooders = [threading.Thread(target=flood) for _ in range(2)]
        for thread in flooders:
            thread.start()
        try:
            deadline = time.monotonic() + 10
            while running.audit.suppressed < 20:  # the calls' bucket is empty
                assert time.monotonic() < deadline, "the flood was not limited"
                time.sleep(0.01)
            revoke(registry, "alice")
            running.trust.poll()
        finally:
            stop.set()
            for thread in flooders:
                thread.join(10)
        lines = audit_lines(caplog, running.audit)
    [revoked] = events(lines, "revoke")
    assert revoked["client"] == "alice" and int(str(revoked["suppressed_before"])) >= 20
    denials = [line for line in lines if line.get("decision") == "deny"]
    assert 4 <= len(denials) <= 20  # burst of 4, then about one a second


def test_calls_and_changes_are_limited_each_by_a_bucket_of_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    audit = Audit(rate=0.001, burst=2)
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        for i in range(5):
            audit.event("call", n=i)
        for i in range(5):
            audit.event("enroll", n=i)
        lines = audit_lines(caplog, audit)
    assert [(line["event"], line["n"]) for line in lines] == [
        ("call", 0), ("call", 1), ("enroll", 0), ("enroll", 1),
    ]  # fmt: skip
    assert lines[2]["suppressed_before"] == 3 and audit.suppressed == 3


def test_revocations_and_retirements_pass_a_spent_bucket(caplog: pytest.LogCaptureFixture) -> None:
    # Any enrolled client can spend the changes' bucket by rotating (tests/test_ops_audit.py).
    audit = Audit(rate=0.001, burst=1)
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        for event in ("enroll", "rotate", "revoke", "retire", "permit"):
            audit.event(event)
        lines = audit_lines(caplog, audit)
    assert [line["event"] for line in lines] == ["enroll", "rotate", "revoke", "retire"]
    assert audit.suppressed == 1  # the permit: enroll spent the operator's bucket


def test_rotations_and_enrollment_requests_cannot_push_the_operators_changes_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Any enrolled client may rotate and any host may request enrollment: in one bucket with
    # the operator's changes, a flood of them dropped the admin's enroll and permit lines.
    audit = Audit(rate=0.001, burst=2)
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        for i in range(5):
            audit.event("rotate", n=i)
            audit.event("enrollment_request", n=i)
        for event in ("admin", "enroll", "permit"):
            audit.event(event)
        lines = audit_lines(caplog, audit)
    assert [line["event"] for line in lines][-2:] == ["admin", "enroll"]
    assert len(lines) == 4 and lines[2]["suppressed_before"] == 8  # 8 of the flood
    assert audit.suppressed == 1  # the permit: admin and enroll spent the operator's bucket


def test_calls_filling_the_queue_leave_room_for_changes(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_module, "MAX_QUEUED", 3)
    audit = Audit(rate=1000, burst=1000)
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        for i in range(5):
            audit.event("call", n=i)
        for i in range(5):
            audit.event("enroll", n=i)
        lines = audit_lines(caplog, audit)
    assert [line["event"] for line in lines] == ["call"] * 3 + ["enroll"] * 3
    assert audit.suppressed == 2


# -- finding: the count of dropped lines was lost when no later line came -----------------------


def test_sigterm_writes_the_count_of_dropped_lines(
    devca: ServerFiles, registry: Path, make_client: MakeClient, tmp_path: Path
) -> None:
    bob = make_client("bob")
    enroll(registry, bob.cert_path, "bob")
    log = tmp_path / "server.log"
    flags = ("--audit-rate", "1", "--log-format", "json")
    with serve_process(devca.cert, devca.key, registry, log, *flags) as server:
        target = f"127.0.0.1:{server.port}"
        channel = secure_channel(target, bob.cert_path, bob.key_path, devca.ca_path, SERVER_NAME)
        stub = echo_pb2_grpc.EchoStub(channel)
        for _ in range(20):
            denied = lambda: stub.Echo(echo_pb2.EchoRequest(message="x"), timeout=5)  # noqa: E731
            assert code_of(denied) == grpc.StatusCode.PERMISSION_DENIED
        channel.close()
        assert server.terminate() == 0
    records = (json.loads(line) for line in log.read_text().splitlines() if line.startswith("{"))
    lines = [record for record in records if record["logger"] == "pinrpc.audit"]
    denials = [line for line in lines if line.get("decision") == "deny"]
    reported = events(lines, "audit_suppressed")
    assert len(reported) == 1 and lines[-1] is reported[0]
    assert len(denials) + sum(int(str(line.get("suppressed_before", 0))) for line in lines) == 20


def test_drops_no_later_line_reports_get_a_line_of_their_own_once_they_stop(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_module, "REPORT_AFTER", 0.3)
    audit = Audit(rate=0.001, burst=1)
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        # Dropping all along: the count is not final yet. Each drop is followed by a flush
        # here, not by the writer's clock: a pause of REPORT_AFTER between two drops (a loaded
        # machine) would make the count final and rightly reported.
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            audit.event("call", n=1)
            audit.flush()
            time.sleep(0.02)
        assert [line["event"] for line in audit_lines(caplog, audit)] == ["call"]
        dropped = audit.suppressed
        audit.start()
        try:
            deadline = time.monotonic() + 10
            while len(written(caplog)) < 2:  # the writer reports them once they have stopped
                assert time.monotonic() < deadline, "the drops were never reported"
                time.sleep(0.05)
        finally:
            audit.stop()
        lines = [json.loads(r.getMessage()) for r in written(caplog)]
    assert lines[1] == {"time": lines[1]["time"], "event": "audit_suppressed",
                        "suppressed_before": dropped}  # fmt: skip
    assert len(lines) == 2 and audit.suppressed == 0  # reported once, and stop() adds nothing


# -- finding: --metrics-listen with port 0 logged port 0 ------------------------------------------


def test_the_metrics_line_names_the_port_bound(
    devca: ServerFiles, registry: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = ServerConfig(
        "127.0.0.1:0", devca.cert, devca.key, str(registry), metrics_listen="127.0.0.1:0"
    )
    with caplog.at_level(logging.INFO, logger="pinrpc.server"), start_server(config) as running:
        assert running.metrics_port
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("metrics on")]
        assert said == [f"metrics on http://127.0.0.1:{running.metrics_port}/metrics"]
        assert scrape(running)["pinrpc_enrolled_clients"] == 0  # and it is served there


# -- finding: --audit-rate 1e308 passed the flag and crashed serve --------------------------------


@pytest.mark.parametrize("value", ["1e308", "1000001", "inf"])
def test_an_audit_rate_above_the_maximum_is_a_usage_error_from_flag_or_environment(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in ([*SERVE_UNCHECKED, "--audit-rate", value], SERVE_UNCHECKED):
        if argv is SERVE_UNCHECKED:
            monkeypatch.setenv("PINRPC_AUDIT_RATE", value)
        with pytest.raises(SystemExit) as info:
            server_cli.main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "argument --audit-rate:" in err and "Traceback" not in err


def test_the_maximum_audit_rate_is_taken_from_flag_or_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parse = server_cli.build_parser().parse_args
    assert parse([*SERVE_UNCHECKED, "--audit-rate", "1e6"]).audit_rate == 1e6
    monkeypatch.setenv("PINRPC_AUDIT_RATE", "1000000")
    assert server_cli.build_parser().parse_args(SERVE_UNCHECKED).audit_rate == 1e6


def test_burst_for_any_rate_is_an_int() -> None:
    assert [burst_for(rate) for rate in (0.1, 0.25, 50, 1e6)] == [1, 1, 200, 4_000_000]
    assert burst_for(1e308) == burst_for(math.inf) == MAX_BURST


# -- finding: each idle metrics connection held a thread for good ---------------------------------


def idle(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes the connection (sending nothing) within ``seconds``."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    finally:
        sock.close()


def test_an_idle_metrics_connection_is_closed_and_scrapes_still_work(
    observed: RunningServer,  # noqa: F811 (the fixture imported above)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics_module, "CONNECTION_TIMEOUT", 1.0)
    assert observed.metrics_port
    connected = time.monotonic()
    sock = idle(observed.metrics_port)
    assert scrape(observed)["pinrpc_enrolled_clients"] == 0  # beside the idle connection
    scraped = time.monotonic()
    assert closed_within(sock, 5)
    # Not at once: a full second after the connection; and not after the default 5 s. Each
    # bound from its own side of the scrape, which a loaded machine can make last a second.
    assert time.monotonic() - connected >= 1.0 and time.monotonic() - scraped < 3


def test_metrics_connections_beyond_the_maximum_are_closed_at_once(
    observed: RunningServer,  # noqa: F811 (the fixture imported above)
) -> None:
    assert observed.metrics_port
    socks = [idle(observed.metrics_port) for _ in range(metrics_module.MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)  # each accepted, each holding its thread
        assert closed_within(idle(observed.metrics_port), 2)
    finally:
        for sock in socks:
            sock.close()
    deadline = time.monotonic() + 5
    while True:  # the threads end with their connections
        try:
            assert scrape(observed)["pinrpc_enrolled_clients"] == 0
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
