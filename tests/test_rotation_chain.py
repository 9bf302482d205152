"""Rotations in a row: a rotation with overlap X leaves no older key of the client trusted past
now + X, on both backends and through a real server."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from pathlib import Path

import grpc
import pytest

from pinrpc.cli import Exit
from pinrpc.errors import CapacityError
from pinrpc.identity import Fingerprint, KeyPairFiles, load_certificate
from server import cli as server_cli
from server.registry import Client, Registry, now_utc, open_registry
from server.registry_model import MAX_RETIRING, MAX_ROTATIONS_A_DAY
from tests.conftest import Connect, MakeClient, admitted, code_of, whoami
from tests.test_client_cli import run
from tests.test_observe import audit_lines
from tests.test_registry_backends import candidate

HOUR = dt.timedelta(hours=1)


def rotated(registry: Registry, make_client: MakeClient, old: Client, name: str,
            overlap: dt.timedelta) -> Client:  # fmt: skip
    return registry.rotate(old.fingerprint, candidate(make_client, name), overlap)[0]


def row(registry: Registry, client: Client) -> Client:
    return registry.find(client.fingerprint.hex)


def test_a_shorter_overlap_brings_the_older_retiring_certificates_forward(
    spec: str, make_client: MakeClient
) -> None:
    registry = open_registry(spec)
    try:
        a = registry.enroll(candidate(make_client, "bob"), "bob", [])
        other = registry.enroll(candidate(make_client, "carol"), "carol", [])
        rotated(registry, make_client, other, "carol2", 24 * HOUR)  # another client's overlap
        b = rotated(registry, make_client, a, "bob2", 24 * HOUR)
        before = now_utc()
        rotated(registry, make_client, b, "bob3", HOUR)
        a_row, b_row = row(registry, a), row(registry, b)
        assert a_row.retire_at == b_row.retire_at and a_row.retire_at is not None
        assert before + HOUR <= a_row.retire_at <= now_utc() + HOUR
        assert a_row.active and a_row.revoked_at is None
        # Deny side: another client's overlap keeps its end.
        carol = row(registry, other)
        assert carol.retire_at is not None and carol.retire_at > now_utc() + 23 * HOUR
    finally:
        registry.close()


def test_a_longer_overlap_never_extends_an_older_one(spec: str, make_client: MakeClient) -> None:
    registry = open_registry(spec)
    try:
        a = registry.enroll(candidate(make_client, "bob"), "bob", [])
        b = rotated(registry, make_client, a, "bob2", HOUR)
        ends = row(registry, a).retire_at
        rotated(registry, make_client, b, "bob3", 24 * HOUR)
        assert row(registry, a).retire_at == ends  # min(its end, now + 24 h)
    finally:
        registry.close()


def test_a_rotation_without_overlap_retires_every_older_certificate_at_once(
    spec: str, make_client: MakeClient
) -> None:
    registry = open_registry(spec)
    try:
        a = registry.enroll(candidate(make_client, "bob"), "bob", [])
        b = rotated(registry, make_client, a, "bob2", 24 * HOUR)
        c = rotated(registry, make_client, b, "bob3", dt.timedelta(0))
        a_row, b_row = row(registry, a), row(registry, b)
        # A is retired (its overlap ended), as the end of an overlap retires; B is revoked, as
        # a rotation without overlap always did.
        assert a_row.revoked_at is None and a_row.retire_at is not None
        assert a_row.retire_at <= now_utc() and not a_row.active
        assert b_row.revoked_at is not None and not b_row.active
        assert [x.fingerprint for x in registry.clients() if x.active] == [c.fingerprint]
    finally:
        registry.close()


def copy_pair(files: KeyPairFiles, into: Path) -> KeyPairFiles:
    """The pair as it is now: `pinrpc rotate` deletes it at its next run."""
    into.mkdir()
    cert, key = into / files.cert_path.name, into / files.key_path.name
    shutil.copy2(files.cert_path, cert)
    shutil.copy2(files.key_path, key)
    return KeyPairFiles(key, cert, files.fingerprint)


def test_rotating_again_without_overlap_cuts_off_the_first_key_through_a_real_server(
    connect: Connect,
    make_client: MakeClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    bob = make_client("bob")
    connect.enroll(bob, "bob")
    a = copy_pair(bob, tmp_path / "a")
    code, _, err = run(["rotate", *connect.cli_flags(bob)], capsys)  # the server's 24 h
    assert code == Exit.OK, err
    a_channel = connect.stub(a.cert_path, a.key_path)
    assert whoami(a_channel).fingerprint == str(a.fingerprint)  # inside the overlap
    connect.server.audit.flush()
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        code, _, err = run(["rotate", "--overlap", "0", *connect.cli_flags(bob)], capsys)
        assert code == Exit.OK, err
        lines = audit_lines(caplog, connect.server.audit)
    c = Fingerprint.of(load_certificate(bob.cert_path))
    assert whoami(connect.stub(bob.cert_path, bob.key_path)).fingerprint == str(c)
    # A is refused on its open connection and at a new handshake alike.
    assert code_of(lambda: whoami(a_channel)) == grpc.StatusCode.PERMISSION_DENIED
    assert not admitted(connect.stub(a.cert_path, a.key_path))
    retired = [line for line in lines if line.get("fingerprint") == str(a.fingerprint)]
    assert [line["event"] for line in retired] == ["retire"]
    capsys.readouterr()
    assert server_cli.main(["list", "--registry", str(connect.server_registry)]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if "bob" in line]
    assert len(listed) == 3 and sum("retiring" in line for line in listed) == 0
    assert sum(" retired " in line for line in listed) == 1


def test_a_client_may_keep_only_a_few_certificates_in_their_overlap(
    spec: str, make_client: MakeClient
) -> None:
    """Rotate needs no permission: unbounded, one client rotating in a loop filled the
    server's TLS roots with its certificates for a day (1,501 after 110 s)."""
    registry = open_registry(spec)
    try:
        current = registry.enroll(candidate(make_client, "bob"), "bob", [])
        carol = registry.enroll(candidate(make_client, "carol"), "carol", [])
        for i in range(MAX_RETIRING):  # allowed: up to the limit
            current = rotated(registry, make_client, current, f"bob{i}", 24 * HOUR)
        before = registry.clients()
        with pytest.raises(CapacityError, match=r"already has 3 certificates in a rotation's"):
            rotated(registry, make_client, current, "bob-more", HOUR)
        assert registry.clients() == before  # refused: nothing changed
        # Another client is not held back by bob's overlaps.
        rotated(registry, make_client, carol, "carol2", 24 * HOUR)
        # Without an overlap bob may rotate: it ends every older certificate at once.
        last = rotated(registry, make_client, current, "bob-last", dt.timedelta(0))
        bobs = [c for c in registry.clients() if c.name == "bob" and c.active]
        assert [c.fingerprint for c in bobs] == [last.fingerprint]
    finally:
        registry.close()


