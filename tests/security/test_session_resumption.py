"""TLS session resumption after a revocation.

gRPC's server issues session tickets (TLS 1.2 with a lifetime hint of 7,200 s, and TLS 1.3),
and a resumed handshake checks no certificate: the client proves only that it holds the
session's secret, and the session keeps the leaf of its first handshake. Measured here: with
``--tls-reload inline`` the revocation's new TLS configuration has new ticket keys, so the
ticket no longer resumes and the full handshake is refused; with ``handover`` a revocation
builds no listener, the ticket resumes until the next build, and the per-call check refuses
every call on it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.app import RunningServer, start_server
from server.config import ServerConfig
from tests.conftest import SERVER_NAME, MakeClient, ServerFiles, enroll, revoke
from tests.security.attacker import raw_whoami
from tests.security.conftest import HandlerCalls

OK, PERMISSION_DENIED = "0", "7"
Call = tuple[str | None, ssl.SSLSession | None, bool]


@pytest.fixture(params=["inline", "handover"])
def reload_server(
    request: pytest.FixtureRequest, devca: ServerFiles, registry: Path, handler_calls: HandlerCalls
) -> Iterator[RunningServer]:
    config = ServerConfig(
        listen="127.0.0.1:0", cert=devca.cert, key=devca.key, registry=str(registry),
        poll_interval=0.1, grace=1.0, tls_reload=request.param,
    )  # fmt: skip
    with start_server(config) as running:
        yield running


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_resumed_session_of_a_revoked_client_gets_no_call_through(
    reload_server: RunningServer,
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    handler_calls: HandlerCalls,
    version: ssl.TLSVersion,
) -> None:
    server = reload_server
    alice = make_client("alice")
    enroll(registry, alice.cert_path, "alice")
    server.trust.poll()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(devca.ca_path)
    context.load_cert_chain(alice.cert_path, alice.key_path)
    context.set_alpn_protocols(["h2"])
    context.minimum_version = context.maximum_version = version

    def call(session: ssl.SSLSession | None) -> Call:
        raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        with context.wrap_socket(raw, server_hostname=SERVER_NAME, session=session) as tls:
            status = raw_whoami(tls, SERVER_NAME)  # TLS 1.3 tickets come with the answer
            return status, tls.session, bool(tls.session_reused)

    status, session = None, None
    for _ in range(100):  # until the new configuration (or listener) takes alice's certificate
        with contextlib.suppress(ssl.SSLError):
            status, session, _ = call(None)
        if status == OK:
            break
        time.sleep(0.1)
    assert status == OK and session is not None
    # Allowed: a resumed session is alice's, certificate and all.
    status, session, reused = call(session)
    assert (status, reused) == (OK, True)
    assert handler_calls.names == ["alice", "alice"]

    revoke(registry, "alice")
    server.trust.poll()
    resumed = 0
    for _ in range(3):
        try:
            status, newer, reused = call(session)
        except ssl.SSLError:  # no resumption, and the full handshake was refused
            continue
        session = newer or session  # TLS 1.3 hands out a new ticket on each connection
        assert status == PERMISSION_DENIED if reused else status is None
        resumed += reused
    # handover: a revocation builds no listener, so the ticket still resumes, and is refused
    assert resumed == (3 if server.config.tls_reload == "handover" else 0)
    assert handler_calls.count == 2
