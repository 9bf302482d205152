"""scripts/demo end to end, as a user runs it: a subprocess that starts a real server."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require_tool

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "scripts" / "demo"
# Generous: the first run of a fresh checkout installs .venv; a run is about 5 s after that.
TIMEOUT_S = 300.0

pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONIOENCODING": "utf-8", "NO_COLOR": "1", **extra}


def demo(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(DEMO), *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=TIMEOUT_S,
        env=env or _env(),
        stdin=subprocess.DEVNULL,
    )


def _require_pebble() -> None:
    # On PATH, where scripts/demo looks (tests/pebble.py also tries /usr/bin/pebble).
    require_tool(shutil.which("pebble") is not None, "pebble", "apt-get install -y pebble")


# One line per step that must pass; the wording is the demo's contract with docs/DEMO.md.
PASS_LINES = (
    "✔ alice's fingerprint: ",
    "✔ alice is enrolled",
    "✔ the fingerprint the operator sees matches the one alice's keygen showed",
    "✔ WhoAmI is allowed and the server names her: alice",
    "✔ Echo is allowed (/pinrpc.v1.Echo/*)",
    "✔ mallory is refused at the TLS handshake (exit code 3)",
    "✔ the client explains the likely causes (not enrolled, revoked, expired)",
    "✔ with the key the tool's call succeeds (exit 0)",
    "✔ the server refused the thief (exit 0: attack failed)",
    "✔ alice is revoked in the registry",
    "✔ the same open channel's next call is refused (PERMISSION_DENIED), ",
    "✔ a new connection from alice is refused at the handshake",
)


def _assert_passed(result: subprocess.CompletedProcess[str], checks: int) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    for line in PASS_LINES:
        assert line in result.stdout, line
    assert "✘" not in result.stdout
    assert re.search(rf"^✔ all {checks} checks passed \([0-9.]+ s\)$", result.stdout, re.M)


def test_demo_with_local_ca_passes_every_check(tmp_path: Path) -> None:
    out = tmp_path / "kept"
    result = demo("--keep", str(out))

    _assert_passed(result, checks=12)
    assert "$ pinrpc keygen alice" in result.stdout
    assert "$ pinrpc-server enroll alice.crt --name alice --allow '/pinrpc.v1.Echo/*'" in (
        result.stdout
    )
    assert "issuer CN=pinrpc demo CA intermediate" in result.stdout
    # The CLI's own explanation is shown, not only the demo's verdict.
    assert "closed the connection during the TLS handshake" in result.stdout
    # The fingerprint keygen showed is the one the server reports for alice.
    keygen = re.search(r"✔ alice's fingerprint: (\S+)", result.stdout)
    assert keygen is not None
    assert f"fingerprint  {keygen.group(1)}" in result.stdout.split("3. alice calls")[1]
    # --keep leaves the work behind; the private key stayed private.
    assert stat.S_IMODE((out / "alice.key").stat().st_mode) == 0o600
    assert {"alice.crt", "mallory.crt", "ca.pem", "registry.db", "server.log"} <= {
        p.name for p in out.iterdir()
    }


def test_demo_with_pebble_passes_every_check() -> None:
    _require_pebble()
    result = demo("--acme")

    _assert_passed(result, checks=13)
    assert "✔ pebble issued a certificate for server.test" in result.stdout
    assert "$ obtain-cert --directory https://127.0.0.1:" in result.stdout
    assert "issuer CN=Pebble Intermediate CA" in result.stdout


def test_a_proxy_in_the_environment_does_not_steer_the_demo() -> None:
    # gRPC sends even 127.0.0.1 through grpc_proxy/https_proxy/http_proxy, and requests (ACME)
    # through https_proxy: a user's proxy settings, needed for the first run's pip install,
    # made the scenario's calls fail. Nothing listens on this proxy's port.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"
        names = ("grpc_proxy", "https_proxy", "HTTP_PROXY", "ALL_PROXY")
        result = demo(env=_env(**dict.fromkeys(names, proxy)))

    _assert_passed(result, checks=12)


def test_enrolling_mallory_fails_the_demo() -> None:
    result = demo("--sabotage", "enroll-mallory")

    assert result.returncode == 1, result.stdout
    assert "✘ mallory is refused at the TLS handshake (exit code 3)" in result.stdout
    assert "✔ the server refused the thief" in result.stdout  # other steps still checked
    assert re.search(r"^✘ 2 of 12 checks FAILED", result.stdout, re.M)


def test_skipping_the_revocation_fails_the_demo() -> None:
    result = demo("--sabotage", "skip-revoke")

    assert result.returncode == 1, result.stdout
    assert "✘ the same open channel's next call is refused" in result.stdout
    assert "still OK as alice" in result.stdout
    assert "✘ a new connection from alice is refused at the handshake" in result.stdout


def test_acme_without_pebble_is_a_one_line_error(tmp_path: Path) -> None:
    # sys.executable is passed explicitly, so a PATH without pebble (or anything) is enough.
    result = demo("--acme", env=_env(PATH=str(tmp_path)))

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("demo: error: --acme needs pebble")
    assert "apt-get install pebble" in result.stderr


def test_keep_refuses_a_directory_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("mine")

    result = demo("--keep", str(tmp_path))

    assert result.returncode == 2
    assert "is not an earlier demo's directory" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"]


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("empty directory", "already exists and is not an earlier demo's directory"),
        ("file", "is not a directory"),
        ("symlink to an earlier demo's directory", "is a symbolic link"),
    ],
)
def test_keep_refuses_what_it_cannot_empty_safely(tmp_path: Path, kind: str, message: str) -> None:
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / ".pinrpc-demo").write_text("made by scripts/demo\n")
    (earlier / "alice.key").write_text("kept")
    keep = tmp_path / "keep"
    if kind == "empty directory":
        keep.mkdir()
    elif kind == "file":
        keep.write_text("mine")
    else:
        keep.symlink_to(earlier)

    result = demo("--keep", str(keep))

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"demo: error: {keep} {message}"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    # Nothing was emptied or replaced.
    assert sorted(p.name for p in earlier.iterdir()) == [".pinrpc-demo", "alice.key"]
    if kind == "file":
        assert keep.read_text() == "mine"
    elif kind == "empty directory":
        assert list(keep.iterdir()) == []
    else:
        assert keep.is_symlink()


def test_keep_where_no_directory_can_be_made_is_a_usage_error(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("mine")

    result = demo("--keep", str(not_a_directory / "out"))

    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr == (
        f"demo: error: cannot make --keep directory {not_a_directory / 'out'}: Not a directory\n"
    )
    assert not_a_directory.read_text() == "mine"


# A shell starts background jobs with SIGINT ignored, and Python then leaves it ignored: give
# the demo the default disposition it gets from a terminal, then exec it (same PID).
DEFAULT_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_the_server_and_cleans_up(signum: signal.Signals) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", DEFAULT_SIGINT, str(DEMO)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        encoding="utf-8",
        env=_env(),
    )
    try:
        assert process.stdout is not None
        work = server_pid = None
        for _ in range(200):  # bounded: the server line comes within the first ~30 lines
            line = process.stdout.readline()
            if found := re.search(r"pinrpc demo in (\S+)", line):
                work = Path(found.group(1))
            if found := re.search(r"\(server pid (\d+);", line):
                server_pid = int(found.group(1))
                break
        assert work is not None and server_pid is not None
        assert _pid_alive(server_pid)

        process.send_signal(signum)
        _, err = process.communicate(timeout=30)

        assert process.returncode == 130
        assert "interrupted; every process it started has been stopped" in err
        deadline = time.monotonic() + 5
        while _pid_alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _pid_alive(server_pid)
        assert not work.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _start_in_a_terminal_group(
    argv: list[str], env: dict[str, str], cwd: Path
) -> subprocess.Popen[str]:
    """As from a terminal: SIGINT at its default, in a process group that Ctrl-C reaches whole."""
    return subprocess.Popen(
        [sys.executable, "-c", DEFAULT_SIGINT, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        encoding="utf-8",
        env=env,
        cwd=cwd,
        start_new_session=True,
    )


def _ctrl_c(process: subprocess.Popen[str], signum: int = signal.SIGINT) -> tuple[str, str]:
    """Ctrl-C reaches the whole group; a SIGTERM (a service manager's, say) the demo alone."""
    try:
        if signum == signal.SIGINT:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        return process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_while_the_venv_is_made_leaves_no_temp_dir_and_no_traceback(
    tmp_path: Path, signum: signal.Signals
) -> None:
    # A first run spends its first seconds in `python -m venv`; Ctrl-C there printed venv's
    # traceback and left ensurepip's copy of pip in $TMPDIR (killed before cleaning up), and
    # SIGTERM killed the demo silently (exit -15), leaving venv or pip running on.
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(DEMO, repo / "scripts" / "demo")
    (repo / "pyproject.toml").write_text("")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    process = _start_in_a_terminal_group(
        [str(repo / "scripts" / "demo")], _env(TMPDIR=str(tmp)), tmp_path
    )
    assert process.stdout is not None
    assert "setting up" in process.stdout.readline()
    time.sleep(0.7)  # venv takes about 2 s here, most of it in ensurepip

    out, err = _ctrl_c(process, signum)

    assert process.returncode == 130, out + err
    assert "Traceback" not in err, err
    assert err.endswith("demo: interrupted\n"), err
    assert list(tmp.iterdir()) == []


def test_ctrl_c_during_the_demos_own_imports_is_one_line(tmp_path: Path) -> None:
    # The imports take ~0.1 s of every start (two starts on a first run): a Ctrl-C there
    # printed a KeyboardInterrupt traceback. A stand-in argparse holds the demo there.
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    ready = tmp_path / "importing"
    (shadow / "argparse.py").write_text(
        f"import pathlib, time\npathlib.Path({str(ready)!r}).touch()\ntime.sleep(30)\n"
    )
    process = _start_in_a_terminal_group([str(DEMO)], _env(PYTHONPATH=str(shadow)), tmp_path)
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ready.exists()

    out, err = _ctrl_c(process)

    assert process.returncode == 130, out + err
    assert out == ""
    assert err == "\ndemo: interrupted\n"


def test_keep_relative_to_a_removed_current_directory_is_a_usage_error(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    # The shell enters the directory, which is then removed under it (another terminal's rm).
    result = subprocess.run(
        ["sh", "-c", 'cd "$1" && rmdir "$1" && exec "$2" "$3" --keep out', "sh",
         str(gone), sys.executable, str(DEMO)],
        capture_output=True, text=True, encoding="utf-8", timeout=60, env=_env(),
        stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip

    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr == (
        "demo: error: --keep out: the current directory no longer exists; give an absolute path\n"
    )
