"""Three small defects: a rotation's audit line names the older certificates it cut short;
`revoke` reports what it ended from inside its own transaction; Ctrl-C while the programs
import exits 130 without a traceback."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pinrpc.cli import Exit
from pinrpc.identity import Fingerprint, KeyPairFiles, load_certificate
from server import cli as server_cli
from server.logs import JsonFormatter, TextFormatter
from server.registry import Client, now_utc, open_registry
from server.registry_sql import SqlRegistry
from tests.conftest import Connect, MakeClient
from tests.test_client_cli import run
from tests.test_lifecycle import ADMIN
from tests.test_observe import audit_lines
from tests.test_registry_backends import candidate

HOUR = dt.timedelta(hours=1)
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


# -- 1. the rotate audit line names the older certificates it retired early ------------------


Line = dict[str, Any]


def rotate_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[Line, Line]]:
    """Each `rotate` record as both --log-format text and json write it."""
    text, as_json = TextFormatter(), JsonFormatter()
    lines: list[tuple[Line, Line]] = []
    for record in caplog.records:
        if record.name != "pinrpc.audit" or getattr(record, "audit", {}).get("event") != "rotate":
            continue
        _, _, message = text.format(record).partition("pinrpc.audit: ")
        lines.append((json.loads(message), json.loads(as_json.format(record))))
    return lines


def test_a_rotation_audit_line_names_the_older_certificates_it_retired_early(
    connect: Connect,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    bob, carol = make_client("bob"), make_client("carol")
    connect.enroll(bob, "bob")
    connect.enroll(carol, "carol")

    def rotate(files: KeyPairFiles, *overlap: str) -> Fingerprint:
        """`pinrpc rotate`; the fingerprint it rotated from."""
        before = Fingerprint.of(load_certificate(files.cert_path))
        code, _, err = run(["rotate", *overlap, *connect.cli_flags(files)], capsys)
        assert code == Exit.OK, err
        return before

    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        rotate(carol)  # another client's overlap (24 h): never bob's to cut short
        a = rotate(bob)  # A retiring for 24 h
        start = now_utc()
        b = rotate(bob, "--overlap", "3600")  # brings A forward to now + 1 h
        end = now_utc()
        c = rotate(bob, "--overlap", "7200")  # A and B already end sooner: nothing cut short
        d = rotate(bob, "--overlap", "0")  # A, B and C end now
        connect.server.audit.flush()
        lines = rotate_lines(caplog)
    assert len(lines) == 5
    registry = open_registry(str(connect.server_registry), readonly=True)
    try:
        rows = {c.fingerprint: c for c in registry.clients()}
    finally:
        registry.close()

    def named(line: Line) -> list[str]:
        return [e["fingerprint"] for e in line["retired_early"]]

    for (text, as_json), previous in zip(lines, [None, a, b, c, d], strict=True):
        assert text["retired_early"] == as_json["retired_early"]
        # The fields tests and docs already rely on are all still there.
        for field in ("client", "fingerprint", "previous", "overlap_seconds"):
            assert text[field] == as_json[field]
        if previous is not None:
            assert text["client"] == "bob" and text["previous"] == str(previous)
    # Deny: nothing cut short when there was nothing older (nor another client's), or when the
    # older ones already ended sooner.
    assert [named(text) for text, _ in lines] == [
        [], [], [str(a)], [], [str(a), str(b), str(c)]
    ]  # fmt: skip
    # The end named is A's new one, this rotation's now + 1 h...
    (cut,) = lines[2][0]["retired_early"]
    assert start + HOUR <= dt.datetime.fromisoformat(cut["retire_at"]) <= end + HOUR
    # ... and, for the last rotation, exactly what the registry holds.
    for entry in lines[4][1]["retired_early"]:
        row = rows[Fingerprint.parse(entry["fingerprint"])]
        assert row.retire_at is not None and entry["retire_at"] == row.retire_at.isoformat()
    # Carol's retiring certificate keeps its own end.
    carol_ends = [c.retire_at for c in rows.values() if c.name == "carol" and c.retire_at]
    assert len(carol_ends) == 1 and carol_ends[0] > now_utc() + 23 * HOUR


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
            b, _ = other.rotate(a.fingerprint, candidate(make_client, "bob2"), 24 * HOUR)
            c, *_ = other.rotate(b.fingerprint, candidate(make_client, "bob3"), 24 * HOUR)
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
        b, _ = registry.rotate(a.fingerprint, candidate(make_client, "a2"), 24 * HOUR)
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


# -- 3. Ctrl-C while the programs import ------------------------------------------------------

# Loaded by the child at start-up (PYTHONPATH): the first import of the named module signals
# the parent and waits there, so that SIGINT provably arrives while the import is running.
SLOW_IMPORT = """\
import os, sys, time

class _Slow:
    def find_spec(self, name, path=None, target=None):
        if name != os.environ["SLOW_IMPORT"]:
            return None
        sys.meta_path.remove(self)
        os.write(int(os.environ["SLOW_IMPORT_FD"]), b"x")
        time.sleep(30)  # SIGINT raises KeyboardInterrupt here, inside the import
        return None

sys.meta_path.insert(0, _Slow())
"""


@pytest.mark.parametrize(
    ("program", "module"),
    [
        ("pinrpc", "cryptography"),
        ("pinrpc", "grpc"),
        ("pinrpc-server", "cryptography"),
        ("pinrpc-server", "sqlite3"),
    ],
)
def test_ctrl_c_while_importing_exits_130_quietly(
    program: str, module: str, tmp_path: Path
) -> None:
    (tmp_path / "sitecustomize.py").write_text(SLOW_IMPORT)
    ready, signal_fd = os.pipe()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join((str(tmp_path), str(REPO))),
        "SLOW_IMPORT": module,
        "SLOW_IMPORT_FD": str(signal_fd),
    }
    argv = [str(BIN / program), "--version"]
    child = subprocess.Popen(
        argv, env=env, pass_fds=(signal_fd,), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    os.close(signal_fd)
    try:
        assert select.select([ready], [], [], 30)[0], f"{program} never imported {module}"
        assert os.read(ready, 1) == b"x"
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=30)
    finally:
        os.close(ready)
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 130, err
    assert b"Traceback" not in err and err.count(b"\n") <= 1, err
    assert out == b""


def test_a_remote_revoke_by_name_names_every_certificate_it_ended(
    connect: Connect,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`pinrpc admin revoke bob` during bob's rotation overlap ends both his certificates; the
    watcher's `revoke` lines name nobody, so the admin line says which it ended besides."""
    root, bob, carol = make_client("root"), make_client("bob"), make_client("carol")
    connect.enroll(root, "root", ADMIN)
    connect.enroll(bob, "bob")
    connect.enroll(carol, "carol")
    retiring = Fingerprint.of(load_certificate(bob.cert_path))
    assert run(["rotate", *connect.cli_flags(bob)], capsys)[0] == Exit.OK  # 24 h overlap
    current = Fingerprint.of(load_certificate(bob.cert_path))
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        for ref in ("bob", "carol"):
            code, _, err = run(["admin", "revoke", ref, *connect.cli_flags(root)], capsys)
            assert code == Exit.OK, err
        lines = audit_lines(caplog, connect.server.audit)
    revokes = [line for line in lines if line["event"] == "admin"]
    assert [(line["client"], line["also_revoked"]) for line in revokes] == [
        ("bob", [str(retiring)]),
        ("carol", []),  # nothing else to end: carol never rotated
    ]
    assert revokes[0]["fingerprint"] == str(current)
