"""Remote administration (pinrpc.v1.Admin) and self-rotation (pinrpc.v1.Identity), for real."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from client import cli, keyfiles
from pinrpc.channel import secure_channel
from pinrpc.cli import Exit
from pinrpc.identity import Fingerprint, KeyPairFiles, cert_to_pem, load_certificate
from pinrpc.v1 import echo_pb2, identity_pb2, identity_pb2_grpc
from server.app import RunningServer, start_server
from server.config import ServerConfig
from server.registry_schema import COLUMNS
from tests.certs import make_cert, p256
from tests.conftest import (
    ECHO_ALL,
    SERVER_NAME,
    Connect,
    MakeClient,
    ServerFiles,
    admitted,
    code_of,
    eventually,
    registry_dump,
    revoke,
    rotate_request,
    rotate_with_key,
    whoami,
)

ADMIN = "/pinrpc.v1.Admin/*"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# -- administration ------------------------------------------------------------------------


def test_admin_enrolls_lists_and_revokes(
    connect: Connect,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    root, bob = make_client("root"), make_client("bob")
    connect.enroll(root, "root", ADMIN)
    flags = connect.cli_flags(root)
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        code, out, _ = run(
            ["admin", "enroll", str(bob.cert_path), "--name", "bob", "--allow", ECHO_ALL, *flags],
            capsys,
        )
        assert code == Exit.OK and str(bob.fingerprint) in out
        # Effective at once: the admin call refreshed the server's trust.
        assert whoami(connect.stub(bob.cert_path, bob.key_path)).name == "bob"

        code, out, _ = run(["admin", "list", "--json", *flags], capsys)
        assert [c["name"] for c in json.loads(out)] == ["root", "bob"]
        code, out, _ = run(["admin", "get", "bob", "--json", *flags], capsys)
        assert json.loads(out)[0]["allowed_methods"] == [ECHO_ALL]

        code, out, _ = run(["admin", "revoke", "bob", *flags], capsys)
        assert code == Exit.OK and "revoked" in out
        connect.server.audit.flush()
    actions = [
        (r["action"], r["by"], r["client"])
        for r in (json.loads(x.getMessage()) for x in caplog.records if x.name == "pinrpc.audit")
        if r["event"] == "admin"
    ]
    assert actions == [("enroll", "root", "bob"), ("revoke", "root", "bob")]


def test_admin_lists_a_registry_larger_than_grpcs_default_message_limit(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """30,000 revoked certificates of history make a 6 MB reply; gRPC's default limit on a
    received message (4 MiB) failed the call with RESOURCE_EXHAUSTED."""
    root = make_client("root")
    connect.enroll(root, "root", ADMIN)
    with sqlite3.connect(connect.server_registry) as db:
        db.execute(f"""
            WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 30000)
            INSERT INTO clients ({COLUMNS})
            SELECT 'c' || i, printf('%064x', i), cert_pem, spki_sha256, subject, has_key_ids,
                   allowed_methods, enrolled_at, not_after, enrolled_at, NULL
            FROM n, clients WHERE clients.name = 'root'
        """)  # noqa: S608  # fmt: skip
    db.close()
    code, out, err = run(["admin", "list", "--json", *connect.cli_flags(root)], capsys)
    assert code == Exit.OK, err
    listed = json.loads(out)
    assert len(listed) == 30_001 and listed[0]["name"] == "root"


@pytest.mark.parametrize("allow", ["*", ECHO_ALL, "/pinrpc.v1.*"])
def test_admin_needs_explicit_permission(
    allow: str,
    connect: Connect,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mallory, bob = make_client("mallory"), make_client("bob")
    connect.enroll(mallory, "mallory", allow)
    before = registry_dump(connect.server_registry, capsys)
    argv = ["admin", "enroll", str(bob.cert_path), "--name", "bob", *connect.cli_flags(mallory)]
    code, _, err = run(argv, capsys)
    assert code == Exit.DENIED
    assert "may not call /pinrpc.v1.Admin/Enroll" in err
    assert registry_dump(connect.server_registry, capsys) == before


def test_admin_bad_input_is_refused_with_the_local_checks(
    connect: Connect, make_client: MakeClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_client("root")
    connect.enroll(root, "root", ADMIN)
    before = registry_dump(connect.server_registry, capsys)
    ca = tmp_path / "ca.crt"
    ca.write_bytes(cert_to_pem(make_cert(p256(), "ca", ca=True)))
    flags = connect.cli_flags(root)
    for argv, expected in [
        (["admin", "enroll", str(ca), "--name", "x", *flags], "CA certificate"),
        (["admin", "enroll", str(root.cert_path), "--name", "x", *flags], "already enrolled"),
        (["admin", "revoke", "nobody", *flags], "no enrolled client"),
    ]:
        code, _, err = run(argv, capsys)
        assert code == Exit.ERROR, err
        assert err.startswith("pinrpc: error: the server refused: ") and expected in err
        assert err.count("\n") == 1
    assert registry_dump(connect.server_registry, capsys) == before


# -- rotation ------------------------------------------------------------------------------


@pytest.fixture
def overlapping(devca: ServerFiles, registry: Path) -> Iterator[RunningServer]:
    config = ServerConfig(
        "127.0.0.1:0", devca.cert, devca.key, str(registry), poll_interval=0.1,
        rotation_overlap=dt.timedelta(hours=24),
    )  # fmt: skip
    with start_server(config) as running:
        yield running


def test_rotation_under_load_fails_no_call(
    overlapping: RunningServer,
    devca: ServerFiles,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    connect = Connect(overlapping, devca)
    alice = make_client("alice")
    connect.enroll(alice, "alice", ECHO_ALL)
    old_stub = connect.stub(alice.cert_path, alice.key_path)
    failures: list[grpc.RpcError] = []
    calls = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal calls
        deadline = time.monotonic() + 10
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                old_stub.Echo(echo_pb2.EchoRequest(message="x"), timeout=5)
                calls += 1
            except grpc.RpcError as exc:
                failures.append(exc)

    def ten_more() -> None:
        # Counted calls, not a time: a slower server made fewer than 20 in the fixed 0.6 s.
        ended = calls + len(failures)
        eventually(lambda: calls + len(failures) >= ended + 10, timeout=10)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        ten_more()
        code, out, err = run(["rotate", *connect.cli_flags(alice)], capsys)
        assert code == Exit.OK, err
        # New connections with the swapped files, while the old channel keeps calling.
        for _ in range(5):
            fresh = connect.stub(alice.cert_path, alice.key_path)
            assert fresh.Echo(echo_pb2.EchoRequest(message="y"), timeout=5).caller == "alice"
        ten_more()
    finally:
        stop.set()
        worker.join()
    assert failures == []
    new_fp = Fingerprint.of(load_certificate(alice.cert_path))
    assert new_fp != alice.fingerprint
    assert Fingerprint.of(load_certificate(keyfiles.old(alice.cert_path))) == alice.fingerprint
    assert f"new fingerprint  {new_fp}" in out
    me = whoami(connect.stub(alice.cert_path, alice.key_path))
    # Same name, same permissions: a rotation cannot rename or widen.
    assert (me.name, me.fingerprint, list(me.allowed_methods)) == ("alice", str(new_fp), [ECHO_ALL])
    # The old pair still works during the overlap, as a fresh connection too.
    old_pair = connect.stub(keyfiles.old(alice.cert_path), keyfiles.old(alice.key_path))
    assert whoami(old_pair).fingerprint == str(alice.fingerprint)


def test_zero_overlap_retires_the_old_certificate_at_once(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    old_stub = connect.stub(alice.cert_path, alice.key_path)
    assert whoami(old_stub).name == "alice"
    code, _, err = run(["rotate", "--overlap", "0", *connect.cli_flags(alice)], capsys)
    assert code == Exit.OK, err
    assert code_of(lambda: whoami(old_stub)) == grpc.StatusCode.PERMISSION_DENIED
    assert whoami(connect.stub(alice.cert_path, alice.key_path)).name == "alice"


def test_overlap_end_retires_without_any_registry_change(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    old_stub = connect.stub(alice.cert_path, alice.key_path)
    assert whoami(old_stub).name == "alice"
    # 3 s, not 1: the overlap runs from the server's write, and the CLI's own work after it
    # (new key files) and the call below must fit inside it on a loaded machine too.
    code, _, err = run(["rotate", "--overlap", "3", *connect.cli_flags(alice)], capsys)
    assert code == Exit.OK, err
    assert whoami(old_stub).name == "alice"  # still inside the overlap

    eventually(lambda: not admitted(old_stub), timeout=4.5)
    assert whoami(connect.stub(alice.cert_path, alice.key_path)).name == "alice"


def test_rotation_refusals(connect: Connect, make_client: MakeClient, registry: Path) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    channel = connect.channel(alice.cert_path, alice.key_path)
    identity = identity_pb2_grpc.IdentityStub(channel)

    def rotate_with(successor: KeyPairFiles) -> identity_pb2.RotateResponse:
        return identity.Rotate(rotate_request(alice.fingerprint, successor), timeout=5)

    # A successor that could mint certificates is refused like an enrollment would be.
    key = p256()
    bad = rotate_with_key(alice.fingerprint, cert_to_pem(make_cert(key, "alice", ca=True)), key)
    assert code_of(lambda: identity.Rotate(bad, timeout=5)) == grpc.StatusCode.INVALID_ARGUMENT
    # Submitting its own certificate again is no rotation.
    assert code_of(lambda: rotate_with(alice)) == grpc.StatusCode.FAILED_PRECONDITION
    # Rotating twice from the same (now retiring) certificate is refused.
    rotate_with(make_client("alice-next"))
    again = make_client("alice-again")
    assert code_of(lambda: rotate_with(again)) == grpc.StatusCode.FAILED_PRECONDITION
    # A revoked client cannot rotate, even on its open channel.
    revoke(registry, "alice")
    connect.server.trust.poll()
    third = make_client("alice-third")
    assert code_of(lambda: rotate_with(third)) == grpc.StatusCode.PERMISSION_DENIED


def test_unknown_client_cannot_rotate(connect: Connect, make_client: MakeClient) -> None:
    connect.enroll(make_client("alice"), "alice")
    mallory = make_client("mallory")
    channel = secure_channel(
        connect.target, mallory.cert_path, mallory.key_path, connect.devca.ca_path, SERVER_NAME
    )
    request = rotate_request(mallory.fingerprint, make_client("mallory-next"))
    stub = identity_pb2_grpc.IdentityStub(channel)
    assert code_of(lambda: stub.Rotate(request, timeout=5)) == grpc.StatusCode.UNAVAILABLE


def test_old_pair_is_removed_once_the_overlap_ended(make_client: MakeClient) -> None:
    alice, nxt = make_client("alice"), make_client("next")
    until = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    keyfiles.stage_pair(
        alice.cert_path, alice.key_path, nxt.cert_path.read_bytes(), nxt.key_path.read_bytes()
    )
    new_cert, new_key = keyfiles.new(alice.cert_path), keyfiles.new(alice.key_path)
    keyfiles.swap_in(alice.cert_path, alice.key_path, new_cert, new_key, until)
    assert keyfiles.old(alice.key_path).exists()
    assert (keyfiles.old(alice.key_path).stat().st_mode & 0o777) == 0o600
    assert not keyfiles.remove_expired_old_pair(alice.cert_path, alice.key_path)
    later = until + dt.timedelta(seconds=1)
    assert keyfiles.remove_expired_old_pair(alice.cert_path, alice.key_path, now=later)
    assert not keyfiles.old(alice.key_path).exists()
    assert alice.cert_path.read_bytes() == nxt.cert_path.read_bytes()
