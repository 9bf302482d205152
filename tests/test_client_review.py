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


def pair_outside_dates(tmp_path: Path, *, expired: bool) -> tuple[Path, Path]:
    key = generate_key()
    shift = dt.timedelta(days=-30 if expired else 30)
    cert = self_signed_certificate(key, "outside", days=2, now=dt.datetime.now(dt.UTC) + shift)
    return write_pair(tmp_path / "outside", "outside", key, cert)


@pytest.mark.parametrize(
    ("expired", "says"), [(True, "EXPIRED on"), (False, "is not valid before")]
)
def test_a_certificate_outside_its_dates_is_refused_before_the_handshake(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], expired: bool, says: str
) -> None:
    """No server at all (a closed port): the client says why before trying to connect."""
    cert, key = pair_outside_dates(tmp_path, expired=expired)
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    flags = ["--server", f"127.0.0.1:{port}", "--cert", str(cert), "--key", str(key)]
    for command in (["whoami"], ["echo", "hi"]):
        code, out, err = run([*command, *flags], capsys)
        assert (code, out) == (Exit.CONNECT, "")
        assert f"your certificate {says}" in err and str(cert) in err, err
        assert "cannot reach" not in err
