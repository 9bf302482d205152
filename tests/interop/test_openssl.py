"""openssl s_client against a real pinrpc server: what a client that is not gRPC sees.

Its banner is no evidence: s_client prints the negotiated session (ALPN h2 included) even when
the server refuses the client certificate, because that refusal is a plain TCP close with no
TLS alert, right after the client's side of the handshake (TLS 1.3) or during it (TLS 1.2).
What counts is whether an HTTP/2 exchange happens: the server acknowledges our SETTINGS.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from typing import IO

import pytest

from tests.conftest import Connect, MakeClient
from tests.interop import TIMEOUT, require_tool, tls_files

# Client connection preface + an empty SETTINGS frame; the server answers with SETTINGS ACK.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
SETTINGS_ACK = bytes.fromhex("000000040100000000")
VERSIONS = ["-tls1_3", "-tls1_2"]


@pytest.fixture
def openssl() -> str:
    return require_tool("openssl", "openssl (Debian package openssl)")


def s_client(openssl: str, files: dict[str, str], version: str, *, cert: bool) -> list[str]:
    argv = [openssl, "s_client", version, "-connect", files["target"], "-alpn", "h2"]
    argv += ["-servername", files["name"], "-verify_hostname", files["name"]]
    argv += ["-CAfile", files["ca"], "-verify_return_error", "-ign_eof"]
    return argv + (["-cert", files["cert"], "-key", files["key"]] if cert else [])


def exchange(argv: list[str]) -> tuple[int | None, bytes, bytes]:
    """Send the preface; wait until the server acknowledges it or closes (at most TIMEOUT s).

    Returns the exit code (None: still connected when we stopped it), stdout and stderr.
    """
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = bytearray(), bytearray()
    readers = [
        threading.Thread(target=drain, args=(stream, into))
        for stream, into in ((proc.stdout, out), (proc.stderr, err))
    ]
    for reader in readers:
        reader.start()
    assert proc.stdin is not None
    # stdin stays open: with -ign_eof s_client reads until the server closes. A server that
    # refuses during the handshake may close before we even wrote: that is a refusal too.
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.write(PREFACE)
        proc.stdin.flush()
    deadline = time.monotonic() + TIMEOUT
    while proc.poll() is None and SETTINGS_ACK not in out and time.monotonic() < deadline:
        time.sleep(0.02)
    code = proc.poll()
    if code is None:
        proc.terminate()  # the connection is still open: our own process, stopped by handle
        proc.wait(TIMEOUT)
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()
    for reader in readers:
        reader.join(TIMEOUT)
    return code, bytes(out), bytes(err)


def drain(stream: IO[bytes], into: bytearray) -> None:
    with stream:
        while chunk := stream.read1(4096):  # type: ignore[attr-defined]
            into.extend(chunk)


@pytest.mark.parametrize("version", VERSIONS)
def test_enrolled_certificate_gets_an_http2_exchange(
    openssl: str, connect: Connect, make_client: MakeClient, version: str
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    code, out, err = exchange(s_client(openssl, tls_files(connect, alice), version, cert=True))
    assert code is None, err  # the server kept the connection open
    assert b"ALPN protocol: h2" in out
    assert b"Verify return code: 0 (ok)" in out
    assert SETTINGS_ACK in out  # application data went both ways over the mTLS connection


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("who", ["unenrolled", "no-certificate"])
def test_refused_client_gets_closed_connection(
    openssl: str, connect: Connect, make_client: MakeClient, version: str, who: str
) -> None:
    connect.enroll(make_client("alice"), "alice")
    files = tls_files(connect, make_client("mallory"))
    code, out, err = exchange(s_client(openssl, files, version, cert=who == "unenrolled"))
    assert code == 1
    assert SETTINGS_ACK not in out
    assert b"unexpected eof while reading" in err  # no alert: the server just closed
    assert b"ALPN protocol: h2" in out  # the misleading banner, printed all the same
