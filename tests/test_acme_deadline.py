"""obtain-cert's --deadline: a CA that trickles its answer cannot keep a run (and --out's lock)
alive; real pebble and a real HTTPS server that sends a byte every half second."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from pinrpc.errors import AcmeError
from server.acme import main, obtain_certificate
from server.devca import DevCA
from tests.https import serving_pages
from tests.pebble import Pebble
from tests.ports import free_port
from tests.test_acme import _assert_one_line_error, _matching_pair

_BYTE_EVERY_S = 0.5  # far below requests' 30 s per read: only an overall deadline ends it
_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Pad: " + b"x" * 1000


def _trickle(conn: socket.socket, context: ssl.SSLContext | None, stop: threading.Event) -> None:
    """Read one request (over TLS with ``context``), then answer it a byte at a time."""
    conn.settimeout(10)
    try:
        with context.wrap_socket(conn, server_side=True) if context else conn as peer:
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 65536:
                chunk = peer.recv(4096)
                if not chunk:
                    return
                request += chunk
            for byte in _ANSWER:  # bounded: 1000 bytes, and the test stops it sooner
                if stop.wait(_BYTE_EVERY_S):
                    return
                peer.sendall(bytes([byte]))
    except OSError:  # the client gave up (what the test wants), or the handshake failed
        conn.close()


@contextmanager
def _trickler(context: ssl.SSLContext | None) -> Iterator[int]:
    """A server on loopback that trickles its answers (``_trickle``); yields its port."""
    stop = threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    workers: list[threading.Thread] = []

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            worker = threading.Thread(target=_trickle, args=(conn, context, stop), daemon=True)
            worker.start()
            workers.append(worker)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        acceptor.join(timeout=5)
        listener.close()
        for worker in workers:
            worker.join(timeout=5)


@pytest.fixture
def trickling_ca(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTPS 'CA' that accepts, reads the request and answers a byte at a time:
    yields (directory URL, the CA file that verifies its TLS certificate)."""
    ca = DevCA("pinrpc test trickling CA")
    cert, key = ca.issue(["127.0.0.1"], days=1).write(tmp_path)
    ca_file = tmp_path / "trickle-ca.pem"
    ca_file.write_bytes(ca.root_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with _trickler(context) as port:
        yield f"https://127.0.0.1:{port}/dir", ca_file


def _issue(pebble: Pebble, out: Path, *extra: str) -> int:
    argv = ["--directory", pebble.directory_url, "--domain", "server.test", "--out", str(out)]
    argv += ["--http-port", str(free_port()), "--ca-bundle", str(pebble.acme_ca_bundle)]
    return main([*argv, *extra])


def _snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    """Every file in --out with its bytes and mode (temporary files would show up too)."""
    return {p.name: (p.read_bytes(), p.stat().st_mode) for p in out.iterdir()}


def _argv(url: str, ca: Path, out: Path, *extra: str) -> list[str]:
    argv = ["--directory", url, "--domain", "server.test", "--out", str(out)]
    return [*argv, "--http-port", str(free_port()), "--ca-bundle", str(ca), *extra]


def test_a_trickling_ca_is_given_up_at_the_deadline_and_changes_nothing(
    pebble: Pebble, trickling_ca: tuple[str, Path], tmp_path: Path
) -> None:
    """As cron runs it, a process of its own: before --deadline it ran until the CA stopped."""
    out = tmp_path / "tls"
    assert _issue(pebble, out) == 0
    (out / "privkey.pem").chmod(0o640)  # a mode of the operator's that must survive too
    before = _snapshot(out)
    script = Path(__file__).parent.parent / "scripts" / "obtain-cert"
    url, ca = trickling_ca
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    started = time.monotonic()
    run = subprocess.Popen(
        [sys.executable, str(script), *_argv(url, ca, out, "--deadline", "3")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        _, err = run.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        run.kill()
        run.communicate()
        pytest.fail("obtain-cert still ran after 15 s against a trickling CA (no deadline)")
    took = time.monotonic() - started
    assert run.returncode == 1, err
    _assert_one_line_error(err, f"no certificate from {url} within the deadline of 3 s")
    assert 3 <= took < 8, took
    assert _snapshot(out) == before
    # The lock went with the run: the next one (cron's, say) gets a certificate at once.
    assert _issue(pebble, out) == 0
    assert _matching_pair(out)


def test_in_process_the_deadline_releases_the_lock_and_restores_the_callers_alarm(
    pebble: Pebble,
    trickling_ca: tuple[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """main() called in-process (tests, scripts/demo-compose): the lock is released although
    the process lives on, and the caller's SIGALRM handler and pending timer come back."""
    out = tmp_path / "tls"
    assert _issue(pebble, out) == 0
    before = _snapshot(out)
    capsys.readouterr()
    fired: list[int] = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    signal.setitimer(signal.ITIMER_REAL, 100)
    try:
        started = time.monotonic()
        assert main(_argv(*trickling_ca, out, "--deadline", "2")) == 1
        assert 2 <= time.monotonic() - started < 6
        _assert_one_line_error(capsys.readouterr().err, "within the deadline of 2 s")
        assert _snapshot(out) == before
        assert _issue(pebble, out) == 0  # not refused by the lock
        assert _matching_pair(out)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 80 < remaining < 100  # the caller's timer, counted down meanwhile
        assert fired == []
        os.kill(os.getpid(), signal.SIGALRM)
        assert fired == [signal.SIGALRM]  # and the caller's handler
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_trickling_ca_is_given_up_at_the_deadline_in_a_thread(
    pebble: Pebble, trickling_ca: tuple[str, Path], tmp_path: Path
) -> None:
    """A renewal in a caller's thread, where SIGALRM cannot reach: before, it ran on until
    the CA stopped trickling (500 s here)."""
    out = tmp_path / "tls"
    assert _issue(pebble, out) == 0
    before = _snapshot(out)
    url, ca = trickling_ca
    outcome: list[BaseException | None] = []

    def renew() -> None:
        try:
            obtain_certificate(url, ["server.test"], out, http_port=free_port(),
                               acme_ca_bundle=ca, deadline_s=2)  # fmt: skip
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)
        else:
            outcome.append(None)

    started = time.monotonic()
    worker = threading.Thread(target=renew, daemon=True)
    worker.start()
    worker.join(timeout=15)  # before: it ran until the CA stopped trickling (500 s here)
    assert not worker.is_alive(), "obtain_certificate ignored its deadline off the main thread"
    assert 2 <= time.monotonic() - started < 8
    (error,) = outcome
    assert isinstance(error, AcmeError), repr(error)
    assert f"no certificate from {url} within the deadline of 2 s" in str(error)
    assert _snapshot(out) == before
    # The allow beside it: the lock went with the run, and a thread's renewal from a CA that
    # answers gets its certificate under the same deadline.
    worker = threading.Thread(target=lambda: outcome.append(None) if obtain_certificate(
        pebble.directory_url, ["server.test"], out, http_port=free_port(),
        acme_ca_bundle=pebble.acme_ca_bundle, deadline_s=60) else None, daemon=True)  # fmt: skip
    worker.start()
    worker.join(timeout=60)
    assert outcome == [error, None]
    assert _matching_pair(out)


def test_a_normal_issuance_is_within_the_default_deadline(
    pebble: Pebble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    previous = signal.getsignal(signal.SIGALRM)
    assert _issue(pebble, tmp_path) == 0
    assert "wrote" in capsys.readouterr().out
    assert _matching_pair(tmp_path)
    assert signal.getsignal(signal.SIGALRM) is previous
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "1e300", "soon"])
def test_a_bad_deadline_is_a_one_line_usage_error(
    value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--directory", "https://127.0.0.1:1/dir", "--domain", "server.test"]
    assert main([*argv, "--out", str(tmp_path / "tls"), "--deadline", value]) == 2
    _assert_one_line_error(capsys.readouterr().err, "--deadline")
    assert not (tmp_path / "tls").exists()


@pytest.fixture
def plain_trickler() -> Iterator[str]:
    """A plain-HTTP server that reads a request and answers a byte at a time: yields its URL."""
    with _trickler(None) as port:
        yield f"http://127.0.0.1:{port}"


def test_a_directory_naming_plain_http_urls_is_given_up_at_the_deadline_in_a_thread(
    plain_trickler: str, tmp_path: Path
) -> None:
    """The directory URL must be https://, but the URLs the directory names are the CA's to
    choose: off the main thread the deadline reached only https:// connections, so a CA (or
    a proxy rewriting its directory) naming a trickling http:// one held the run for good."""
    urls = {key: f"{plain_trickler}/{key}" for key in ("newNonce", "newAccount", "newOrder")}
    directory = json.dumps({**urls, "revokeCert": f"{plain_trickler}/r"}).encode()
    outcome: list[BaseException | None] = []
    with serving_pages({"/dir": directory}, tmp_path) as (base, ca):

        def renew() -> None:
            try:
                out, port = tmp_path / "tls", free_port()
                obtain_certificate(
                    f"{base}/dir", ["server.test"], out, http_port=port, acme_ca_bundle=ca,
                    deadline_s=2,
                )  # fmt: skip
            except BaseException as exc:  # handed to the test's thread
                outcome.append(exc)

        worker = threading.Thread(target=renew, daemon=True)
        worker.start()
        worker.join(timeout=15)  # before: on until the trickle ended (500 s)
    assert not worker.is_alive(), "the deadline missed a plain-http connection"
    (error,) = outcome
    assert isinstance(error, AcmeError) and "within the deadline of 2 s" in str(error), error
