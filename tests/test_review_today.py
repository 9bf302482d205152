"""Review of the day's changes: what broke them, kept broken no more."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

from server.cli import _remove_unused
from server.stop_signals import StopSignals
from tests.conftest import (
    ECHO_ALL,
    Connect,
    MakeClient,
    ServerFiles,
    admitted,
)
from tests.security.attacker import BIN, server_env

# --- a failed start removes only a registry nobody else uses --------------------------------


def test_a_failed_start_leaves_the_registry_a_server_started_alongside_uses(
    connect: Connect, make_client: MakeClient
) -> None:
    # Two serves started together on a new path both saw it missing; the one that failed (a
    # busy port) removed the file the other was serving from, which then lost its registry.
    registry = connect.server_registry
    _remove_unused(registry)  # what the failed serve does on its way out
    assert registry.is_file()
    alice = make_client("alice")
    connect.enroll(alice, "alice", ECHO_ALL)
    assert admitted(connect.stub(alice.cert_path, alice.key_path))


def test_a_failed_start_on_a_symlinked_registry_removes_the_file_and_keeps_the_link(
    devca: ServerFiles, tmp_path: Path
) -> None:
    # SQLite creates the link's target; removing the link instead left that file behind and
    # took away the operator's link.
    target, link = tmp_path / "data" / "registry.db", tmp_path / "registry.db"
    target.parent.mkdir()
    link.symlink_to(target)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [str(BIN / "pinrpc-server"), "serve", "--listen", f"127.0.0.1:{port}",
             "--cert", str(devca.cert), "--key", str(devca.key), "--registry", str(link)],
            capture_output=True, text=True, timeout=60, env=server_env(), check=False,
        )  # fmt: skip
    assert done.returncode != 0
    assert "address in use" in done.stderr
    assert link.is_symlink()
    assert sorted(p.name for p in target.parent.iterdir()) == []


def test_serve_puts_back_the_signal_handlers_and_wakeup_fd_it_replaced() -> None:
    # serve runs inside longer-lived processes too (the tests run it in pytest's): it left its
    # do-nothing handlers and its own wake-up fd behind, so Ctrl-C did nothing afterwards.
    signums = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    before = {n: signal.getsignal(n) for n in signums}
    theirs, ours = socket.socketpair()
    ours.setblocking(False)
    previous = signal.set_wakeup_fd(ours.fileno())
    try:
        StopSignals(signums).close()
        assert {n: signal.getsignal(n) for n in signums} == before
        assert signal.set_wakeup_fd(previous) == ours.fileno()
    finally:
        theirs.close()
        ours.close()
