"""What a careful operator expects of the command lines: --version, a warning about a registry
that `serve` had to create, a second Ctrl-C that stops at once, and `pinrpc-server obtain-cert`
from an installed wheel (and one line when its extra is missing)."""

from __future__ import annotations

import itertools
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import cast

import pytest
from cryptography import x509

from pinrpc import secure_channel
from pinrpc.v1 import echo_pb2, echo_pb2_grpc
from tests.conftest import ECHO_ALL, SERVER_NAME, MakeClient, ServerFiles, enroll
from tests.pebble import Pebble
from tests.ports import free_port
from tests.postgres import Postgres
from tests.security.attacker import BIN, ROOT, other_thread, serve_process

VERSION = metadata.version("pinrpc")
GRACE = 5.0  # ServerConfig.grace: serve has no flag for it


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
        ([str(BIN / "pinrpc-server"), "obtain-cert"], "pinrpc-server obtain-cert"),
        ([sys.executable, str(ROOT / "scripts" / "obtain-cert")], "obtain-cert"),
    ],
    ids=["pinrpc", "pinrpc-server", "subcommand", "script"],
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


# --- serve and its registry ----------------------------------------------------------------

CREATED = "did not exist: created it empty, so no client is enrolled"


def _serve_log(devca: ServerFiles, registry: Path | str, tmp_path: Path) -> str:
    log = tmp_path / "server.log"
    # serve_process passes the registry on as text: a postgresql:// URL too.
    with serve_process(devca.cert, devca.key, cast(Path, registry), log) as server:
        assert server.terminate() == 0
    return log.read_text()


def test_serve_names_a_registry_it_had_to_create(devca: ServerFiles, tmp_path: Path) -> None:
    # A mistyped --registry served nobody, and said nothing about why.
    registry = tmp_path / "mistyped.db"
    text = _serve_log(devca, registry, tmp_path)
    (line,) = [line for line in text.splitlines() if CREATED in line]
    assert f"registry {registry} {CREATED}" in line
    assert "check --registry" in line
    assert registry.is_file()  # still created: first-time operators rely on it


def test_serve_on_an_existing_registry_does_not_say_created(
    devca: ServerFiles, registry: Path, tmp_path: Path, make_client: MakeClient
) -> None:
    enroll(registry, make_client("alice").cert_path, "alice")
    text = _serve_log(devca, registry, tmp_path)
    assert CREATED not in text
    assert "trusting 1 enrolled client certificate(s)" in text


def test_serve_on_an_existing_empty_registry_warns_only_that_nobody_is_enrolled(
    devca: ServerFiles, registry: Path, tmp_path: Path, make_client: MakeClient
) -> None:
    enroll(registry, make_client("alice").cert_path, "alice")
    assert subprocess.run(
        [str(BIN / "pinrpc-server"), "revoke", "alice", "--registry", str(registry)],
        capture_output=True, timeout=60, check=False,
    ).returncode == 0  # fmt: skip
    text = _serve_log(devca, registry, tmp_path)
    assert CREATED not in text
    assert "no enrolled clients: nobody can connect until one is enrolled" in text


def test_serve_on_a_new_postgresql_database_does_not_say_created(
    devca: ServerFiles, pg: Postgres, tmp_path: Path
) -> None:
    # The database must exist (serve only lays out its tables): nothing was created by mistake.
    text = _serve_log(devca, pg.create_database("cli_surface"), tmp_path)
    assert CREATED not in text
    assert "no enrolled clients: nobody can connect until one is enrolled" in text


# --- a second signal -----------------------------------------------------------------------


