"""The server certificate files an operator can get wrong: a leaf without its intermediate
(warned about), and --cert and --key swapped (one clear line)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import SERVER_NAME, MakeClient, ServerFiles, enroll, registry_dump
from tests.security.attacker import BIN

NAMES = [SERVER_NAME, "127.0.0.1"]


def serve(cert: Path, key: Path, registry: Path) -> subprocess.CompletedProcess[str]:
    """The real `pinrpc-server serve`, which should refuse to start."""
    argv = [str(BIN / "pinrpc-server"), "serve", "--listen", "127.0.0.1:0",
            "--cert", str(cert), "--key", str(key), "--registry", str(registry)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, check=False)


def test_swapped_cert_and_key_are_named_in_one_line(
    devca: ServerFiles,
    registry: Path,
    tmp_path: Path,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cert, key = devca.ca.issue(NAMES).write(tmp_path)
    enroll(registry, make_client("alice").cert_path, "alice")
    before = cert.read_bytes(), key.read_bytes(), registry_dump(registry, capsys)
    done = serve(key, cert, registry)
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"--cert {key} holds a private key and --key {cert} a certificate: swap them" in (
        done.stderr
    )
    assert "cryptography.io" not in done.stderr and "Traceback" not in done.stderr
    assert (cert.read_bytes(), key.read_bytes(), registry_dump(registry, capsys)) == before


def test_a_key_given_as_both_files_is_not_called_a_swap(
    devca: ServerFiles, registry: Path, tmp_path: Path
) -> None:
    _, key = devca.ca.issue(NAMES).write(tmp_path)
    done = serve(key, key, registry)
    assert done.returncode != 0 and done.stderr.count("\n") == 1, done.stderr
    assert "holds a private key, not the certificate chain" in done.stderr
    assert "swap" not in done.stderr and "Traceback" not in done.stderr
