"""Mistakes an operator walkthrough made: a server certificate without its intermediate
(warned about), --cert and --key swapped, a --registry in a missing directory (one clear line
each, nothing changed)."""

from __future__ import annotations

import datetime as dt
import logging
import os
import subprocess
from pathlib import Path

import pytest

from pinrpc.cli import Exit
from pinrpc.identity import cert_to_pem, generate_key, key_to_pem, self_signed_certificate
from server import cli as server_cli
from server.app import start_server
from server.config import ServerConfig
from server.enrollment import check_certificate
from server.registry import open_registry
from tests.conftest import SERVER_NAME, MakeClient, ServerFiles, enroll, registry_dump
from tests.security.attacker import BIN

NAMES = [SERVER_NAME, "127.0.0.1"]
LEAF_ONLY = "holds no intermediate"


def leaf_only_warnings(caplog: pytest.LogCaptureFixture) -> int:
    return sum(LEAF_ONLY in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_a_leaf_without_its_intermediate_is_warned_about_once_per_file_state(
    devca: ServerFiles, registry: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = devca.ca.issue(NAMES)
    cert, key = first.write(tmp_path)
    cert.write_bytes(cert_to_pem(first.leaf))
    config = ServerConfig("127.0.0.1:0", cert, key, str(registry), poll_interval=60)
    with caplog.at_level(logging.INFO, logger="pinrpc.trust"), start_server(config) as running:
        assert leaf_only_warnings(caplog) == 1
        assert str(cert.absolute()) in caplog.text and "fullchain.pem" in caplog.text
        running.trust.poll()
        cert.write_bytes(cert.read_bytes())  # touched, same certificate: no new warning
        running.trust.poll()
        assert leaf_only_warnings(caplog) == 1
        renewed = devca.ca.issue(NAMES, key=first.key)  # reloaded, still the leaf alone
        cert.write_bytes(cert_to_pem(renewed.leaf))
        running.trust.poll()
        running.trust.poll()
        assert leaf_only_warnings(caplog) == 2
        cert.write_bytes(renewed.fullchain_pem)  # fixed: reloaded without a warning
        running.trust.poll()
        assert running.trust.server_cert.chain_pem == renewed.fullchain_pem
        assert leaf_only_warnings(caplog) == 2


@pytest.mark.parametrize("kind", ["full chain", "self-signed"])
def test_a_full_chain_or_a_self_signed_certificate_gets_no_warning(
    devca: ServerFiles,
    registry: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    cert, key = devca.ca.issue(NAMES).write(tmp_path)
    if kind == "self-signed":
        own = generate_key("p256")
        key.write_bytes(key_to_pem(own))
        cert.write_bytes(cert_to_pem(self_signed_certificate(own, "server")))
    config = ServerConfig("127.0.0.1:0", cert, key, str(registry))
    with caplog.at_level(logging.INFO, logger="pinrpc.trust"), start_server(config):
        assert "serving server certificate" in caplog.text
    assert leaf_only_warnings(caplog) == 0


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


@pytest.mark.parametrize("parent", ["nodir", "a-file"])
def test_a_registry_in_a_missing_directory_is_named_in_one_line(
    tmp_path: Path, make_client: MakeClient, capsys: pytest.CaptureFixture[str], parent: str
) -> None:
    alice = make_client("alice")
    (tmp_path / "a-file").write_text("not a directory")
    before = sorted(p.name for p in tmp_path.iterdir())
    spec = tmp_path / parent / "reg.db"
    for argv in (
        ["enroll", str(alice.cert_path), "--name", "alice", "--registry", str(spec)],
        ["list", "--registry", str(spec)],
    ):
        capsys.readouterr()
        assert server_cli.main(argv) == Exit.ERROR
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        problem = "does not exist" if parent == "nodir" else "is not a directory"
        assert f"{tmp_path / parent} {problem}; check --registry" in err
        assert "unable to open" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "a-file").read_text() == "not a directory"
    # Deny and allow side by side: the same command with the directory there enrolls.
    (tmp_path / "nodir-made").mkdir()
    argv = ["enroll", str(alice.cert_path), "--name", "alice"]
    assert server_cli.main([*argv, "--registry", str(tmp_path / "nodir-made" / "reg.db")]) == 0


def test_a_failed_start_leaves_no_registry_it_created(
    devca: ServerFiles, registry: Path, tmp_path: Path, make_client: MakeClient
) -> None:
    """serve created a missing --registry before it failed on a bad --cert: a stray empty
    registry was left behind."""
    cert, key = devca.ca.issue(NAMES).write(tmp_path)
    new = tmp_path / "new.db"
    done = serve(key, cert, new)
    assert done.returncode != 0 and "swap them" in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("new.db")) == []
    # Beside it: an existing registry is kept, clients and all, when the start fails.
    enroll(registry, make_client("alice").cert_path, "alice")
    assert serve(key, cert, registry).returncode != 0
    assert registry.is_file() and "alice" in registry.read_bytes().decode(errors="replace")


def test_revoke_names_every_certificate_it_revoked(
    registry: Path, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """During a rotation's overlap, revoke by name also ends the retiring certificate, but
    said only the newest one's fingerprint."""
    first, rotated, other = make_client("c1"), make_client("c2"), make_client("o1")
    enroll(registry, first.cert_path, "carol")
    enroll(registry, other.cert_path, "olga")
    successor = check_certificate(rotated.cert_path.read_bytes(), "c2")
    reg = open_registry(str(registry))
    try:
        reg.rotate(first.fingerprint, successor, dt.timedelta(hours=1))
    finally:
        reg.close()
    capsys.readouterr()
    assert server_cli.main(["revoke", "carol", "--registry", str(registry)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"revoked carol ({rotated.fingerprint})"
    assert out[1:] == [f"revoked carol ({first.fingerprint}), the certificate it rotated from"]
    # By fingerprint, only that certificate is revoked, and only it is named.
    assert server_cli.main(["revoke", str(other.fingerprint), "--registry", str(registry)]) == 0
    assert capsys.readouterr().out.splitlines() == [f"revoked olga ({other.fingerprint})"]


# The console script's own entry, with psycopg made unimportable the way a missing package is
# (sys.modules[name] = None makes its import raise ImportError): the venv here has it installed.
WITHOUT_PSYCOPG = (
    "import sys; sys.modules['psycopg'] = None; from server.cli import main; "
    "sys.exit(main(sys.argv[1:]))"
)


def test_a_postgresql_registry_without_psycopg_is_one_line(tmp_path: Path) -> None:
    url = "postgresql://pinrpc@127.0.0.1:1/pinrpc"
    open_registry(str(tmp_path / "reg.db")).close()
    for argv in (["list", "--registry", url], ["copy-registry", str(tmp_path / "reg.db"), url]):
        done = subprocess.run(
            [str(BIN / "python"), "-c", WITHOUT_PSYCOPG, *argv],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == Exit.ERROR, done
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
        assert "needs psycopg" in done.stderr and "pinrpc[postgres]" in done.stderr
    # Deny and allow side by side: with psycopg, the same URL gets as far as the connection.
    done = subprocess.run(
        [str(BIN / "pinrpc-server"), "list", "--registry", url],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == Exit.ERROR and "psycopg" not in done.stderr, done.stderr
