"""The last-full-admin check runs inside the change's write transaction, on SQLite and
PostgreSQL: two full admins ending each other at the same moment leave one."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from pinrpc.errors import ConflictError
from server.admin import ADMIN_ALL, _guards
from server.auth import Identity
from server.enrollment import Candidate, check_certificate
from server.registry import Client, open_registry
from server.registry_model import After, Guard, Registry
from tests.conftest import ECHO_ALL, MakeClient


def candidate(path: Path) -> Candidate:
    return check_certificate(path.read_bytes(), str(path))


def full_admin(name: str, cert: Path) -> Identity:
    return Identity(name, candidate(cert).fingerprint, (ADMIN_ALL,))


def end(
    registry: Registry, change: str, target: str, key: Path, guards: tuple[Guard, After]
) -> None:
    """Revoke ``target``, strip it to Echo, or re-key it to ``key`` with Echo only."""
    guard, after = guards
    if change == "revoke":
        registry.revoke(target, guard=guard, after=after)
    elif change == "permit":
        registry.permit(target, [ECHO_ALL], guard=guard, after=after)
    else:
        registry.enroll(candidate(key), target, [ECHO_ALL], replace=True, guard=guard, after=after)


@pytest.mark.parametrize("change", ["revoke", "permit", "enroll"])
def test_two_full_admins_ending_each_other_at_once_leave_one(
    change: str, spec: str, make_client: MakeClient
) -> None:
    """root's change of ops is in its transaction, made and being checked, when ops's change
    of root starts: that one waits for the write lock, then sees no other full admin left."""
    root, ops, key1, key2 = (make_client(n) for n in ("root", "ops", "key1", "key2"))
    first, second = open_registry(spec), open_registry(spec)
    outcome: list[object] = []

    def ops_ends_root() -> None:
        try:
            end(second, change, "root", key2.cert_path, _guards(full_admin("ops", ops.cert_path)))
            outcome.append("done")
        except ConflictError as exc:
            outcome.append(exc)

    worker = threading.Thread(target=ops_ends_root)
    guard, after = _guards(full_admin("root", root.cert_path))

    def racing(remaining: Callable[[], Sequence[Client]]) -> None:
        worker.start()
        worker.join(0.3)  # waits for the write lock root's change holds
        assert worker.is_alive()
        after(remaining)

    try:
        for files, name in ((root, "root"), (ops, "ops")):
            first.enroll(candidate(files.cert_path), name, [ADMIN_ALL])
        end(first, change, "ops", key1.cert_path, (guard, racing))
        worker.join(10)
        assert not worker.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], ConflictError), outcome
        assert f"would leave no client allowed all of {ADMIN_ALL}" in str(outcome[0])
        full = [c.name for c in first.clients() if c.active and c.allowed_methods == (ADMIN_ALL,)]
        assert full == ["root"]
    finally:
        first.close()
        second.close()
