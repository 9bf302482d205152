"""Review of the day's changes: what broke them, kept broken no more."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import cast

from server.cli import _remove_unused, _Signals
from tests.conftest import (
    ECHO_ALL,
    SERVER_NAME,
    Connect,
    MakeClient,
    ServerFiles,
    admitted,
    enroll,
)
from tests.postgres import Postgres
from tests.security.attacker import BIN, other_thread, serve_process, server_env

GRACE = 5.0  # ServerConfig.grace: serve has no flag for it

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


# --- a second signal, once the grace period is over -----------------------------------------


def _cluster(pg: Postgres) -> list[int]:
    """The cluster's postmaster and the backends it forked (all started by this test)."""
    main = int((pg.data / "postmaster.pid").read_text().split()[0])
    return [main, *map(int, Path(f"/proc/{main}/task/{main}/children").read_text().split())]


def _wait_for(log: Path, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"no {text!r} in {log.read_text()}"
        time.sleep(0.05)


def test_a_second_signal_taken_by_another_thread_after_the_grace_period_still_exits(
    devca: ServerFiles, pg: Postgres, tmp_path: Path, make_client: MakeClient
) -> None:
    # After the grace period the main thread waits, with no timeout, for the worker pool, which
    # a handler stuck on a hung registry holds. A signal the kernel gave another thread runs its
    # Python handler only in the main thread: the second Ctrl-C did nothing, for as long as the
    # registry hung.
    url = cast(Path, pg.create_database("review_stuck"))
    admin = make_client("admin")
    enroll(url, admin.cert_path, "admin", "/pinrpc.v1.Admin/*")
    log = tmp_path / "server.log"
    with serve_process(devca.cert, devca.key, url, log) as server:
        flags = ["--server", f"127.0.0.1:{server.port}", "--cert", str(admin.cert_path),
                 "--key", str(admin.key_path), "--ca", str(devca.ca_path),
                 "--server-name", SERVER_NAME, "--timeout", "120"]  # fmt: skip
        hung = _cluster(pg)
        for pid in hung:
            os.kill(pid, signal.SIGSTOP)
        call = subprocess.Popen([str(BIN / "pinrpc"), "admin", "list", *flags],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            _wait_for(log, "first call on this connection")  # the Admin call is in its handler
            server.process.send_signal(signal.SIGTERM)
            _wait_for(log, "stopping: finishing in-flight calls")
            time.sleep(GRACE + 1.5)  # the drain is over; the pool's shutdown waits for the handler
            assert server.process.poll() is None
            os.kill(other_thread(server.process.pid), signal.SIGTERM)
            assert server.process.wait(timeout=15) == 128 + signal.SIGTERM
        finally:
            for pid in hung:
                os.kill(pid, signal.SIGCONT)
            call.kill()
            call.wait(timeout=10)
    text = log.read_text()
    assert text.count("second signal: stopping without waiting for in-flight calls") == 1
    assert text.count("in-flight calls still running 3 s after the second signal") == 1
    assert "Traceback" not in text


def test_serve_puts_back_the_signal_handlers_and_wakeup_fd_it_replaced() -> None:
    # serve runs inside longer-lived processes too (the tests run it in pytest's): it left its
    # do-nothing handlers and its own wake-up fd behind, so Ctrl-C did nothing afterwards.
    signums = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    before = {n: signal.getsignal(n) for n in signums}
    theirs, ours = socket.socketpair()
    ours.setblocking(False)
    previous = signal.set_wakeup_fd(ours.fileno())
    try:
        _Signals(signums).close()
        assert {n: signal.getsignal(n) for n in signums} == before
        assert signal.set_wakeup_fd(previous) == ours.fileno()
    finally:
        theirs.close()
        ours.close()
