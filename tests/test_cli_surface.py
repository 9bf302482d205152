"""What a careful operator expects of the command lines."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tests.security.attacker import BIN, ROOT

VERSION = metadata.version("pinrpc")


def _run(argv: list[str], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's code, from any directory
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.parametrize(
    ("argv", "prog"),
    [
        ([str(BIN / "pinrpc")], "pinrpc"),
        ([str(BIN / "pinrpc-server")], "pinrpc-server"),
        ([sys.executable, str(ROOT / "scripts" / "obtain-cert")], "obtain-cert"),
    ],
    ids=["pinrpc", "pinrpc-server", "script"],
)
def test_version_is_the_installed_distributions_from_any_directory(
    argv: list[str], prog: str, tmp_path: Path
) -> None:
    done = _run([*argv, "--version"], cwd=tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{prog} {VERSION}\n", "")


def test_version_without_an_installed_distribution_says_so() -> None:
    # A checkout run through PYTHONPATH alone has no distribution metadata to read.
    from pinrpc.cli import installed_version

    assert installed_version("pinrpc-never-installed") == "unknown (not installed)"
