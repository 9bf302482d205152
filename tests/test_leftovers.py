"""Small defects left over from earlier work: `revoke` reports what it ended from inside its
own transaction."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from pinrpc.identity import Fingerprint
from server import cli as server_cli
from server.registry import Client, open_registry
from server.registry_sql import SqlRegistry
from tests.conftest import MakeClient
from tests.test_registry_backends import candidate

HOUR = dt.timedelta(hours=1)


# -- 2. revoke reports what it ended, read in its own transaction ----------------------------


def enroll_cli(spec: str, cert: Path, name: str) -> None:
    assert server_cli.main(["enroll", str(cert), "--name", name, "--registry", spec]) == 0


def current(spec: str, name: str) -> Client:
    registry = open_registry(spec)
    try:
        return registry.find(name)
    finally:
        registry.close()


def test_revoke_prints_a_rotation_that_landed_just_before_it(
    spec: str,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bob rotates twice (A -> B -> C) between the moment the operator runs `revoke bob` and
    its transaction: every certificate it ended is printed, B too."""
    enroll_cli(spec, make_client("bob").cert_path, "bob")
    a = current(spec, "bob")
    made: list[Fingerprint] = []
    real_revoke = SqlRegistry.revoke

    def rotations_first(self: SqlRegistry, ref: str) -> list[Client]:
        # The client's own rotations, through a connection of their own, committed just
        # before the revoke's transaction starts: what a concurrent `pinrpc rotate` does.
        other = open_registry(spec)
        try:
            b = other.rotate(a.fingerprint, candidate(make_client, "bob2"), 24 * HOUR)
            c = other.rotate(b.fingerprint, candidate(make_client, "bob3"), 24 * HOUR)
        finally:
            other.close()
        made.extend((b.fingerprint, c.fingerprint))
        return real_revoke(self, ref)

    monkeypatch.setattr(SqlRegistry, "revoke", rotations_first)
    capsys.readouterr()
    assert server_cli.main(["revoke", "bob", "--registry", spec]) == 0
    out = capsys.readouterr().out.splitlines()
    b, c = made
    assert out[0] == f"revoked bob ({c})"
    assert sorted(out[1:]) == sorted(
        f"revoked bob ({fp}), the certificate it rotated from" for fp in (a.fingerprint, b)
    )
    registry = open_registry(spec)
    try:
        assert not any(row.active for row in registry.clients())
    finally:
        registry.close()


def test_revoke_returns_exactly_what_it_ended(spec: str, make_client: MakeClient) -> None:
    registry = open_registry(spec)
    try:
        a = registry.enroll(candidate(make_client, "a1"), "alice", [])
        b = registry.rotate(a.fingerprint, candidate(make_client, "a2"), 24 * HOUR)
        carol = registry.enroll(candidate(make_client, "c1"), "carol", [])
        registry.rotate(carol.fingerprint, candidate(make_client, "c2"), 24 * HOUR)
        # By fingerprint: that certificate alone; the retiring one stays trusted.
        ended = registry.revoke(str(b.fingerprint))
        assert [(c.fingerprint, c.revoked_at is not None) for c in ended] == [(b.fingerprint, True)]
        assert registry.find(a.fingerprint.hex).active
        # By name: every usable certificate of that client, none of another's.
        ended = registry.revoke("alice")
        assert [c.fingerprint for c in ended] == [a.fingerprint]
        assert all(c.revoked_at is not None for c in ended)
        assert sum(c.active for c in registry.clients() if c.name == "carol") == 2
    finally:
        registry.close()
