"""A narrow administrator's reach is checked inside the change's own transaction, on the rows
the change acts on: checked on an earlier read, another admin's Permit or re-key that landed
between the check and the change let it end, strip or take over a full administrator."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from pinrpc.cli import Exit
from pinrpc.errors import ConflictError
from server.admin import ADMIN_ALL, OutOfReachError
from server.enrollment import Candidate, check_certificate
from server.registry import Client, SqliteRegistry, open_registry
from server.registry_model import Guard
from server.registry_sql import SqlRegistry
from tests.conftest import ECHO_ALL, Connect, MakeClient, registry_dump
from tests.test_lifecycle import run

ADMIN = "/pinrpc.v1.Admin/"
NARROW = [ADMIN + m for m in ("Enroll", "Revoke", "Permit")]


def candidate(path: Path) -> Candidate:
    return check_certificate(path.read_bytes(), str(path))


@pytest.fixture
def meanwhile(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, Callable[[], None]], None]:
    """Run ``change`` (a real write through a second registry handle) once, when the server
    enters the registry change ``method``: after any check the server made on an earlier
    read, before the change's own transaction."""

    def arm(method: str, change: Callable[[], None]) -> None:
        original = getattr(SqliteRegistry, method)
        fired = threading.Event()

        def hooked(self: SqliteRegistry, *args: object, **kwargs: object) -> object:
            if not fired.is_set():
                fired.set()
                change()
            return original(self, *args, **kwargs)

        monkeypatch.setattr(SqliteRegistry, method, hooked)

    return arm


@pytest.fixture
def other_admin(connect: Connect) -> Iterator[SqlRegistry]:
    """A second handle on the server's registry: another administrator's `pinrpc-server`."""
    handle = open_registry(str(connect.server_registry))
    assert isinstance(handle, SqlRegistry)
    yield handle
    handle.close()


def denials(caplog: pytest.LogCaptureFixture) -> list[tuple[object, object]]:
    records = (json.loads(r.getMessage()) for r in caplog.records if r.name == "pinrpc.audit")
    return [
        (r["client"], r["method"]) for r in records if r.get("reason") == "beyond_own_permissions"
    ]


@pytest.mark.parametrize("action", ["revoke", "permit", "enroll"])
def test_a_change_landing_after_the_check_cannot_carry_a_narrow_admin_beyond_its_reach(
    action: str,
    connect: Connect,
    make_client: MakeClient,
    meanwhile: Callable[[str, Callable[[], None]], None],
    other_admin: SqlRegistry,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    mallory, bob, holder, puppet = (make_client(n) for n in ("mallory", "bob", "holder", "pup"))
    connect.enroll(mallory, "mallory", *NARROW, ECHO_ALL)
    connect.enroll(bob, "bob", ECHO_ALL)  # within mallory's reach when it asks
    if action == "enroll":
        # Another admin re-keys bob for a new holder, with all of Admin; mallory's re-key
        # would revoke that holder and hand its permissions to mallory's own key.
        def widen() -> None:
            other_admin.enroll(candidate(holder.cert_path), "bob", [ADMIN_ALL], replace=True)

        argv = ["enroll", str(puppet.cert_path), "--name", "bob", "--replace"]
    else:

        def widen() -> None:
            other_admin.permit("bob", [ADMIN_ALL])  # another admin makes bob a full admin

        argv = ["revoke", "bob"] if action == "revoke" else ["permit", "bob", "--allow", ECHO_ALL]
    meanwhile(action, widen)
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        code, _, err = run(["admin", *argv, *connect.cli_flags(mallory)], capsys)
        connect.server.audit.flush()
    assert code == Exit.DENIED, err
    assert f"'mallory' is not allowed all of {ADMIN_ALL}" in err and "held by 'bob'" in err
    listed = registry_dump(connect.server_registry, capsys)
    bobs = [c for c in listed if c["name"] == "bob" and c["revoked_at"] is None]  # type: ignore[attr-defined]
    expected = holder if action == "enroll" else bob
    assert [(c["fingerprint"], c["allowed_methods"]) for c in bobs] == [
        (str(expected.fingerprint), [ADMIN_ALL])
    ]
    assert str(puppet.fingerprint) not in json.dumps(listed)
    assert denials(caplog) == [("mallory", ADMIN + action.capitalize())]


def guarded(registry: SqlRegistry, change: str, successor: Path, guard: Guard) -> None:
    """Revoke bob, narrow bob's permissions, or re-key bob to ``successor``, with ``guard``."""
    if change == "revoke":
        registry.revoke("bob", guard=guard)
    elif change == "permit":
        registry.permit("bob", ["/pinrpc.v1.Echo/Echo"], guard=guard)
    else:
        registry.enroll(candidate(successor), "bob", [], replace=True, guard=guard)


@pytest.mark.parametrize("change", ["revoke", "permit", "enroll"])
def test_the_guard_runs_under_the_changes_write_lock(
    change: str, spec: str, make_client: MakeClient
) -> None:
    """Both backends: a change another handle starts while the guard runs lands only after the
    guarded change committed, so what the guard saw is what the change changed."""
    bob, bob2 = make_client("bob"), make_client("bob2")
    first, second = open_registry(spec), open_registry(spec)
    assert isinstance(first, SqlRegistry)
    threads: list[threading.Thread] = []
    outcome: list[object] = []
    seen: list[Client] = []

    def widen() -> None:
        try:
            outcome.append(second.permit("bob", [ADMIN_ALL]).allowed_methods)
        except ConflictError as exc:
            outcome.append(exc)

    def guard(clients: Sequence[Client]) -> None:
        seen.extend(clients)
        worker = threading.Thread(target=widen)
        worker.start()
        threads.append(worker)
        worker.join(0.3)  # waits for the write lock: it cannot widen bob meanwhile
        assert worker.is_alive()

    try:
        first.enroll(candidate(bob.cert_path), "bob", [ECHO_ALL])
        guarded(first, change, bob2.cert_path, guard)
        threads[0].join(10)
        assert not threads[0].is_alive()
        assert [c.fingerprint for c in seen] == [bob.fingerprint]
        if change == "revoke":  # bob was revoked first: the later permit is refused
            assert isinstance(outcome[0], ConflictError), outcome
        else:
            assert outcome == [(ADMIN_ALL,)]
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("change", ["revoke", "permit", "enroll"])
def test_a_refusing_guard_changes_nothing(change: str, spec: str, make_client: MakeClient) -> None:
    bob, bob2 = make_client("bob"), make_client("bob2")
    registry = open_registry(spec)
    assert isinstance(registry, SqlRegistry)

    def refuse(clients: Sequence[Client]) -> None:
        raise OutOfReachError(f"refused {[c.name for c in clients]}")

    try:
        registry.enroll(candidate(bob.cert_path), "bob", [ECHO_ALL])
        before, generation = registry.clients(), registry.generation()
        with pytest.raises(OutOfReachError, match=r"refused \['bob'\]"):
            guarded(registry, change, bob2.cert_path, refuse)
        assert (registry.clients(), registry.generation()) == (before, generation)
    finally:
        registry.close()
