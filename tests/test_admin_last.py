"""Remote administration cannot lock itself out: an Admin change that would leave no client
allowed all of /pinrpc.v1.Admin/* is refused (FAILED_PRECONDITION), also when another admin's
change lands just before it; the server's local `pinrpc-server` still makes it."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from typing import Any, cast

import pytest

from pinrpc.cli import Exit
from pinrpc.identity import KeyPairFiles
from server import cli as server_cli
from server.enrollment import check_certificate
from server.registry import open_registry
from tests.conftest import ECHO_ALL, Connect, MakeClient, registry_dump, whoami
from tests.test_admin_tx import meanwhile  # noqa: F401 (a fixture)
from tests.test_lifecycle import ADMIN, run

NARROW = [ADMIN.removesuffix("*") + m for m in ("Enroll", "Revoke", "Permit", "List")]
SAYS = f"would leave no client allowed all of {ADMIN}"


def refusals(caplog: pytest.LogCaptureFixture) -> list[tuple[object, object]]:
    records = (json.loads(r.getMessage()) for r in caplog.records if r.name == "pinrpc.audit")
    return [(r["client"], r["method"]) for r in records if r.get("reason") == "refused"]


def rows(connect: Connect, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]], registry_dump(connect.server_registry, capsys))


def admin(
    argv: list[str], who: KeyPairFiles, connect: Connect, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    code, _, err = run(["admin", *argv, *connect.cli_flags(who)], capsys)
    return code, err


@pytest.mark.parametrize(
    "argv",
    [
        ["revoke", "root"],
        ["revoke", "ROOT_FINGERPRINT"],
        ["permit", "root", "--allow", ECHO_ALL],
        ["permit", "root", "--none"],
        ["enroll", "PUPPET", "--name", "root", "--replace", "--allow", ECHO_ALL],
    ],
)
def test_the_last_full_admin_cannot_be_ended_remotely(
    argv: list[str],
    connect: Connect,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    root, ops, puppet = make_client("root"), make_client("ops"), make_client("puppet")
    connect.enroll(root, "root", ADMIN)
    connect.enroll(ops, "ops", *NARROW)  # some Admin methods, not all: not a full admin
    before = registry_dump(connect.server_registry, capsys)
    swap = {"PUPPET": str(puppet.cert_path), "ROOT_FINGERPRINT": str(root.fingerprint)}
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        code, err = admin([swap.get(a, a) for a in argv], root, connect, capsys)
        connect.server.audit.flush()
    assert code == Exit.ERROR and err.count("\n") == 1, err
    assert SAYS in err and "`pinrpc-server`" in err, err
    assert registry_dump(connect.server_registry, capsys) == before
    assert refusals(caplog) == [("root", ADMIN.removesuffix("*") + argv[0].capitalize())]
    # The server holds no revocation the refusal rolled back, once it reloads (on a change).
    connect.enroll(make_client("later"), "later", ECHO_ALL)
    assert whoami(connect.stub(root.cert_path, root.key_path)).name == "root"


@pytest.mark.parametrize(
    ("argv", "gone"),
    [
        (["revoke", "ops"], "ops"),
        (["revoke", "root"], "root"),  # itself, while ops remains
        (["permit", "root", "--allow", ECHO_ALL], "root"),
        (["enroll", "PUPPET", "--name", "ops", "--replace", "--allow", ECHO_ALL], "ops"),
    ],
)
def test_one_of_two_full_admins_can_be_ended_remotely(
    argv: list[str],
    gone: str,
    connect: Connect,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, ops, puppet = make_client("root"), make_client("ops"), make_client("puppet")
    connect.enroll(root, "root", ADMIN)
    connect.enroll(ops, "ops", ADMIN)
    code, err = admin(
        [str(puppet.cert_path) if a == "PUPPET" else a for a in argv], root, connect, capsys
    )
    assert code == Exit.OK, err
    full = sorted(
        c["name"]
        for c in rows(connect, capsys)
        if c["revoked_at"] is None and c["allowed_methods"] == [ADMIN]
    )
    assert full == sorted({"root", "ops"} - {gone})


def test_the_last_full_admin_can_rekey_keeping_its_permissions(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    root, root2 = make_client("root"), make_client("root2")
    connect.enroll(root, "root", ADMIN)
    code, err = admin(
        ["enroll", str(root2.cert_path), "--name", "root", "--replace"], root, connect, capsys
    )
    assert code == Exit.OK, err
    connect.server.trust.poll()
    assert whoami(connect.stub(root2.cert_path, root2.key_path)).name == "root"


def test_the_local_cli_can_end_the_last_full_admin(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """The operator at the server machine decides: `pinrpc-server` is not limited."""
    root = make_client("root")
    connect.enroll(root, "root", ADMIN)
    registry = str(connect.server_registry)
    assert server_cli.main(["permit", "root", "--allow", ECHO_ALL, "--registry", registry]) == 0
    assert server_cli.main(["revoke", "root", "--registry", registry]) == 0
    assert [c["revoked_at"] is not None for c in rows(connect, capsys)] == [True]


def test_two_full_admins_revoking_each_other_at_once_leave_one(
    connect: Connect,
    make_client: MakeClient,
    meanwhile: Callable[[str, Callable[[], None]], None],  # noqa: F811 (imported above)
    capsys: pytest.CaptureFixture[str],
) -> None:
    """root asks to revoke ops; ops's revocation of root commits first (through a second real
    registry handle, as another server replica would): root's is then refused."""
    root, ops = make_client("root"), make_client("ops")
    connect.enroll(root, "root", ADMIN)
    connect.enroll(ops, "ops", ADMIN)
    other = open_registry(str(connect.server_registry))

    def ops_first() -> None:
        other.revoke("root")

    try:
        meanwhile("revoke", ops_first)
        code, err = admin(["revoke", "ops"], root, connect, capsys)
    finally:
        other.close()
    assert code == Exit.ERROR and SAYS in err, err
    assert [c["name"] for c in rows(connect, capsys) if c["revoked_at"] is None] == ["ops"]


def test_a_retiring_certificate_does_not_count_as_remaining(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """Within a rotation's overlap the old certificate still works, but only until it ends:
    revoking the new one would lock the server out then. Revoking the old one is fine."""
    root, root2 = make_client("root"), make_client("root2")
    connect.enroll(root, "root", ADMIN)
    other = open_registry(str(connect.server_registry))
    try:
        new = check_certificate(root2.cert_path.read_bytes(), str(root2.cert_path))
        other.rotate(root.fingerprint, new, dt.timedelta(hours=1))
    finally:
        other.close()
    connect.server.trust.poll()
    before = rows(connect, capsys)
    code, err = admin(["revoke", str(root2.fingerprint)], root2, connect, capsys)
    assert code == Exit.ERROR and SAYS in err, err
    assert rows(connect, capsys) == before
    connect.server.trust.poll()
    code, err = admin(["revoke", str(root.fingerprint)], root2, connect, capsys)
    assert code == Exit.OK, err
