"""--tls-reload handover under faults: a broken registry row, many handovers, no /proc."""

from __future__ import annotations

import collections
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from server.app import start_server
from server.server_cert import ServerCert
from tests.certs import certbot_link
from tests.conftest import (
    ECHO_ALL,
    SERVER_NAME,
    Connect,
    MakeClient,
    ServerFiles,
    code_of,
    enroll,
    eventually,
    first_line,
    require_tool,
    revoke,
)
from tests.ports import free_port
from tests.test_handover import MAX_AGE, fresh_call, handover_config, settle, slow_listener


def corrupt_certificate(registry: Path, name: str) -> None:
    """A row whose certificate does not parse (a hand-edited or damaged registry)."""
    with sqlite3.connect(registry) as db:
        db.execute("UPDATE clients SET cert_pem = ? WHERE name = ?", ("garbage", name))


def test_a_malformed_certificate_in_the_registry_stops_neither_revocations_nor_enrollments(
    devca: ServerFiles, registry: Path, make_client: MakeClient
) -> None:
    alice, bob, carol = make_client("alice"), make_client("bob"), make_client("carol")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    with start_server(handover_config(registry, devca.cert, devca.key)) as running:
        connect = Connect(running, devca)
        assert fresh_call(connect, alice).caller == "alice"
        enroll(registry, bob.cert_path, "bob", ECHO_ALL)
        corrupt_certificate(registry, "bob")
        enroll(registry, carol.cert_path, "carol", ECHO_ALL)
        running.trust.poll()
        settle(connect)
        # The broken row is left out; everyone else is served, and a revocation still bites.
        assert fresh_call(connect, carol).caller == "carol"
        assert code_of(lambda: fresh_call(connect, bob)) == grpc.StatusCode.UNAVAILABLE
        revoke(registry, "alice")
        running.trust.poll()
        assert code_of(lambda: fresh_call(connect, alice)) == grpc.StatusCode.PERMISSION_DENIED


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_thirty_handovers_leave_no_server_thread_or_descriptor_behind(
    devca: ServerFiles, registry: Path, make_client: MakeClient, tmp_path: Path
) -> None:
    live = tmp_path / "live" / SERVER_NAME
    certbot_link(live, *devca.ca.issue([SERVER_NAME]).write(tmp_path / "v0"), 0)
    alice = make_client("alice")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    config = handover_config(registry, live / "fullchain.pem", live / "privkey.pem")
    with start_server(config) as running:
        connect = Connect(running, devca)
        assert fresh_call(connect, alice).caller == "alice"
        threads, fds = threading.active_count(), open_fds()
        for version in range(1, 31):  # a renewal each: every one is a handover
            certbot_link(
                live, *devca.ca.issue([SERVER_NAME]).write(tmp_path / f"v{version}"), version
            )
            running.trust.poll()
            settle(connect)
            assert fresh_call(connect, alice).caller == "alice"
        assert running.listener.handovers == 30
        eventually(lambda: running.listener.draining == 0, timeout=1.1 * MAX_AGE + 1.0 + 5)
        eventually(lambda: threading.active_count() <= threads + 2, timeout=5)
        eventually(lambda: open_fds() <= fds + 4, timeout=5)
        print(f"threads {threads} -> {threading.active_count()}, fds {fds} -> {open_fds()}")


WITHOUT_PROC = """
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from server.app import start_server
from server.server_cert import ServerCert
from tests.conftest import ECHO_ALL, enroll
from tests.test_handover import fresh_call, handover_config

assert not Path("/proc/self").exists()
registry, cert, key, ca, alice_key, alice_cert, bob_key, bob_cert = map(Path, sys.argv[1:])
alice = SimpleNamespace(key_path=alice_key, cert_path=alice_cert)
bob = SimpleNamespace(key_path=bob_key, cert_path=bob_cert)
with start_server(handover_config(registry, cert, key)) as running:
    target = (f"127.0.0.1:{running.port}", ca)
    assert fresh_call(target, alice).caller == "alice"
    enroll(registry, bob.cert_path, "bob", ECHO_ALL)
    running.trust.poll()
    running.listener.refresh()  # or waits for the builder thread's
    assert not running.listener.stale() and running.listener.handovers == 1
    for _ in range(6):  # the old listener is gone, not left accepting
        assert fresh_call(target, bob).caller == "bob"
print("served without /proc")
"""


