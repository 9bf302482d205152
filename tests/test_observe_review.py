"""An adversarial review of what the server tells the world about itself and its clients,
against real servers: the metrics port hammered by an unauthenticated scraper (measured on the
mTLS port it shares the GIL with), warm-start files planted by someone else, invented method
names in the audit trail, and the peer lookups a stranger's refused handshake kept on."""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from pinrpc.identity import Fingerprint, KeyPairFiles, load_certificate
from server import handshakes, observe
from server.app import RunningServer, start_server
from server.config import ServerConfig
from tests.conftest import (
    ECHO_ALL,
    SERVER_NAME,
    Connect,
    MakeClient,
    ServerFiles,
    code_of,
    enroll,
    whoami,
)
from tests.test_handover import handover_config
from tests.test_observe import lookups as peer_lookups

# Unary calls on one channel for SECONDS, from a process of its own; prints calls per second.
LOAD = """
import sys, time
from pinrpc.channel import secure_channel
from pinrpc.v1 import echo_pb2, echo_pb2_grpc
port, cert, key, ca, name, seconds = sys.argv[1:]
stub = echo_pb2_grpc.EchoStub(secure_channel(f"127.0.0.1:{port}", cert, key, ca, name))
stub.WhoAmI(echo_pb2.WhoAmIRequest(), timeout=5)
n, start = 0, time.monotonic()
while time.monotonic() - start < float(seconds) and n < 100_000:
    stub.WhoAmI(echo_pb2.WhoAmIRequest(), timeout=5)
    n += 1
print(n / (time.monotonic() - start))
"""
# Eight connections scraping in a loop, as fast as the server answers, for SECONDS.
HAMMER = """
import socket, sys, threading, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
def scrape():
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /metrics HTTP/1.0\\r\\n\\r\\n")
                while s.recv(1 << 20):
                    pass
        except OSError:
            time.sleep(0.001)
threads = [threading.Thread(target=scrape) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""
SECONDS = 1.5


@pytest.fixture
def alice(make_client: MakeClient, registry: Path) -> KeyPairFiles:
    files = make_client("alice")
    enroll(registry, files.cert_path, "alice", ECHO_ALL)
    return files


@pytest.fixture
def observed(devca: ServerFiles, registry: Path, alice: KeyPairFiles) -> Iterator[RunningServer]:
    config = ServerConfig(
        "127.0.0.1:0", devca.cert, devca.key, str(registry), metrics_listen="127.0.0.1:0"
    )
    with start_server(config) as running:
        yield running


def calls_per_second(running: RunningServer, devca: ServerFiles, alice: KeyPairFiles) -> float:
    argv = [sys.executable, "-c", LOAD, str(running.port), str(alice.cert_path),
            str(alice.key_path), str(devca.ca_path), SERVER_NAME, str(SECONDS)]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return float(done.stdout)


def hammered_share(running: RunningServer, devca: ServerFiles, alice: KeyPairFiles) -> float:
    """The mTLS port's calls per second while a stranger hammers the metrics port, as a share
    of those without; two rounds, unhammered and hammered back to back (the machine drifts)."""
    quiet = loud = 0.0
    for _ in range(2):
        quiet += calls_per_second(running, devca, alice)
        argv = [sys.executable, "-c", HAMMER, str(running.metrics_port), str(SECONDS + 1)]
        with subprocess.Popen(argv) as hammer:
            try:
                loud += calls_per_second(running, devca, alice)
            finally:
                hammer.wait(timeout=30)
    return loud / quiet


def scrape(running: RunningServer) -> str:
    url = f"http://127.0.0.1:{running.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def test_a_scraper_that_asks_for_gzip_gets_the_same_text_compressed(
    observed: RunningServer,
) -> None:
    # Prometheus sends Accept-Encoding: gzip; the exposition that bounds rendering answered
    # every scrape uncompressed (about 2 MB at 10,000 clients).
    url = f"http://127.0.0.1:{observed.metrics_port}/metrics"
    asked = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with (
        urllib.request.urlopen(url, timeout=10) as plain,
        urllib.request.urlopen(asked, timeout=10) as compressed,  # noqa: S310 - http://127.0.0.1
    ):
        assert plain.headers.get("Content-Encoding") is None  # a scraper that did not ask
        assert compressed.headers.get("Content-Encoding") == "gzip"
        text, packed = plain.read(), compressed.read()
    assert gzip.decompress(packed) == text and b"pinrpc_enrolled_clients 1.0" in text
    assert len(packed) < len(text) / 3


def test_a_hammered_metrics_port_leaves_the_mtls_port_its_calls(
    observed: RunningServer, devca: ServerFiles, alice: KeyPairFiles
) -> None:
    # Before: about a thousand scrapes a second, and 12-17 % of the calls; now 85-100 %.
    share = hammered_share(observed, devca, alice)
    assert share > 0.4, f"hammered, the mTLS port served {share:.0%} of its calls"
    # Once the hammer stops, a scrape is answered and up to date.
    before = scrape(observed)
    calls_per_second(observed, devca, alice)
    assert scrape(observed) != before


def test_a_huge_exposition_is_not_rendered_for_every_scrape(
    observed: RunningServer, devca: ServerFiles, alice: KeyPairFiles
) -> None:
    # What 10,000 enrolled clients, each refused once, leave: one rendering takes about 0.1 s.
    for i in range(10_000):
        for code in ("OK", "PERMISSION_DENIED"):
            observed.metrics.calls.inc((f"client-{i:05d}", "/pinrpc.v1.Echo/Echo", code))
    # Before: 0.2 % of the calls (about 5 a second); now 75-90 %.
    share = hammered_share(observed, devca, alice)
    assert share > 0.3, f"hammered, the mTLS port served {share:.0%} of its calls"
    assert 'client="client-09999"' in scrape(observed)


# -- the warm-start file ------------------------------------------------------------------------


WRITABLE = "owned by another user or writable by others"


def test_a_warm_file_others_may_write_is_ignored(
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    alice: KeyPairFiles,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bob = make_client("bob")
    enroll(registry, bob.cert_path, "bob", ECHO_ALL)
    # Planted by another local user: only alice first, so bob waits for the handover.
    warm_path = tmp_path / "warm"
    warm_path.write_text(f"{fingerprint_hex(alice)}\n")
    warm_path.chmod(0o666)
    config = replace(handover_config(registry, devca.cert, devca.key), warm_start=warm_path)
    with caplog.at_level(logging.INFO), start_server(config) as running:
        assert whoami(Connect(running, devca).stub(bob.cert_path, bob.key_path)).name == "bob"
    messages = [r.getMessage() for r in caplog.records]
    assert f"ignoring the warm-start file {warm_path}: {WRITABLE}" in messages, messages
    assert not any(m.startswith("warm start: trusting") for m in messages)


def test_the_servers_own_warm_file_is_read(
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    alice: KeyPairFiles,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bob = make_client("bob")
    enroll(registry, bob.cert_path, "bob", ECHO_ALL)
    warm_path = tmp_path / "warm"
    warm_path.write_text(f"{fingerprint_hex(alice)}\n")
    warm_path.chmod(0o600)
    config = replace(handover_config(registry, devca.cert, devca.key), warm_start=warm_path)
    with caplog.at_level(logging.INFO), start_server(config) as running:
        assert whoami(Connect(running, devca).stub(alice.cert_path, alice.key_path)).name
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("warm start: trusting the 1 client(s)") for m in messages)
    assert not any(m.startswith("ignoring the warm-start file") for m in messages)


def fingerprint_hex(files: KeyPairFiles) -> str:
    return Fingerprint.of(load_certificate(files.cert_path)).digest.hex()


lookups = peer_lookups  # the fixture: every peer the server asks gRPC for


# -- the audit trail ----------------------------------------------------------------------------


def test_an_invented_method_name_is_cut_short_in_the_audit_line(
    connect: Connect, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    bob = make_client("bob")
    connect.enroll(bob, "bob", "/pinrpc.v1.Echo/WhoAmI")
    channel = connect.channel(bob.cert_path, bob.key_path)
    # 6 KB of UTF-8: under gRPC's 8 KiB soft limit on the request's metadata, so the server
    # always gets it; 18 KB of JSON, and of the refusal's percent-encoded grpc-message.
    invented = "/pinrpc.v1.Echo/" + "\u00e9" * 3_000
    with caplog.at_level(logging.INFO):
        # The refusal names it cut short: whole, it passed gRPC's metadata limit, and the
        # caller got RESOURCE_EXHAUSTED instead of the refusal.
        refused = channel.unary_unary(invented, None, None)
        with pytest.raises(grpc.RpcError) as caught:
            refused(b"", timeout=5)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, caught.value.details()
        assert "... (3016 characters)" in (caught.value.details() or "")
        call = channel.unary_unary("/pinrpc.v1.Echo/Echo", None, None)
        assert code_of(lambda: call(b"", timeout=5)) == grpc.StatusCode.PERMISSION_DENIED
        connect.server.audit.flush()
    lines = [r.getMessage() for r in caplog.records if r.name == "pinrpc.audit"]
    denied = [json.loads(line) for line in lines if '"decision": "deny"' in line]
    assert [d["method"][:20] for d in denied] == [invented[:20], "/pinrpc.v1.Echo/Echo"]
    # Before: a line of 18 KB, past the 16 KiB at which log collectors split lines.
    assert denied[0]["method"].endswith("... (3016 characters)")
    assert max(len(line) for line in lines) < 2_000
    assert denied[1]["method"] == "/pinrpc.v1.Echo/Echo"  # a real name stays whole


def test_a_strangers_refused_handshake_buys_a_bounded_number_of_peer_lookups(
    connect: Connect,
    make_client: MakeClient,
    caplog: pytest.LogCaptureFixture,
    lookups: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The stranger's handshake stays pending however slowly the calls below run: expired,
    # it would stop the lookups too, and the bound below would hold whatever the code did.
    monkeypatch.setattr(handshakes, "NEW_CONNECTION_WINDOW", 600.0)
    alice, mallory = make_client("alice"), make_client("mallory")
    connect.enroll(alice, "alice", ECHO_ALL)
    stub = connect.stub(alice.cert_path, alice.key_path)
    whoami(stub)  # alice's connection is open and known
    strangers = connect.stub(mallory.cert_path, mallory.key_path)
    assert code_of(lambda: whoami(strangers)) == grpc.StatusCode.UNAVAILABLE  # refused
    assert connect.server.trust.handshakes.pending()  # it never calls: pending for 10 s
    before = len(lookups)
    for _ in range(1_000):
        whoami(stub)
    # Before: a lookup on each of alice's calls for the whole 10 s.
    assert len(lookups) - before <= observe.MAX_MISSES
    # A new connection of alice's still gets its line.
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        fresh = connect.stub(alice.cert_path, alice.key_path)
        whoami(fresh)
        connect.server.audit.flush()
    allowed = [r.getMessage() for r in caplog.records if '"decision": "allow"' in r.getMessage()]
    assert len(allowed) == 1 and lookups[-1] in allowed[0]


TOKEN = "0123abcd" * 5


def test_a_warm_file_that_is_a_hard_link_is_not_read(
    devca: ServerFiles,
    registry: Path,
    alice: KeyPairFiles,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Linked by someone who may not read it (where fs.protected_hardlinks is off): the server's.
    secret = tmp_path / "token"  # a hex token: the one kind of word the warning quoted
    secret.write_text(f"{TOKEN}\n")
    secret.chmod(0o600)
    warm_path = tmp_path / "warm"
    os.link(secret, warm_path)
    config = replace(handover_config(registry, devca.cert, devca.key), warm_start=warm_path)
    with caplog.at_level(logging.INFO), start_server(config) as running:
        assert whoami(Connect(running, devca).stub(alice.cert_path, alice.key_path)).name
    messages = [r.getMessage() for r in caplog.records]
    # Before: "ignoring the warm-start file ...: not a SHA-256 fingerprint: '0123abcd...'"
    assert not any(TOKEN in m for m in messages)
    assert f"ignoring the warm-start file {warm_path}: a hard link to another file" in messages
    # Saving replaced the link with the server's own file, and left the other file alone.
    assert secret.read_text() == f"{TOKEN}\n"
    assert warm_path.stat().st_nlink == 1 and len(warm_path.read_text()) == 65