def test_a_rotation_past_the_limit_is_refused_through_a_real_server(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    bob = make_client("bob")
    connect.enroll(bob, "bob")
    for _ in range(MAX_RETIRING):
        code, _, err = run(["rotate", *connect.cli_flags(bob)], capsys)
        assert code == Exit.OK, err
    current = bob.cert_path.read_bytes()
    code, _, err = run(["rotate", *connect.cli_flags(bob)], capsys)
    assert code != Exit.OK and "already has 3 certificates in a rotation's overlap" in err
    assert bob.cert_path.read_bytes() == current  # the refused pair was not swapped in
    registry = open_registry(str(connect.server_registry), readonly=True)
    try:
        assert sum(c.active for c in registry.clients()) == MAX_RETIRING + 1
    finally:
        registry.close()


def test_a_client_may_rotate_only_so_often_in_a_day(spec: str, make_client: MakeClient) -> None:
    """Without overlap a client could rotate in a loop: 52 rows a second, kept for good."""
    registry = open_registry(spec)
    try:
        current = registry.enroll(candidate(make_client, "bob"), "bob", [])
        carol = registry.enroll(candidate(make_client, "carol"), "carol", [])
        for i in range(MAX_ROTATIONS_A_DAY):  # allowed: up to the limit
            current = rotated(registry, make_client, current, f"b{i}", dt.timedelta(0))
        before = registry.clients()
        with pytest.raises(CapacityError, match=r"got 51 certificates in the last 24 hours"):
            rotated(registry, make_client, current, "bob-more", dt.timedelta(0))
        assert registry.clients() == before
        rotated(registry, make_client, carol, "carol2", dt.timedelta(0))  # carol is not held
    finally:
        registry.close()
