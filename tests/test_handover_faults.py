"""--tls-reload handover under faults: a broken registry row, many handovers, no /proc."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import grpc

from server.app import start_server
from tests.conftest import ECHO_ALL, Connect, MakeClient, ServerFiles, code_of, enroll, revoke
from tests.test_handover import fresh_call, handover_config, settle


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
