"""The client as its environment meets it: gRPC's roots variable, HTTP proxies, a certificate
outside its dates, and doctor on pipes and bad passphrases."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pinrpc.cli import Exit
from pinrpc.identity import generate_key, self_signed_certificate
from server.app import start_server
from server.config import ServerConfig
from server.devca import DevCA
from tests.certs import write_pair
from tests.conftest import Connect, MakeClient, enroll
from tests.test_client_cli import run
from tests.test_scripts import BIN

ROOTS_ENV = "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"
PROXY_VARIABLES = ("grpc_proxy", "https_proxy", "http_proxy", "no_grpc_proxy", "no_proxy")


def pinrpc(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    """The real `pinrpc` program in its own process (gRPC reads its roots variable once per
    process, and aborts the process on some values), bounded in time."""
    base = {k: v for k, v in os.environ.items() if k not in (ROOTS_ENV, *PROXY_VARIABLES)}
    done = subprocess.run(
        [str(BIN / "pinrpc"), *argv],
        capture_output=True,
        text=True,
        timeout=30,
        env={**base, **env},
    )
    assert "Traceback" not in done.stderr
    return done.returncode, done.stdout, done.stderr


def without_ca(flags: list[str]) -> list[str]:
    at = flags.index("--ca")
    return flags[:at] + flags[at + 2 :]


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("directory", "Is a directory"),  # gRPC aborts the process (SIGABRT, exit 134)
        ("missing", "No such file"),  # gRPC quietly falls back to other roots
        ("key", "contains a private key"),  # gRPC: "Socket closed", blamed on enrollment
    ],
)
def test_a_bad_grpc_roots_variable_is_one_line_naming_it(
    connect: Connect, make_client: MakeClient, tmp_path: Path, bad: str, says: str
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    path = {"directory": tmp_path, "missing": tmp_path / "nope.pem", "key": alice.key_path}[bad]
    flags = without_ca(connect.cli_flags(alice))
    code, out, err = pinrpc({ROOTS_ENV: str(path)}, "whoami", *flags)
    assert (code, out) == (Exit.ERROR, "")
    assert err.count("\n") == 1 and err.startswith(f"pinrpc: error: {ROOTS_ENV}: "), err
    assert says in err and str(path) in err
    # doctor names the variable as the thing to fix, not --ca.
    code, out, _ = pinrpc({ROOTS_ENV: str(path)}, "doctor", *flags)
    assert code == Exit.ERROR
    assert f"fix:                check {ROOTS_ENV}={path}" in out, out


def test_the_grpc_roots_variable_still_verifies_the_server(
    connect: Connect, make_client: MakeClient, tmp_path: Path
) -> None:
    """Allowed: the variable naming the right root, with no --ca; denied: another root."""
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    flags = without_ca(connect.cli_flags(alice))
    code, out, err = pinrpc({ROOTS_ENV: str(connect.devca.ca_path)}, "whoami", *flags)
    assert (code, err) == (Exit.OK, "") and "name         alice" in out
    code, _, err = pinrpc({ROOTS_ENV: str(alice.cert_path)}, "whoami", *flags)
    assert code == Exit.CONNECT and "could not verify the server" in err
