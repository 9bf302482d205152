"""A narrow remote administrator (some Admin methods, not all) acts within its own permissions:
it grants only patterns they cover, and changes only clients whose patterns they cover."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace
from typing import cast

import pytest

from pinrpc.cli import Exit
from server.admin import ADMIN_ALL, covers
from server.auth import method_allowed
from server.registry import Client
from tests.conftest import ECHO_ALL, Connect, MakeClient, registry_dump, whoami
from tests.test_lifecycle import run

ADMIN = "/pinrpc.v1.Admin/"


@pytest.mark.parametrize(
    ("held", "argv"),
    [
        # Grant itself, or a sock puppet whose key it holds, more than it holds.
        (["Permit"], ["permit", "mallory", "--allow", ADMIN_ALL]),
        (["Enroll"], ["enroll", "PUPPET", "--name", "puppet", "--allow", ADMIN_ALL]),
        (["Enroll"], ["enroll", "PUPPET", "--name", "puppet", "--allow", "*"]),
        (["Enroll", ECHO_ALL], ["enroll", "PUPPET", "--name", "p", "--allow", "/pinrpc.v1.Echo*"]),
        # Take over, end or strip the operator's own admin identity.
        (["Enroll"], ["enroll", "PUPPET", "--name", "root", "--replace"]),
        (["Revoke"], ["revoke", "root"]),
        (["Revoke"], ["revoke", "ROOT_FINGERPRINT"]),
        (["Permit"], ["permit", "root", "--none"]),
    ],
)
def test_a_narrow_admin_cannot_reach_beyond_its_own_permissions(
    held: list[str],
    argv: list[str],
    connect: Connect,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    root, mallory, puppet = make_client("root"), make_client("mallory"), make_client("puppet")
    connect.enroll(root, "root", ADMIN_ALL)
    connect.enroll(mallory, "mallory", *(p if p.startswith("/") else ADMIN + p for p in held))
    before = registry_dump(connect.server_registry, capsys)
    swap = {"PUPPET": str(puppet.cert_path), "ROOT_FINGERPRINT": str(root.fingerprint)}
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        code, _, err = run(
            ["admin", *(swap.get(a, a) for a in argv), *connect.cli_flags(mallory)], capsys
        )
        connect.server.audit.flush()
    assert code == Exit.DENIED, err
    assert f"'mallory' is not allowed all of {ADMIN_ALL}" in err
    assert registry_dump(connect.server_registry, capsys) == before
    assert whoami(connect.stub(root.cert_path, root.key_path)).name == "root"
    denials = [
        (r["client"], r["method"])
        for r in (json.loads(x.getMessage()) for x in caplog.records if x.name == "pinrpc.audit")
        if r.get("reason") == "beyond_own_permissions"
    ]
    assert denials == [("mallory", ADMIN + held[0])]


def test_a_narrow_admin_acts_within_its_own_permissions(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    mallory, bob, bob2, carol = (make_client(n) for n in ("mallory", "bob", "bob2", "carol"))
    narrow = [ADMIN + m for m in ("Enroll", "Revoke", "Permit")]
    connect.enroll(mallory, "mallory", *narrow, ECHO_ALL)
    connect.enroll(bob, "bob", ECHO_ALL)
    flags = connect.cli_flags(mallory)
    for argv in [
        ["enroll", str(carol.cert_path), "--name", "carol", "--allow", "/pinrpc.v1.Echo/Echo"],
        ["enroll", str(bob2.cert_path), "--name", "bob", "--replace"],  # keeps ECHO_ALL
        ["permit", "bob", "--allow", ECHO_ALL, "--allow", ADMIN + "Permit"],
        ["revoke", "carol"],
        ["permit", "mallory", "--allow", ADMIN + "Revoke"],  # may narrow itself
    ]:
        code, _, err = run(["admin", *argv, *flags], capsys)
        assert code == Exit.OK, (argv, err)
    listed = {c["name"]: c for c in registry_dump(connect.server_registry, capsys)}  # type: ignore[attr-defined]
    assert listed["bob"]["allowed_methods"] == [ECHO_ALL, ADMIN + "Permit"]
    assert listed["mallory"]["allowed_methods"] == [ADMIN + "Revoke"]


# Method names to test coverage against: near misses of the patterns below included.
METHODS = [
    "/pinrpc.v1.Admin/Enroll", "/pinrpc.v1.Admin/List", "/pinrpc.v1.Admin/Listx",
    "/pinrpc.v1.Admin/", "/pinrpc.v1.AdminX/List", "/pinrpc.v1.admin/List",
    "/pinrpc.v1.Echo/Echo", "/pinrpc.v1.Echo/EchoStream", "/pinrpc.v1.EchoAdmin/Echo",
    "/pinrpc.v1.Echo/", "/pinrpc.v1.Echo/*", "/pinrpc.v1.Echo/?", "/shop.v1.Cart/Add",
    "/pinrpc.v1.Echo/Echo/", "/pinrpc.v1.Echo/%45cho", "*",
]  # fmt: skip
PATTERNS = [
    "*", "/*", "/pinrpc.v1.*", "/pinrpc.v1.Echo*", "/pinrpc.v1.Echo/*", "/pinrpc.v1.Echo/Echo",
    "/pinrpc.v1.Echo/?", "/pinrpc.v1.Echo/[*]", "/pinrpc.v1.Echo/[E]cho", "/pinrpc.v1.Echo/E*",
    ADMIN_ALL, ADMIN + "List", ADMIN + "[EL]*", ADMIN + "List*", "/pinrpc.v1.Admin*",
    "/pinrpc.v1.Echo/[", "/shop.v1.*",
]  # fmt: skip


def allowed(pattern: str, method: str) -> bool:
    return method_allowed(cast(Client, SimpleNamespace(allowed_methods=(pattern,))), method)


@pytest.mark.parametrize("held", PATTERNS)
def test_covers_never_claims_more_than_the_held_pattern_allows(held: str) -> None:
    for granted in PATTERNS:
        if covers(held, granted):
            leaks = [m for m in METHODS if allowed(granted, m) and not allowed(held, m)]
            assert not leaks, (held, granted, leaks)


@pytest.mark.parametrize(
    ("held", "granted", "expected"),
    [
        (ADMIN_ALL, ADMIN + "List", True),
        (ADMIN + "List", ADMIN_ALL, False),
        ("*", ADMIN + "List", False),  # '*' never reaches Admin
        ("/pinrpc.v1.*", ADMIN_ALL, False),
        ("*", ECHO_ALL, True),
        (ECHO_ALL, "/pinrpc.v1.Echo/Echo", True),
        (ECHO_ALL, "/pinrpc.v1.Echo*", False),  # reaches /pinrpc.v1.EchoAdmin/...
        ("/pinrpc.v1.Echo/?", "/pinrpc.v1.Echo/*", False),
        ("/pinrpc.v1.Echo/[*]", "/pinrpc.v1.Echo/*", False),
        ("/pinrpc.v1.echo/*", "/pinrpc.v1.Echo/Echo", False),  # case matters, as in gRPC
    ],
)
def test_covers_cases(held: str, granted: str, expected: bool) -> None:
    assert covers(held, granted) is expected