def test_a_handover_without_proc_stops_the_old_server_instead(
    devca: ServerFiles, registry: Path, make_client: MakeClient, tmp_path: Path
) -> None:
    """No /proc (a container without it): the documented fallback, not a crash at start."""
    require_tool(shutil.which("unshare") is not None and os.geteuid() == 0, "unshare", "root")
    alice, bob = make_client("alice"), make_client("bob")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    script = tmp_path / "without_proc.py"
    script.write_text(WITHOUT_PROC)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    paths = [registry, devca.cert, devca.key, devca.ca_path]
    paths += [alice.key_path, alice.cert_path, bob.key_path, bob.cert_path]
    mounted = 'mount -t tmpfs none /proc && exec "$0" "$@"'  # this mount namespace only
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", mounted, sys.executable, script, *map(str, paths)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and "served without /proc" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize(
    ("listen", "targets"),
    [("[::1]:0", ["[::1]"]), ("localhost:0", ["127.0.0.1", "[::1]"])],
)
def test_a_handover_keeps_the_port_on_every_address(
    devca: ServerFiles, registry: Path, make_client: MakeClient, listen: str, targets: list[str]
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    config = replace(handover_config(registry, devca.cert, devca.key), listen=listen)
    with start_server(config) as running:
        connect = Connect(running, devca)
        connect.enroll(bob, "bob", ECHO_ALL)
        assert settle(connect) == 1
        for host in targets:  # an old listener left accepting would fail about half of these
            for _ in range(8):
                assert fresh_call((f"{host}:{running.port}", devca.ca_path), bob).caller == "bob"


SLOW_START = """
import sys, time
from pathlib import Path

from server.listener import ListenError
from tests.conftest import ServerFiles
from tests.test_handover import slow_listener

registry, cert, key, address = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
with slow_listener(ServerFiles(None, cert, cert, key), registry) as (served, _, slow):
    slow.set()  # a 2 s build, as 10,000 roots take
    try:
        served.start(address)
    except ListenError as exc:
        print(exc, flush=True)
        sys.exit(1)
    print("started", flush=True)
    sys.stdin.read()  # still serving until the test has both outcomes
"""


def test_a_server_that_prints_nothing_fails_the_wait_instead_of_hanging() -> None:
    silent = [sys.executable, "-c", "import time; time.sleep(60)"]
    with subprocess.Popen(silent, stdout=subprocess.PIPE, text=True) as process:
        started = time.monotonic()
        with pytest.raises(AssertionError, match="no line from pid"):
            first_line(process, started + 1)
        assert time.monotonic() - started < 10 and process.wait(10) != 0


def test_two_servers_started_together_never_share_a_port(
    devca: ServerFiles, registry: Path, make_client: MakeClient, tmp_path: Path
) -> None:
    """Both pass the start-up check while their roots load (seconds at 10,000 clients), then
    both bind with SO_REUSEPORT: without a second look they would split the connections."""
    enroll(registry, make_client("alice").cert_path, "alice", ECHO_ALL)
    address = f"127.0.0.1:{free_port()}"
    script = tmp_path / "slow_start.py"
    script.write_text(SLOW_START)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    argv = [sys.executable, str(script), str(registry), str(devca.cert), str(devca.key), address]
    servers = [
        subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in "12"
    ]
    # Each first line, while a started one still serves: a fixed hold (it was 3 s) could end
    # before a process started late on a loaded machine (1-3 s each) binds and looks.
    try:
        outcomes = sorted(first_line(server, time.monotonic() + 60) for server in servers)
    finally:
        for server in servers:
            server.communicate(timeout=60)  # closes its stdin: a started one stops
    # Each looks after its own bind, so the later one always sees the earlier. If both bound
    # before either looked (it happened under load), both give up: safe, never shared.
    assert outcomes[0] == f"cannot listen on {address}: address in use", outcomes
    assert outcomes[1] in ("started", outcomes[0]), outcomes


def test_a_renewal_with_a_key_grpc_cannot_serve_is_refused_not_retried(
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """cryptography reads a secp256k1 key, BoringSSL refuses it: every handover build failed
    (a full load of the roots, retried at every poll) while the old listener served on."""
    live = tmp_path / "live" / SERVER_NAME
    certbot_link(live, *devca.ca.issue([SERVER_NAME]).write(tmp_path / "v1"), 1)
    alice = make_client("alice")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    config = handover_config(registry, live / "fullchain.pem", live / "privkey.pem")
    with caplog.at_level(logging.ERROR), start_server(config) as running:
        connect = Connect(running, devca)
        odd = devca.ca.issue([SERVER_NAME], key=ec.generate_private_key(ec.SECP256K1()))
        certbot_link(live, *odd.write(tmp_path / "v2"), 2)
        running.trust.poll()
        assert not running.listener.stale()  # nothing to build: the renewal was refused
        assert fresh_call(connect, alice).caller == "alice"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    refused = f"{live / 'privkey.pem'} is an ECDSA key on secp256k1, which gRPC cannot serve"
    assert any(refused in e for e in errors), errors
    assert not any("handover failed" in e for e in errors), errors


def test_a_failing_build_is_not_retried_at_every_poll(
    devca: ServerFiles, registry: Path, make_client: MakeClient
) -> None:
    """A server certificate gRPC refuses, however it got past the loader: the old listener
    serves on, and the build (a full load of the roots) waits for a change or a long pause."""
    alice = make_client("alice")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    builds = collections.Counter[str]()
    with slow_listener(devca, registry, builds=builds) as (served, trust, _):
        served.start("127.0.0.1:0")
        assert builds["built"] == 1
        k1 = devca.ca.issue([SERVER_NAME], key=ec.generate_private_key(ec.SECP256K1()))
        chain, key = k1.write(devca.cert.parent.parent / "secp256k1")  # a fresh directory
        trust.server_cert = ServerCert(chain.read_bytes(), key.read_bytes(), k1.leaf)
        trust.changed.set()
        eventually(lambda: builds["built"] == 2, timeout=10)  # the one attempt after the change
        time.sleep(2.0)  # 10 polls of the builder thread, none of which may try again
        assert builds["built"] == 2, builds
        target = (f"127.0.0.1:{served.port}", devca.ca_path)
        assert fresh_call(target, alice).caller == "alice" and served.handovers == 0
