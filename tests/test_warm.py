"""--warm-start FILE: what is read at start and what is saved (server/warm.py)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from server.app import start_server
from tests.conftest import ECHO_ALL, Connect, MakeClient, ServerFiles, enroll, whoami
from tests.test_handover import handover_config


def unblock_after(fifo: Path, seconds: float) -> threading.Timer:
    """Open ``fifo`` for writing after ``seconds``: a start-up blocked on reading it then
    goes on, so a regression fails the test instead of hanging the suite."""

    def open_writer() -> None:
        with contextlib.suppress(OSError):  # ENXIO: no reader waiting, nothing to unblock
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    timer = threading.Timer(seconds, open_writer)
    timer.start()
    return timer


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_warm_path_that_is_not_a_regular_file_is_ignored_and_left_alone(
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    alice = make_client("alice")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    warm_path = tmp_path / "warm"
    os.mkfifo(warm_path) if kind == "fifo" else warm_path.mkdir()
    config = replace(handover_config(registry, devca.cert, devca.key), warm_start=warm_path)
    timer = unblock_after(warm_path, 5.0)
    try:
        started = time.monotonic()
        with caplog.at_level(logging.WARNING), start_server(config) as running:
            assert time.monotonic() - started < 5.0
            assert whoami(Connect(running, devca).stub(alice.cert_path, alice.key_path))
    finally:
        timer.cancel()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"ignoring the warm-start file {warm_path}: not a regular file" in warnings
    # alice was seen, so stopping tried to save: the path must stay what it was.
    assert f"could not save the warm-start file {warm_path}: not a regular file" in warnings
    assert warm_path.is_fifo() if kind == "fifo" else warm_path.is_dir()