@pytest.fixture
def held_stream(
    devca: ServerFiles, registry: Path, tmp_path: Path, make_client: MakeClient
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A real `serve` with one EchoStream call in flight that the client never ends."""
    files = make_client("alice")
    enroll(registry, files.cert_path, "alice", ECHO_ALL)
    log = tmp_path / "server.log"
    with serve_process(devca.cert, devca.key, registry, log) as server:
        target = f"127.0.0.1:{server.port}"
        channel = secure_channel(target, files.cert_path, files.key_path, devca.ca_path,
                                 SERVER_NAME)  # fmt: skip
        requests: queue.Queue[echo_pb2.EchoRequest | None] = queue.Queue()
        replies = echo_pb2_grpc.EchoStub(channel).EchoStream(iter(requests.get, None))
        requests.put(echo_pb2.EchoRequest(message="hold"))
        first = [reply.message for reply in itertools.islice(replies, 1)]
        assert first == ["hold"]  # in flight, until the server stops it
        try:
            yield server.process, log
        finally:
            requests.put(None)
            channel.close()  # cancels the call


def _wait_for(log: Path, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"no {text!r} in {log.read_text()}"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_stops_without_waiting_for_in_flight_calls(
    held_stream: tuple[subprocess.Popen[bytes], Path], signum: signal.Signals
) -> None:
    # The second Ctrl-C was ignored: the server waited out the whole grace period (5 s).
    process, log = held_stream
    process.send_signal(signum)
    _wait_for(log, "stopping: finishing in-flight calls")
    started = time.monotonic()
    process.send_signal(signum)
    assert process.wait(timeout=3) == 128 + signum
    took = time.monotonic() - started
    text = log.read_text()
    # One line says so, and the last lines still got out: through the stderr helper, and the
    # audit's line for the held call.
    assert text.count("second signal: stopping without waiting for in-flight calls") == 1
    assert "first call on this connection" in text
    assert "Traceback" not in text
    assert took < 3


def test_a_second_signal_taken_by_another_thread_cuts_the_drain_short(
    held_stream: tuple[subprocess.Popen[bytes], Path],
) -> None:
    # The kernel hands a process's signal to any thread; its Python handler waited for the
    # main thread, which slept in the drain's wait until the grace period (5 s) ended.
    process, log = held_stream
    process.send_signal(signal.SIGTERM)
    _wait_for(log, "stopping: finishing in-flight calls")
    os.kill(other_thread(process.pid), signal.SIGTERM)
    assert process.wait(timeout=3) == 128 + signal.SIGTERM
    assert "second signal: stopping without waiting" in log.read_text()


def test_one_signal_still_drains_and_exits_zero(
    held_stream: tuple[subprocess.Popen[bytes], Path],
) -> None:
    process, log = held_stream
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0  # after the grace period, as before
    assert "second signal" not in log.read_text()


_DATABASES = itertools.count()  # the cluster is the module's: a database for each test


def _cluster(pg: Postgres) -> list[int]:
    """The cluster's postmaster and the backends it forked (all started by this test)."""
    main = int((pg.data / "postmaster.pid").read_text().split()[0])
    return [main, *map(int, Path(f"/proc/{main}/task/{main}/children").read_text().split())]


@pytest.fixture
def stuck_call(
    devca: ServerFiles, pg: Postgres, tmp_path: Path, make_client: MakeClient
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A real `serve` on PostgreSQL with an Admin call in its handler, stuck on the database
    (its processes stopped): a handler that ignores gRPC's cancellation. pinrpc's own handlers
    give up on a database after ANSWER_LIMIT (7 s); this server's wait longer than the test."""
    url = cast(Path, pg.create_database(f"stuck_handler_{next(_DATABASES)}"))
    admin = make_client("admin")
    enroll(url, admin.cert_path, "admin", "/pinrpc.v1.Admin/*")
    log = tmp_path / "server.log"
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import server.registry_pg\nserver.registry_pg.ANSWER_LIMIT = 300.0\n"
    )
    path = os.pathsep.join((str(hooks), str(ROOT), os.environ.get("PYTHONPATH", "")))
    with serve_process(devca.cert, devca.key, url, log, env={"PYTHONPATH": path}) as server:
        flags = ["--server", f"127.0.0.1:{server.port}", "--cert", str(admin.cert_path),
                 "--key", str(admin.key_path), "--ca", str(devca.ca_path),
                 "--server-name", SERVER_NAME, "--timeout", "120"]  # fmt: skip
        hung = _cluster(pg)
        for pid in hung:
            os.kill(pid, signal.SIGSTOP)
        call = subprocess.Popen([str(BIN / "pinrpc"), "admin", "list", *flags],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            _wait_for(log, "first call on this connection")  # the Admin call is in its handler
            yield server.process, log
        finally:
            for pid in hung:
                os.kill(pid, signal.SIGCONT)
            call.kill()
            call.wait(timeout=10)


@pytest.mark.parametrize("late", [False, True], ids=["during-the-drain", "after-the-grace-period"])
def test_a_second_signal_exits_even_when_a_handler_ignores_the_cancellation(
    stuck_call: tuple[subprocess.Popen[bytes], Path], late: bool
) -> None:
    # The stuck handler held the worker pool's shutdown: Ctrl-C twice did nothing, for as long
    # as the registry hung. After the grace period the main thread waits for that pool with no
    # timeout, and a signal the kernel gave another thread ran its Python handler only there.
    process, log = stuck_call
    process.send_signal(signal.SIGTERM)
    _wait_for(log, "stopping: finishing in-flight calls")
    if late:
        time.sleep(GRACE + 1.5)  # the drain is over; the pool's shutdown waits for the handler
        assert process.poll() is None
        os.kill(other_thread(process.pid), signal.SIGTERM)
    else:
        process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM
    text = log.read_text()
    assert text.count("second signal: stopping without waiting for in-flight calls") == 1
    assert text.count("in-flight calls still running 3 s after the second signal") == 1
    assert "Traceback" not in text


# --- pinrpc-server obtain-cert ---------------------------------------------------------------


def test_obtain_cert_subcommand_issues_from_pebble(pebble: Pebble, tmp_path: Path) -> None:
    out = tmp_path / "server"
    done = _run(
        [str(BIN / "pinrpc-server"), "obtain-cert", "--directory", pebble.directory_url,
         "--domain", "server.test", "--out", str(out), "--http-port", str(free_port()),
         "--http-host", "127.0.0.1", "--ca-bundle", str(pebble.acme_ca_bundle)],
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {out / 'fullchain.pem'} and {out / 'privkey.pem'}")
    leaf = x509.load_pem_x509_certificates((out / "fullchain.pem").read_bytes())[0]
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["server.test"]


def test_obtain_cert_subcommand_usage_errors_name_the_subcommand(tmp_path: Path) -> None:
    done = _run([str(BIN / "pinrpc-server"), "obtain-cert", "--out", str(tmp_path)], tmp_path)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("pinrpc-server obtain-cert: error: ")
    assert done.stderr.count("\n") == 1


# The real programs in a Python where the acme extra is genuinely absent: a meta-path finder
# refuses it before anything is imported.
WITHOUT_ACME = """
import sys
class NoAcme:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("acme", "josepy"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NoAcme())
"""
HINT = "obtain-cert needs the acme extra (Python module 'acme' is missing): "
INSTALL = "pip install 'pinrpc[acme]'"


@pytest.mark.parametrize(
    ("call", "prog"),
    [
        ("from server.cli import main; sys.exit(main(ARGV))", "pinrpc-server"),
        ("import runpy; sys.argv[1:] = ARGV; runpy.run_module('server.acme', run_name='__main__')",
         "obtain-cert"),
    ],
    ids=["pinrpc-server obtain-cert", "python -m server.acme"],
)  # fmt: skip
def test_a_missing_acme_extra_is_one_line(call: str, prog: str, tmp_path: Path) -> None:
    argv = ["--domain", "server.test", "--out", str(tmp_path / "out")]
    argv = ["obtain-cert", *argv] if prog == "pinrpc-server" else argv
    code = WITHOUT_ACME + call.replace("ARGV", repr(argv))
    done = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == f"{prog}: error: {HINT}{INSTALL}\n"
    assert not (tmp_path / "out").exists()
