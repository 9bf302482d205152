"""Rotate, which any enrolled client may call, must not hold the registry's write lock while it
checks: at 10,000 rows, 8 refused Rotate calls in a loop kept `pinrpc-server revoke` of that
very client out until it gave up ("database is locked")."""

from __future__ import annotations

import datetime as dt
import functools
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager

import grpc
import psycopg
import pytest

from pinrpc.errors import ConflictError
from pinrpc.identity import Fingerprint
from pinrpc.v1 import identity_pb2_grpc
from server.enrollment import Candidate
from server.registry import Client, is_postgres, open_registry
from server.registry_schema import Query
from server.registry_sql import ROTATE_TRIES, SqlRegistry
from tests.conftest import Connect, MakeClient, code_of, rotate_request
from tests.test_registry_backends import candidate

DAY = dt.timedelta(days=1)


@contextmanager
def write_lock_held(spec: str) -> Iterator[None]:
    """Another process's change in progress: the lock every registry change takes first."""
    if is_postgres(spec):
        with psycopg.connect(spec) as conn, conn.transaction():
            conn.execute("SELECT value FROM meta WHERE key = 'generation' FOR UPDATE")
            yield
        return
    with closing(sqlite3.connect(spec, isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")
        yield
        db.execute("ROLLBACK")


def test_a_refused_rotation_does_not_wait_for_the_write_lock(
    spec: str, make_client: MakeClient
) -> None:
    registry = open_registry(spec)
    try:
        alice = registry.enroll(candidate(make_client, "alice"), "alice", [])
        itself = candidate(make_client, "other")  # a successor that is refused ...
        registry.enroll(itself, "other", [])  # ... since it is enrolled already
        with write_lock_held(spec):
            start = time.monotonic()
            with pytest.raises(ConflictError, match="already enrolled"):
                registry.rotate(alice.fingerprint, itself, DAY)
            assert time.monotonic() - start < 2  # before: locked out for busy_timeout, 5 s
    finally:
        registry.close()


def test_a_refused_rotation_through_a_real_server_answers_while_another_change_runs(
    connect: Connect, make_client: MakeClient
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    stub = identity_pb2_grpc.IdentityStub(connect.channel(alice.cert_path, alice.key_path))
    again = rotate_request(alice.fingerprint, alice)
    with write_lock_held(str(connect.server_registry)):
        start = time.monotonic()
        code = code_of(lambda: stub.Rotate(again, timeout=10))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert time.monotonic() - start < 2
    # Allowed: a real successor is enrolled once the lock is free.
    nxt = rotate_request(alice.fingerprint, make_client("next"))
    assert stub.Rotate(nxt, timeout=10).client.name == "alice"


class Overtaken(SqlRegistry):
    """Runs the next of ``then`` (another connection's change), if any, between a rotation's
    checks and its change: the moment a concurrent admin could land."""

    then: list[Callable[[], object]]

    def _plan_rotation(
        self, q: Query, current: Fingerprint, successor: Candidate, overlap: dt.timedelta,
        now: dt.datetime,
    ) -> tuple[int, Client, list[Client]]:  # fmt: skip
        planned = super()._plan_rotation(q, current, successor, overlap, now)
        if self.then:
            self.then.pop(0)()
        return planned


def overtaken(spec: str, *changes: Callable[[], object]) -> SqlRegistry:
    registry = open_registry(spec)
    assert isinstance(registry, SqlRegistry)
    registry.__class__ = type("Overtaken", (Overtaken, type(registry)), {})
    registry.then = list(changes)  # type: ignore[attr-defined]
    return registry


def test_a_revocation_between_the_checks_and_the_change_refuses_the_rotation(
    spec: str, make_client: MakeClient
) -> None:
    admin = open_registry(spec)
    try:
        alice = admin.enroll(candidate(make_client, "alice"), "alice", [])
        registry = overtaken(spec, lambda: admin.revoke("alice"))
        try:
            with pytest.raises(ConflictError, match="revoked or already being retired"):
                registry.rotate(alice.fingerprint, candidate(make_client, "next"), DAY)
        finally:
            registry.close()
        assert not any(c.active for c in admin.clients())  # no successor slipped in
    finally:
        admin.close()


def test_an_unrelated_change_meanwhile_only_makes_the_rotation_check_again(
    spec: str, make_client: MakeClient
) -> None:
    admin = open_registry(spec)
    try:
        alice = admin.enroll(candidate(make_client, "alice"), "alice", [])
        bob = candidate(make_client, "bob")
        registry = overtaken(spec, lambda: admin.enroll(bob, "bob", []))
        try:
            nxt, previous = registry.rotate(alice.fingerprint, candidate(make_client, "n"), DAY)
        finally:
            registry.close()
        assert (nxt.name, previous.fingerprint) == ("alice", alice.fingerprint)
        assert sorted(c.name for c in admin.clients() if c.current) == ["alice", "bob"]
    finally:
        admin.close()


def test_a_rotation_overtaken_every_time_is_checked_under_the_lock_and_made(
    spec: str, make_client: MakeClient
) -> None:
    admin = open_registry(spec)
    try:
        alice = admin.enroll(candidate(make_client, "alice"), "alice", [])
        others = [candidate(make_client, f"o{i}") for i in range(ROTATE_TRIES)]
        changes = [functools.partial(admin.enroll, c, f"o{i}", []) for i, c in enumerate(others)]
        registry = overtaken(spec, *changes)
        try:
            nxt, _ = registry.rotate(alice.fingerprint, candidate(make_client, "n"), DAY)
        finally:
            registry.close()
        assert nxt.name == "alice" and nxt.current
        assert len(admin.clients()) == 2 + ROTATE_TRIES  # every change landed
    finally:
        admin.close()
