"""`pinrpc-server list` and `pinrpc admin list` print a client in the same words: one
wording of its state (active, revoked, retiring, expired, expiring), shared."""

from __future__ import annotations

import datetime as dt

import pytest

from client import cli as client_cli
from pinrpc.cli import Exit
from pinrpc.identity import cert_to_pem, generate_key, self_signed_certificate
from server import cli as server_cli
from server.enrollment import check_certificate
from server.registry import open_registry
from tests.conftest import Connect, MakeClient, revoke
from tests.test_lifecycle import ADMIN


def test_local_and_remote_listings_print_the_same_lines(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    root, bob, carol = make_client("root"), make_client("bob"), make_client("carol")
    soon = make_client("soon", days=5)
    connect.enroll(root, "root", ADMIN)
    for files in (bob, carol, soon):
        connect.enroll(files, files.cert_path.stem)
    revoke(connect.server_registry, "bob")
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    expired = self_signed_certificate(generate_key(), "old", days=2, now=past)
    connect.plant(check_certificate(cert_to_pem(expired), "old", now=past), "old")
    registry = open_registry(str(connect.server_registry))
    try:  # carol's old certificate retires in an hour
        successor = check_certificate(make_client("carol2").cert_path.read_bytes(), "carol2")
        registry.rotate(carol.fingerprint, successor, dt.timedelta(hours=1))
    finally:
        registry.close()
    capsys.readouterr()
    assert server_cli.main(["list", "--registry", str(connect.server_registry)]) == Exit.OK
    local = capsys.readouterr().out.splitlines()
    assert client_cli.main(["admin", "list", *connect.cli_flags(root)]) == Exit.OK
    remote = capsys.readouterr().out.splitlines()
    assert remote == local
    states = {line.split()[0] + " " + line.split()[2] for line in local}
    assert {"root active", "bob revoked", "carol retiring", "carol active", "old expired"} <= states
    assert sum(line.endswith("<- expiring, rotate it") for line in remote) == 1
    assert sum(line.endswith("<- expired: new key pair, then enroll --replace") for line in remote)
