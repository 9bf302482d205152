"""The audit trail of a real `pinrpc-server serve`, as an operator reads it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client import cli as client_cli
from pinrpc.cli import Exit
from tests.conftest import (
    ECHO_ALL,
    SERVER_NAME,
    MakeClient,
    ServerFiles,
    enroll,
    eventually,
    revoke,
)
from tests.security.attacker import serve_process


def events(log: Path) -> list[dict[str, object]]:
    lines = (json.loads(line) for line in log.read_text().splitlines() if line.startswith("{"))
    return [line for line in lines if line.get("logger") == "pinrpc.audit"]


def test_an_enrolled_clients_rotations_cannot_hide_a_revocation(
    devca: ServerFiles, make_client: MakeClient, registry: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    # Any enrolled client may rotate, as often as it likes, and each rotation writes change
    # lines (rotate, enroll, revoke of the old certificate). At the lowest --audit-rate one
    # rotation spends the changes' burst: before, the operator's revocation right after it was
    # only a count in suppressed_before, and the trail no longer said whom it revoked.
    alice, mallory = make_client("alice"), make_client("mallory")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    enroll(registry, mallory.cert_path, "mallory", ECHO_ALL)
    log = tmp_path / "server.log"
    with serve_process(devca.cert, devca.key, registry, log, "--log-format", "json",
                       "--audit-rate", "0.1") as server:  # fmt: skip
        flags = ["--server", f"127.0.0.1:{server.port}", "--cert", str(mallory.cert_path),
                 "--key", str(mallory.key_path), "--ca", str(devca.ca_path),
                 "--server-name", SERVER_NAME]  # fmt: skip
        assert client_cli.main(["rotate", "--overlap", "0", *flags]) == Exit.OK, capsys.readouterr()
        revoke(registry, str(alice.fingerprint))
        revoked = str(alice.fingerprint)

        def logged() -> bool:
            return any(e["event"] == "revoke" and e["fingerprint"] == revoked for e in events(log))

        eventually(logged, timeout=5)
        assert server.terminate() == 0
    assert "Traceback" not in log.read_text()
