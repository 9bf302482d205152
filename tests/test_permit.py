"""Changing an enrolled client's permissions without a new key pair, against real servers:
`pinrpc-server permit` (SQLite and PostgreSQL registries) and `pinrpc admin permit`."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from client import cli as client_cli
from pinrpc.cli import ALWAYS_ALLOWED_NAMES, Exit
from pinrpc.v1 import echo_pb2, echo_pb2_grpc
from server import cli as server_cli
from server.app import RunningServer, start_server
from server.auth import ALWAYS_ALLOWED
from server.config import ServerConfig
from server.enrollment import check_certificate
from server.registry import open_registry
from tests.conftest import (
    ECHO_ALL,
    Connect,
    MakeClient,
    ServerFiles,
    code_of,
    enroll,
    eventually,
    registry_dump,
    revoke,
    whoami,
)
from tests.security.test_open_streams import Bidi
from tests.test_lifecycle import ADMIN, run

STREAM_ONLY = "/pinrpc.v1.Echo/EchoStream"
DENIED = grpc.StatusCode.PERMISSION_DENIED


@contextmanager
def serving(devca: ServerFiles, spec: str) -> Iterator[RunningServer]:
    config = ServerConfig(
        listen="127.0.0.1:0",
        cert=devca.cert,
        key=devca.key,
        registry=spec,
        poll_interval=0.2,
        grace=1.0,
    )
    with start_server(config) as running:
        yield running


def echo(stub: echo_pb2_grpc.EchoStub) -> grpc.StatusCode:
    """OK if Echo answered, else the code it failed with."""
    try:
        stub.Echo(echo_pb2.EchoRequest(message="x"), timeout=5)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


def server_cli_ok(*argv: str) -> None:
    assert server_cli.main(list(argv)) == Exit.OK


def test_permit_reaches_an_open_channel_within_the_poll(
    spec: str, devca: ServerFiles, make_client: MakeClient
) -> None:
    alice = make_client("alice")
    server_cli_ok("enroll", str(alice.cert_path), "--name", "alice", "--allow", ECHO_ALL,
                  "--registry", spec)  # fmt: skip
    with serving(devca, spec) as server:
        connect = Connect(server, devca)
        stub = connect.stub(alice.cert_path, alice.key_path)
        assert echo(stub) == grpc.StatusCode.OK
        # Taken away, on the connection that is already open: refused within a poll (0.2 s).
        server_cli_ok("permit", "alice", "--allow", STREAM_ONLY, "--registry", spec)
        eventually(lambda: echo(stub) == DENIED, timeout=10)  # the poll, however loaded the machine
        assert whoami(stub).name == "alice"  # the same connection, still admitted
        # Given back.
        server_cli_ok("permit", "alice", "--allow", ECHO_ALL, "--registry", spec)
        eventually(lambda: echo(stub) == grpc.StatusCode.OK, timeout=10)


def test_permit_ends_an_open_stream_it_no_longer_allows(
    connect: Connect, make_client: MakeClient
) -> None:
    """Like a revocation: the stream ends at once, not at a next message that may never come;
    a stream whose method stays allowed is left alone."""
    alice, bob = make_client("alice"), make_client("bob")
    connect.enroll(alice, "alice", ECHO_ALL)
    connect.enroll(bob, "bob", ECHO_ALL)
    kept, ended = Bidi(connect, bob), Bidi(connect, alice)
    try:
        assert ended.echo("before") == "before" and kept.echo("before") == "before"
        registry = str(connect.server_registry)
        server_cli_ok("permit", "alice", "--allow", "/pinrpc.v1.Echo/Echo", "--registry", registry)
        server_cli_ok("permit", "bob", "--allow", STREAM_ONLY, "--registry", registry)
        connect.server.trust.poll()
        assert code_of(ended.reply) == DENIED
        assert kept.echo("after") == "after"
    finally:
        ended.close()
        kept.close()


def test_admin_permit_takes_effect_at_once_and_is_audited(
    connect: Connect,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    root, bob = make_client("root"), make_client("bob")
    connect.enroll(root, "root", ADMIN)
    connect.enroll(bob, "bob", ECHO_ALL)
    stub = connect.stub(bob.cert_path, bob.key_path)
    assert echo(stub) == grpc.StatusCode.OK
    flags = connect.cli_flags(root)
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        code, out, err = run(["admin", "permit", "bob", "--none", "--json", *flags], capsys)
        assert code == Exit.OK, err
        assert json.loads(out)[0].get("allowed_methods", []) == []
        assert echo(stub) == DENIED  # the admin call refreshed the server's trust: no poll
        # By fingerprint, in another spelling.
        ref = str(bob.fingerprint).replace(":", "").lower()
        code, out, err = run(["admin", "permit", ref, "--allow", ECHO_ALL, *flags], capsys)
        assert code == Exit.OK, err
        words = out.split()  # the listing line: name, fingerprint, state, days left, patterns
        assert words[:3] == ["bob", str(bob.fingerprint), "active"] and words[-1] == ECHO_ALL, out
        assert echo(stub) == grpc.StatusCode.OK
        connect.server.audit.flush()
    permits = [
        (r["by"], r["client"], r["fingerprint"], r["allowed_methods"])
        for r in (json.loads(x.getMessage()) for x in caplog.records if x.name == "pinrpc.audit")
        if r["event"] == "admin" and r["action"] == "permit"
    ]
    assert permits == [
        ("root", "bob", str(bob.fingerprint), []),
        ("root", "bob", str(bob.fingerprint), [ECHO_ALL]),
    ]


@pytest.mark.parametrize(
    "allow", ["*", ECHO_ALL, "/pinrpc.v1.*", "/pinrpc.v1.Admin/List", "/pinrpc.v1.Admin/[GL]*"]
)
def test_admin_permit_needs_explicit_admin_permission(
    allow: str, connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not even for oneself: a bare '*' must not be a way to grant oneself administration."""
    mallory = make_client("mallory")
    connect.enroll(mallory, "mallory", allow)
    before = registry_dump(connect.server_registry, capsys)
    argv = ["admin", "permit", "mallory", "--allow", ADMIN, *connect.cli_flags(mallory)]
    code, _, err = run(argv, capsys)
    assert code == Exit.DENIED
    assert "may not call /pinrpc.v1.Admin/Permit" in err
    assert registry_dump(connect.server_registry, capsys) == before


