"""What the client sends and trusts: no private key leaves the machine, no silent refusals."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pinrpc.cli import Exit
from tests.conftest import Connect, MakeClient, registry_dump
from tests.test_lifecycle import ADMIN, run

ENROLL_CALL = "/pinrpc.v1.Admin/Enroll"


def test_admin_enroll_sends_no_private_key(
    connect: Connect,
    make_client: MakeClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A key file named by mistake (tab completion picks bob.key as readily as bob.crt), or a
    PEM holding the key with the certificate, was sent to the server whole, which then said
    "never share the key"."""
    root, bob = make_client("root"), make_client("bob")
    connect.enroll(root, "root", ADMIN)
    combined = tmp_path / "bob.pem"
    combined.write_bytes(bob.key_path.read_bytes() + bob.cert_path.read_bytes())
    flags = connect.cli_flags(root)
    before = registry_dump(connect.server_registry, capsys)
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        for mistake in (bob.key_path, combined):
            argv = ["admin", "enroll", str(mistake), "--name", "bob", *flags]
            code, _, err = run(argv, capsys)
            assert code == Exit.ERROR
            assert err == (
                f"pinrpc: error: {mistake} contains a private key; give the certificate (.crt) "
                "instead, and never share the key\n"
            )
        connect.server.audit.flush()
    # Refused here: the server saw no Enroll call at all, so nothing of the key reached it.
    assert not [r for r in caplog.records if ENROLL_CALL in r.getMessage()]
    assert registry_dump(connect.server_registry, capsys) == before


def test_admin_enroll_sends_the_certificate_out_of_a_described_file(
    connect: Connect,
    make_client: MakeClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The allow beside the deny above: text around the PEM block (as `openssl x509 -text`
    prints it) is no reason to refuse, and what is enrolled is exactly that certificate."""
    root, bob = make_client("root"), make_client("bob")
    connect.enroll(root, "root", ADMIN)
    described = tmp_path / "bob-described.pem"
    described.write_bytes(b"Certificate:\n    Subject: CN=bob\n" + bob.cert_path.read_bytes())
    argv = ["admin", "enroll", str(described), "--name", "bob", *connect.cli_flags(root)]
    code, out, err = run(argv, capsys)
    assert code == Exit.OK, err
    assert out.startswith(f"bob  {bob.fingerprint}  active")
