"""`pinrpc-server serve` settles the garbage collector once it serves (server/gc_tuning.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from server.gc_tuning import YOUNG_THRESHOLD
from tests.conftest import ServerFiles

# Runs the real CLI; a thread stops `serve` once it has settled (or after 20 s), and the state
# of the collector is printed at exit.
_PROBE = """
import atexit, gc, os, signal, sys, threading, time
atexit.register(lambda: print(gc.get_freeze_count() > 0, gc.get_threshold()[0]))
def stop_once_settled():
    deadline = time.monotonic() + 20
    while not gc.get_freeze_count() and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=stop_once_settled, daemon=True).start()
from server import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def _collector_after(*argv: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()[-1]


def test_serve_freezes_start_up_objects_and_raises_the_young_threshold(
    devca: ServerFiles, registry: Path
) -> None:
    serve = ["serve", "--listen", "127.0.0.1:0", "--cert", str(devca.cert),
             "--key", str(devca.key), "--registry", str(registry)]  # fmt: skip
    assert _collector_after(*serve) == f"True {YOUNG_THRESHOLD}"
    # The admin commands are short-lived and keep CPython's defaults.
    assert _collector_after("list", "--registry", str(registry)) == "False 700"
