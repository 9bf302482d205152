"""A refused Admin change leaves a deny line in the audit; a remote caller never reads where
the server keeps its registry, while the local CLI's operator still does; and Revoke answers
with every certificate it ended."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from pinrpc.cli import Exit
from pinrpc.identity import cert_to_pem
from server import cli as server_cli
from server.admin import MAX_AUDIT_ERROR
from server.app import start_server
from server.config import ServerConfig
from server.enrollment import check_certificate
from server.ratelimit import burst_for
from server.registry import open_registry
from tests.certs import make_cert
from tests.conftest import ECHO_ALL, Connect, MakeClient, ServerFiles, enroll, registry_dump
from tests.test_lifecycle import ADMIN, run


def refusals(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    records = (json.loads(r.getMessage()) for r in caplog.records if r.name == "pinrpc.audit")
    return [r for r in records if r.get("reason") == "refused"]


@pytest.mark.parametrize(
    ("argv", "method", "says"),
    [
        (["enroll", "BOB_CERT", "--name", "bob2"], "Enroll", "already enrolled"),
        (["enroll", "ROOT_KEY", "--name", "x"], "", ""),  # refused by the client
        (["enroll", "ED_CERT", "--name", "x"], "Enroll", "EdDSA key"),
        (["enroll", "CAROL_CERT", "--name", "n" * 100_000], "Enroll", "name"),
        (["revoke", "nosuch"], "Revoke", "no enrolled client named"),
        (["permit", "nosuch", "--allow", ECHO_ALL], "Permit", "no enrolled client"),
        (["permit", "bob", "--allow", "no-slash"], "Permit", "no-slash"),
    ],
)
def test_a_refused_admin_change_leaves_one_bounded_deny_line(
    argv: list[str],
    method: str,
    says: str,
    connect: Connect,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    root, bob, carol = make_client("root"), make_client("bob"), make_client("carol")
    connect.enroll(root, "root", ADMIN)
    connect.enroll(bob, "bob", ECHO_ALL)
    ed = root.cert_path.with_name("ed.crt")  # the server refuses its key, not the client
    ed.write_bytes(cert_to_pem(make_cert(ed25519.Ed25519PrivateKey.generate(), "ed")))
    swap = {
        "BOB_CERT": str(bob.cert_path),
        "CAROL_CERT": str(carol.cert_path),
        "ROOT_KEY": str(root.key_path),
        "ED_CERT": str(ed),
    }
    before = registry_dump(connect.server_registry, capsys)
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        got, _, err = run(
            ["admin", *(swap.get(a, a) for a in argv), *connect.cli_flags(root)], capsys
        )
        connect.server.audit.flush()
    assert got != Exit.OK and err.count("\n") == 1, err
    assert registry_dump(connect.server_registry, capsys) == before
    lines = refusals(caplog)
    if not method:  # the client refused it itself: the server saw nothing
        assert lines == [], lines
        return
    assert [(r["event"], r["decision"], r["client"], r["method"]) for r in lines] == [
        ("call", "deny", "root", ADMIN.removesuffix("*") + method)
    ]
    error = str(lines[0]["error"])
    assert says in error and len(error) <= MAX_AUDIT_ERROR, error
    assert lines[0]["fingerprint"] == str(root.fingerprint) and lines[0]["peer"]


def test_refusals_are_rate_limited_with_the_calls(
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Refusals spend the calls' bucket, not the changes': a flood of them is cut short, and
    cannot push the line of a real change out of the trail."""
    root, bob = make_client("root"), make_client("bob")
    enroll(registry, root.cert_path, "root", ADMIN)
    enroll(registry, bob.cert_path, "bob", ECHO_ALL)
    config = ServerConfig("127.0.0.1:0", devca.cert, devca.key, str(registry), audit_rate=1)
    flood = burst_for(1) + 3  # each run's connection spends a token on its allow line too
    with start_server(config) as running, caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        flags = Connect(running, devca).cli_flags(root)
        for _ in range(flood):
            assert run(["admin", "revoke", "nosuch", *flags], capsys)[0] == Exit.ERROR
        assert run(["admin", "revoke", "bob", *flags], capsys)[0] == Exit.OK
        running.audit.flush()
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "pinrpc.audit"]
    assert 0 < len([r for r in records if r.get("reason") == "refused"]) < flood
    assert [(r["action"], r["client"]) for r in records if r["event"] == "admin"] == [
        ("revoke", "bob")
    ]


@pytest.mark.parametrize(
    "argv", [["get", "nosuch"], ["revoke", "nosuch"], ["permit", "no", "--none"]]
)
def test_a_remote_admin_is_not_told_where_the_registry_is(
    argv: list[str], connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_client("root")
    connect.enroll(root, "root", ADMIN)
    where = str(connect.server_registry)
    code, _, err = run(["admin", *argv, *connect.cli_flags(root)], capsys)
    assert code == Exit.ERROR and "no enrolled client named" in err, err
    assert where not in err and str(connect.server_registry.parent) not in err, err
    assert "[location withheld]" in err
    # The operator at the server's own CLI still reads the path: it needs it.
    capsys.readouterr()
    local = ["revoke" if argv[0] == "get" else argv[0], *argv[1:], "--registry", where]
    assert server_cli.main(local) != 0
    assert where in capsys.readouterr().err


def test_a_registry_outage_does_not_tell_a_remote_admin_the_path(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    root = make_client("root")
    connect.enroll(root, "root", ADMIN)
    where = connect.server_registry
    where.rename(where.with_name("moved.db"))
    for argv in (["list"], ["revoke", "root"], ["permit", "root", "--none"]):
        code, _, err = run(["admin", *argv, *connect.cli_flags(root)], capsys)
        assert code == Exit.RPC and "is gone (deleted or moved)" in err, err
        assert str(where.parent) not in err, err


def test_revoke_by_name_answers_with_every_certificate_it_ended(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """A client in a rotation's overlap has two usable certificates; revoking it by name ends
    both, and the answer said so only for the first (the other only in the audit)."""
    root, bob, bob2 = make_client("root"), make_client("bob"), make_client("bob2")
    connect.enroll(root, "root", ADMIN)
    connect.enroll(bob, "bob", ECHO_ALL)
    registry = open_registry(str(connect.server_registry))
    try:
        successor = check_certificate(bob2.cert_path.read_bytes(), "bob2")
        registry.rotate(bob.fingerprint, successor, dt.timedelta(hours=1))
    finally:
        registry.close()
    code, out, err = run(["admin", "revoke", "bob", "--json", *connect.cli_flags(root)], capsys)
    assert code == Exit.OK, err
    ended = json.loads(out)
    assert [(c["fingerprint"], c["active"]) for c in ended] == [
        (str(bob2.fingerprint), False),
        (str(bob.fingerprint), False),
    ]
    assert all(c["revoked_at"] and "also_revoked" not in c for c in ended)
    # Revoking one certificate by fingerprint ends only that one, and says so.
    carol = make_client("carol")
    connect.enroll(carol, "carol", ECHO_ALL)
    code, out, err = run(
        ["admin", "revoke", str(carol.fingerprint), *connect.cli_flags(root)], capsys
    )
    assert code == Exit.OK and out.count("\n") == 1 and " revoked " in out, out