def test_admin_permit_bad_input_is_refused_with_the_local_checks(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    root, gone = make_client("root"), make_client("gone")
    connect.enroll(root, "root", ADMIN)
    connect.enroll(gone, "gone", ECHO_ALL)
    revoke(connect.server_registry, "gone")
    before = registry_dump(connect.server_registry, capsys)
    flags = connect.cli_flags(root)
    for argv, expected in [
        (["admin", "permit", "nobody", "--none"], "no enrolled client"),
        (["admin", "permit", "gone", "--none"], "was revoked on"),
        (["admin", "permit", "root", "--allow", "Echo"], "must start with '/'"),
        (["admin", "permit", "root"], "pass --allow PATTERN (repeatable), or --none"),
        (["admin", "permit", "root", "--none", "--allow", ECHO_ALL], "not both"),
    ]:
        code, _, err = run([*argv, *flags], capsys)
        assert code == Exit.ERROR, err
        assert err.startswith("pinrpc: error: the server refused: ") and expected in err
        assert err.count("\n") == 1
    assert registry_dump(connect.server_registry, capsys) == before
    assert echo(connect.stub(root.cert_path, root.key_path)) == DENIED  # root kept ADMIN only


def test_a_local_permit_is_an_audit_line_per_certificate(
    connect: Connect, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    connect.enroll(alice, "alice", ECHO_ALL)
    connect.enroll(bob, "bob", ECHO_ALL)
    registry = str(connect.server_registry)
    connect.server.audit.flush()  # the enrollments' lines
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        server_cli_ok("permit", "alice", "--none", "--registry", registry)
        connect.server.trust.poll()
        server_cli_ok("permit", "alice", "--none", "--registry", registry)  # no change: no line
        connect.server.trust.poll()
        connect.server.audit.flush()
    lines = [json.loads(x.getMessage()) for x in caplog.records if x.name == "pinrpc.audit"]
    assert [(r["event"], r["client"], r.get("allowed_methods")) for r in lines] == [
        ("permit", "alice", [])
    ]


# One process per kind of change, each a bounded loop against the same registry; a race
# refusal (the certificate it read was revoked or retired meanwhile) is expected, nothing else.
_WORKER = """
import datetime as dt, sys, time
from pinrpc.errors import ConflictError, NotFoundError
from pinrpc.identity import cert_to_pem, generate_key, self_signed_certificate
from server.enrollment import check_certificate
from server.registry import open_registry

kind, spec, rounds, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
registry, refused = open_registry(spec), 0
time.sleep(max(0.0, start - time.time()))  # all three at once, whenever each was ready
deadline = time.monotonic() + 60
for i in range(rounds):
    if time.monotonic() > deadline:
        break
    try:
        if kind == "permit":
            registry.permit("alice" if i % 2 else str(registry.find("alice").fingerprint),
                            [f"/pinrpc.v1.Echo/P{i}"])
        elif kind == "rotate":
            pem = cert_to_pem(self_signed_certificate(generate_key(), "alice"))
            current = registry.find("alice").fingerprint
            # Every third without overlap: at most 3 retiring at once (MAX_RETIRING).
            overlap = dt.timedelta(hours=0 if i % 3 == 2 else 1)
            registry.rotate(current, check_certificate(pem, "new"), overlap)
        else:
            retiring = [c for c in registry.clients() if c.active and not c.current]
            if retiring:
                registry.revoke(str(retiring[0].fingerprint))
    except (ConflictError, NotFoundError):
        refused += 1
registry.close()
print(refused)
"""


def test_concurrent_permit_revoke_and_rotate_leave_one_set_on_every_certificate(
    spec: str, make_client: MakeClient, tmp_path: Path
) -> None:
    """Whatever the interleaving, a client's usable certificates never disagree about its
    permissions (a rotation copies them; a permit changes all of them), and the last
    permit is what they hold."""
    alice = make_client("alice")
    server_cli_ok("enroll", str(alice.cert_path), "--name", "alice", "--allow", ECHO_ALL,
                  "--registry", spec)  # fmt: skip
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start = str(time.time() + 3)
    workers = [
        subprocess.Popen(
            [sys.executable, str(script), kind, spec, "30", start],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for kind in ("permit", "rotate", "revoke")
    ]
    try:
        outcomes = [w.communicate(timeout=120) for w in workers]
    finally:
        for worker in workers:  # only on a timeout: ours, by their own handles
            worker.kill()
            worker.wait()
    assert [w.returncode for w in workers] == [0, 0, 0], [err for _, err in outcomes]
    registry = open_registry(spec)
    try:
        clients = registry.clients()
        usable = [c for c in clients if c.active]
    finally:
        registry.close()
    assert {c.name for c in usable} == {"alice"} and sum(c.current for c in usable) == 1
    assert {c.allowed_methods for c in usable} == {("/pinrpc.v1.Echo/P29",)}
    assert len(clients) == 31  # every rotation happened


@pytest.mark.parametrize("argv", [["pinrpc-server", "permit"], ["pinrpc", "admin", "permit"]])
def test_permit_help_says_the_set_is_replaced_not_added_to(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    main = server_cli.main if argv[0] == "pinrpc-server" else client_cli.main
    with pytest.raises(SystemExit) as exit_:
        main([*argv[1:], "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Replace the client's method patterns whole (they are not added to the old ones)" in text
    assert "--none take every permission away" in text


def test_permit_during_a_rotation_overlap_reaches_the_retiring_key_too(
    connect: Connect, make_client: MakeClient
) -> None:
    """Both key pairs are admitted until the overlap ends: what a permit takes away must be
    gone on the old key's open connection too, not only on the new one's."""
    old, new = make_client("alice"), make_client("alice-next")
    connect.enroll(old, "alice", ECHO_ALL)
    registry = open_registry(str(connect.server_registry))
    try:
        successor = check_certificate(new.cert_path.read_bytes(), str(new.cert_path))
        registry.rotate(old.fingerprint, successor, dt.timedelta(hours=1))
    finally:
        registry.close()
    connect.server.trust.poll()
    stubs = [connect.stub(pair.cert_path, pair.key_path) for pair in (old, new)]
    assert [echo(stub) for stub in stubs] == [grpc.StatusCode.OK] * 2
    server_cli_ok("permit", "alice", "--allow", STREAM_ONLY, "--registry",
                  str(connect.server_registry))  # fmt: skip
    connect.server.trust.poll()
    assert [echo(stub) for stub in stubs] == [DENIED] * 2
    assert [whoami(stub).name for stub in stubs] == ["alice"] * 2  # still admitted, both


def test_every_text_on_what_stays_after_none_names_each_always_allowed_method(
    registry: Path, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """`permit` without patterns, `--none`'s help and `doctor` said "WhoAmI, health and
    reflection": Rotate, always allowed too, was missing."""
    for method in ALWAYS_ALLOWED:
        service, name = method.strip("/").split("/")
        word = next((w for w in ("health", "reflection") if w in service), name)
        assert word in ALWAYS_ALLOWED_NAMES, method
    enroll(registry, make_client("alice").cert_path, "alice", ECHO_ALL)
    assert server_cli.main(["permit", "alice", "--registry", str(registry)]) != 0
    assert f"--none to leave the client only {ALWAYS_ALLOWED_NAMES}" in capsys.readouterr().err
