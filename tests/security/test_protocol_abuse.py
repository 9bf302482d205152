"""Wrong protocols on the TLS port: all refused, and enrolled clients keep being served.

What happens, measured: plaintext HTTP/2 and random bytes end at the TLS layer. A TLS 1.3
handshake *without* ALPN "h2" completes at the TLS level (with an enrolled certificate), then
gRPC closes the connection without answering a single HTTP/2 frame. TLS 1.0/1.1 get no
handshake. Idle connections are held open (until the server's handshake timeout, 20 s, not
waited for here: test_fd_exhaustion.py) but do not get in the way: enrolled clients are served
while 200 are open.
"""

from __future__ import annotations

import random
import socket
import ssl
import time
import warnings
from pathlib import Path

import grpc
import pytest

from pinrpc.v1 import echo_pb2_grpc
from tests.conftest import SERVER_NAME, Connect, MakeClient, code_of, whoami
from tests.security.attacker import raw_whoami, require_attack_modules
from tests.security.conftest import HandlerCalls

IDLE_CONNECTIONS = 200


def test_plaintext_http2_is_refused(
    connect: Connect, make_client: MakeClient, handler_calls: HandlerCalls
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    with grpc.insecure_channel(connect.target) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        assert code_of(lambda: whoami(stub)) == grpc.StatusCode.UNAVAILABLE
    with socket.create_connection(("127.0.0.1", connect.server.port), timeout=5) as sock:
        assert raw_whoami(sock, SERVER_NAME) is None  # raw h2 prior knowledge: hung up on
    assert handler_calls.count == 0
    assert whoami(connect.stub(alice.cert_path, alice.key_path)).name == "alice"


def tls_context(cert: Path, key: Path, ca: Path, alpn: list[str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(cert, key)
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    return context


@pytest.mark.parametrize("alpn", [None, ["http/1.1"]], ids=["no-alpn", "http1.1-only"])
def test_tls_without_alpn_h2_gets_no_answer(
    connect: Connect, make_client: MakeClient, handler_calls: HandlerCalls, alpn: list[str] | None
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    address = ("127.0.0.1", connect.server.port)

    def call(protocols: list[str] | None) -> tuple[str | None, str | None]:
        context = tls_context(alice.cert_path, alice.key_path, connect.devca.ca_path, protocols)
        with (
            socket.create_connection(address, timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=SERVER_NAME) as sock,
        ):
            return sock.selected_alpn_protocol(), raw_whoami(sock, SERVER_NAME)

    assert call(alpn) == (None, None)  # TLS handshake done, then closed without an answer
    assert handler_calls.count == 0
    assert call(["h2"]) == ("h2", "0")  # control: same stack, same key, with ALPN h2
    assert handler_calls.names == ["alice"]


@pytest.mark.parametrize("version", [(3, 1), (3, 2)], ids=["tls1.0", "tls1.1"])
def test_old_tls_versions_are_refused(
    connect: Connect, make_client: MakeClient, handler_calls: HandlerCalls, version: tuple[int, int]
) -> None:
    require_attack_modules()
    with warnings.catch_warnings():  # tlslite imports the deprecated asyncore
        warnings.simplefilter("ignore", DeprecationWarning)
        from tlslite import HandshakeSettings, TLSConnection, X509CertChain  # type: ignore[import-untyped]
        from tlslite.errors import TLSError  # type: ignore[import-untyped]
        from tlslite.utils.keyfactory import parsePEMKey  # type: ignore[import-untyped]

    alice = make_client("alice")
    connect.enroll(alice, "alice")
    chain = X509CertChain()
    chain.parsePemList(alice.cert_path.read_text())
    key = parsePEMKey(alice.key_path.read_text(), private=True)

    def handshake(tls: tuple[int, int]) -> bool:
        settings = HandshakeSettings()
        settings.minVersion = settings.maxVersion = tls
        settings.certificate_compression_send = []
        with socket.create_connection(("127.0.0.1", connect.server.port), timeout=5) as sock:
            try:
                TLSConnection(sock).handshakeClientCert(
                    chain, key, settings=settings, alpn=[bytearray(b"h2")]
                )
            except TLSError:
                return False
        return True

    assert not handshake(version)
    assert handshake((3, 3))  # control: TLS 1.2 with the same tool and key
    assert handler_calls.count == 0


def test_random_bytes_are_refused(
    connect: Connect, make_client: MakeClient, handler_calls: HandlerCalls
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    rng = random.Random(4)
    payloads = [rng.randbytes(4096) for _ in range(5)]
    # Garbage that starts like a TLS handshake record, and a ClientHello header with no body.
    payloads += [b"\x16\x03\x01\xff\xff" + rng.randbytes(4096), b"\x16\x03\x01\x00\x10\x01"]
    for payload in payloads:
        with socket.create_connection(("127.0.0.1", connect.server.port), timeout=5) as sock:
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                answer = sock.recv(65536)
            except ConnectionResetError:
                answer = b""
            # Nothing but possibly a plaintext TLS alert (content type 21) comes back.
            assert answer == b"" or answer[0] == 21, answer[:16]
    assert handler_calls.count == 0
    assert whoami(connect.stub(alice.cert_path, alice.key_path)).name == "alice"


def test_idle_connections_do_not_block_enrolled_clients(
    connect: Connect, make_client: MakeClient, handler_calls: HandlerCalls
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    idle: list[socket.socket] = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            idle.append(socket.create_connection(("127.0.0.1", connect.server.port), timeout=5))
        start = time.monotonic()
        # A new channel each time: a new handshake while the idle ones wait for theirs.
        for _ in range(3):
            assert whoami(connect.stub(alice.cert_path, alice.key_path)).name == "alice"
        assert time.monotonic() - start < 5
    finally:
        for sock in idle:
            sock.close()
    assert whoami(connect.stub(alice.cert_path, alice.key_path)).name == "alice"
    assert handler_calls.names == ["alice"] * 4
