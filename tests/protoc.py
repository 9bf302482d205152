"""Compile a test's own .proto files with grpc_tools and import what they generate."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def on_path(root: Path, include: str, out: str, *protos: str) -> Iterator[None]:
    """protoc ``protos`` (paths under ``root``, found through ``include``) into ``out``; that
    directory is on sys.path while the context is open, so the test imports the modules."""
    argv = [f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}", *protos]
    done = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", *argv],
        cwd=root, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    where = str(root / out)
    sys.path.insert(0, where)
    try:
        yield
    finally:
        sys.path.remove(where)
