"""The repository's scripts at their edges: what they refuse to conclude, set up, or run under."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.app import start_server
from server.config import ServerConfig
from server.devca import DevCA
from tests.certs import make_cert, rsa_key, write_pair
from tests.conftest import SERVER_NAME, Connect, MakeClient, ServerFiles, enroll
from tests.https import serving_pages
from tests.pebble import Pebble
from tests.security.attacker import attack

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
BIN = Path(sys.executable).parent


@contextlib.contextmanager
def hang_up_listener() -> Iterator[int]:
    """A loopback TCP port that accepts every connection and closes it at once."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


def test_attack_on_a_listener_that_hangs_up_proves_nothing(make_client: MakeClient) -> None:
    alice = make_client("alice")
    with hang_up_listener() as port:
        run = attack("--server", f"127.0.0.1:{port}", "--cert", alice.cert_path, timeout=60)

    assert run.code == 2, run.out
    assert run.err.count("\n") == 1, run.err
    assert "no verified pinrpc server refused or answered us" in run.err
    assert "defence held" not in run.out


def test_attack_on_a_server_whose_certificate_does_not_verify_proves_nothing(
    connect: Connect, make_client: MakeClient, tmp_path: Path
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(DevCA("another CA").root_pem)
    target: list[str | Path] = [
        "--server", connect.target, "--server-name", SERVER_NAME, "--cert", alice.cert_path
    ]  # fmt: skip

    wrong = attack(*target, "--ca", other_ca)
    assert wrong.code == 2, wrong.out
    assert wrong.out.count("server certificate NOT verified") == 2  # TLS 1.2 and 1.3
    assert "no verified pinrpc server" in wrong.err

    # The same server, verified: its refusal of the thief counts, over TLS 1.2 alone too.
    for versions in ("both", "1.2"):
        right = attack(*target, "--ca", connect.devca.ca_path, "--tls", versions)
        assert right.code == 0, right.out
        assert "defence held" in right.out


def test_attack_tool_reads_a_certificate_file_with_non_utf8_text(
    connect: Connect, make_client: MakeClient, tmp_path: Path
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    # Text around a PEM block is legal, in any encoding (openssl's `-text` output, a comment).
    commented = tmp_path / "alice-commented.crt"
    commented.write_bytes(b"Subject: caf\xe9\n" + alice.cert_path.read_bytes())
    target: list[str | Path] = [
        "--server", connect.target, "--server-name", SERVER_NAME, "--ca", connect.devca.ca_path
    ]  # fmt: skip

    thief = attack(*target, "--cert", commented)
    control = attack(*target, "--cert", commented, "--key", alice.key_path)

    assert thief.code == 0, thief.out + thief.err
    assert "defence held" in thief.out
    assert control.code == 0, control.out + control.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--timeout", "-1"], "argument --timeout: must be seconds above 0"),
        (["--timeout", "nan"], "argument --timeout: must be seconds above 0"),
        (["--timeout", "inf"], "argument --timeout: must be seconds above 0"),
        (["--cert", "{p521_crt}"], "certificate key type secp521r1 is not supported"),
        (["--cert", "{k256_crt}"], "certificate key type secp256k1 is not supported"),
        (["--key", "{rsa_key}"], "key type RSA, the certificate's is P-256"),
        (["--key", "{k256_key}"], "key type secp256k1, the certificate's is P-256"),
        (["--ca", "{rsa_key}"], "cannot load --ca "),
        (["--ca", "{rsa_key}.missing"], "cannot load --ca "),
    ],
)
def test_attack_tool_input_it_cannot_use_is_a_usage_error_not_a_verdict(
    connect: Connect, make_client: MakeClient, tmp_path: Path, args: list[str], message: str
) -> None:
    # Exit 1 is a verdict (the defence failed, or the control was refused). Such input once
    # crashed the tool with a traceback and exit 1, against a server whose defence holds; an
    # unreadable --ca was blamed on the server ("no verified pinrpc server refused ...").
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    files: dict[str, Path] = {}
    keys = {"p521": ec.SECP521R1(), "k256": ec.SECP256K1(), "rsa": None}
    for stem, curve in keys.items():
        key = rsa_key(2048) if curve is None else ec.generate_private_key(curve)
        cert = make_cert(key, stem, key_cert_sign=False)
        files[f"{stem}_crt"], files[f"{stem}_key"] = write_pair(tmp_path, stem, key, cert)

    run = attack(
        "--server", connect.target, "--server-name", SERVER_NAME, "--ca", connect.devca.ca_path,
        "--cert", alice.cert_path, *(arg.format(**files) for arg in args),
    )  # fmt: skip

    assert run.code == 2, run.out + run.err
    assert message in run.err.splitlines()[-1], run.err


@pytest.mark.parametrize("within", ["nan", "inf", "-1"])
def test_open_channel_helper_refuses_an_unbounded_wait(
    connect: Connect, make_client: MakeClient, within: str
) -> None:
    # Against a client that is never revoked, `--within nan` once called WhoAmI forever.
    alice = make_client("alice")
    connect.enroll(alice, "alice")

    done = subprocess.run(
        [sys.executable, str(SCRIPTS / "demo-open-channel"), *connect.cli_flags(alice),
         "--within", within],
        input="go\n", capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip

    assert done.returncode == 2, done.stdout
    assert "argument --within: " in done.stderr.splitlines()[-1], done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("within", [None, "10"])
def test_compose_step_after_an_enrollment_waits_for_the_server_to_apply_it(
    devca: ServerFiles, registry: Path, make_client: MakeClient, within: str | None
) -> None:
    # Compose runs `alice` as soon as `enroll` exits; the server applies the change at its next
    # registry poll (0.2 s). Container start-up hid the race (0.6 s to spare, measured): a
    # slower poll shows it.
    config = ServerConfig(
        listen="127.0.0.1:0", cert=devca.cert, key=devca.key, registry=str(registry),
        poll_interval=3.0, grace=1.0,
    )  # fmt: skip
    alice = make_client("alice")
    retry = ["--within", within] if within else []
    with start_server(config) as running:
        enroll(registry, alice.cert_path, "alice")
        done = subprocess.run(
            [sys.executable, str(SCRIPTS / "demo-compose"), "expect", *retry, "0",
             str(BIN / "pinrpc"), "whoami", *Connect(running, devca).cli_flags(alice)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    if within is None:  # one attempt, before the server's next poll: refused
        assert done.returncode == 1, done.stdout
        assert "✘ exit code 3, expected 0" in done.stdout
    else:
        assert done.returncode == 0, done.stdout + done.stderr
        assert "(exit code 3: the server may not have polled its registry yet)" in done.stdout
        assert done.stdout.rstrip().endswith("✔ exit code 0, as expected")


@pytest.mark.parametrize("script", ["demo-open-channel", "stolen-cert-attack"])
def test_scripts_without_their_modules_say_so_in_one_line(script: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -S: no site-packages, as under a system python3 without the project installed.
    done = subprocess.run(
        [sys.executable, "-S", str(SCRIPTS / script), "--help"],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip

    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"{script}: error: Python module ")


def fake_repo(tmp_path: Path, script: str) -> Path:
    """A checkout holding only ``script`` and a half-made .venv: bin/python without pip."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(SCRIPTS / script, repo / "scripts" / script)
    (repo / "pyproject.toml").write_text("")
    half_made = repo / ".venv" / "bin" / "python"
    half_made.parent.mkdir(parents=True)
    half_made.write_text("#!/bin/sh\nexit 1\n")
    half_made.chmod(0o755)
    return repo


def no_ensurepip(tmp_path: Path) -> dict[str, str]:
    """An environment whose `python -m venv` fails as Debian's does without python3-venv:
    after writing bin/python, with no pip."""
    package = tmp_path / "no-ensurepip" / "venv"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(
        "import pathlib, sys\n"
        "python = pathlib.Path(sys.argv[-1], 'bin', 'python')\n"
        "python.parent.mkdir(parents=True, exist_ok=True)\n"
        "python.unlink(missing_ok=True)\n"  # as --clear does: never write through a symlink
        "python.write_text('#!/bin/sh\\nexit 1\\n')\n"
        "python.chmod(0o755)\n"
        "sys.exit('The virtual environment was not created successfully because ensurepip is "
        "not available.')\n"
    )
    return {**os.environ, "PYTHONPATH": str(package.parent), "PYTHON": sys.executable}


def run_setup(
    repo: Path, script: str, env: dict[str, str], python: str = sys.executable
) -> subprocess.CompletedProcess[str]:
    """Run the fake repository's demo or test script, as far as its .venv set-up gets."""
    done = subprocess.run(
        [python, str(repo / "scripts" / script)]
        if script == "demo"
        else ["bash", str(repo / "scripts" / script)],
        capture_output=True, text=True, timeout=120, env=env, cwd=repo.parent, check=False,
    )  # fmt: skip
    return done


VENV_SCRIPTS = pytest.mark.parametrize(
    ("script", "message"),
    [
        ("demo", "demo: error: could not create "),
        ("test", "scripts/test: error: could not create .venv with "),
    ],
)


@VENV_SCRIPTS
def test_a_half_made_venv_is_made_again_and_removed_when_that_fails(
    tmp_path: Path, script: str, message: str
) -> None:
    repo = fake_repo(tmp_path, script)
    env = no_ensurepip(tmp_path)

    for _ in range(2):  # the second run finds no leftover either
        done = run_setup(repo, script, env)

        assert done.returncode == 1
        last = done.stderr.splitlines()[-1]
        assert last.startswith(message) and "apt-get install python3-venv" in last, done.stderr
        assert not (repo / ".venv").exists()


def older_python(directory: Path) -> Path:
    """Python 3.10 as far as a version check can tell: this interpreter, with sys.version_info
    at (3, 10). No package source here offers a 3.9 or 3.10, and CI must not skip."""
    shim = directory / "python3.10"
    shim.unlink(missing_ok=True)  # never write through a link to a real interpreter
    shim.write_text(
        f"#!{sys.executable}\n"
        "import runpy, sys\n"
        "sys.version_info = (3, 10, 14, 'final', 0)  # a tuple: all a version check compares\n"
        "args = sys.argv[1:]\n"
        "if args[:1] == ['-c']:\n"
        "    sys.argv = ['-c', *args[2:]]\n"
        "    exec(compile(args[1], '<string>', 'exec'), {'__name__': '__main__'})\n"
        "else:\n"
        "    sys.argv = args\n"
        "    runpy.run_path(args[0], run_name='__main__')\n"
    )
    shim.chmod(0o755)
    return shim


@VENV_SCRIPTS
def test_a_venv_of_an_older_python_is_made_again(tmp_path: Path, script: str, message: str) -> None:
    # A first run under Ubuntu 22.04's python3 (3.10) made a .venv the project cannot be
    # installed into; its pip ran, so every later run, with python3.11 too, reused it and failed.
    repo = fake_repo(tmp_path, script)
    shutil.rmtree(repo / ".venv")
    (repo / ".venv" / "bin").mkdir(parents=True)
    older_python(repo / ".venv" / "bin").rename(repo / ".venv" / "bin" / "python")  # pip runs

    done = run_setup(repo, script, no_ensurepip(tmp_path))  # made again: fails, as intended

    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith(message), done.stderr
    assert not (repo / ".venv").exists()


def test_demo_keep_under_a_file_is_refused_before_the_venv_set_up(tmp_path: Path) -> None:
    # Found on a fresh checkout: the refusal came after the first run's .venv set-up, so the
    # user waited for pip (and its output) before learning that --keep could not work.
    repo = fake_repo(tmp_path, "demo")
    shutil.rmtree(repo / ".venv")
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("mine")
    keep = not_a_directory / "out"
    done = subprocess.run(
        [sys.executable, str(repo / "scripts" / "demo"), "--keep", str(keep)],
        capture_output=True, text=True, timeout=120, env=no_ensurepip(tmp_path), check=False,
    )  # fmt: skip

    assert done.returncode == 2, done.stderr
    assert (done.stdout, done.stderr) == (
        "",
        f"demo: error: cannot make --keep directory {keep}: Not a directory\n",
    )
    assert not (repo / ".venv").exists()
    assert not_a_directory.read_text() == "mine"


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("demo", "demo: error: needs Python 3.11 or newer, and "),
        ("test", "scripts/test: error: "),
    ],
)
def test_an_older_python_is_refused_before_it_makes_a_venv(
    tmp_path: Path, script: str, message: str
) -> None:
    repo = fake_repo(tmp_path, script)
    shutil.rmtree(repo / ".venv")
    python = str(older_python(tmp_path))

    done = run_setup(repo, script, {**os.environ, "PYTHON": python}, python)

    assert done.returncode == 1
    assert done.stderr.startswith(message) and done.stderr.count("\n") == 1, done.stderr
    assert "3.11 or newer" in done.stderr
    assert not (repo / ".venv").exists()


def test_gen_protos_defaults_to_the_repository_venv(tmp_path: Path) -> None:
    system = ["/usr/bin/python3", "-c", "import grpc_tools"]
    if subprocess.run(system, capture_output=True, check=False).returncode == 0:
        pytest.skip("the system python3 has grpc_tools: it would pass without .venv")
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(SCRIPTS / "gen-protos", repo / "scripts")
    shutil.copytree(REPO / "protos", repo / "protos")
    venv_bin = repo / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    # This test's own interpreter and plugins (the dev extra), reached through .venv/bin.
    python = venv_bin / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    for plugin in ("protoc-gen-mypy", "protoc-gen-mypy_grpc"):
        (venv_bin / plugin).symlink_to(BIN / plugin)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "PYTHONPATH")}

    done = subprocess.run(
        [str(repo / "scripts" / "gen-protos")],
        capture_output=True, text=True, timeout=120, check=False,
        env={**env, "OUT": str(tmp_path / "out"), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "pinrpc" / "v1" / "echo_pb2_grpc.pyi").is_file()


def test_gen_protos_takes_relative_paths_from_the_callers_directory(tmp_path: Path) -> None:
    # It changes to the repository before running protoc: relative paths once broke there.
    env = {**os.environ, "OUT": "out", "PYTHON": os.path.relpath(sys.executable, tmp_path)}

    done = subprocess.run(
        [str(SCRIPTS / "gen-protos")],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path, env=env,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "pinrpc" / "v1" / "echo_pb2_grpc.pyi").is_file()


def test_gen_protos_without_its_python_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": "no-such-python"}

    done = subprocess.run(
        [str(SCRIPTS / "gen-protos")],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip

    assert done.returncode == 1
    assert done.stderr == "gen-protos: error: no-such-python not found\n"


@contextlib.contextmanager
def pebble_management(root_pem: bytes, tmp: Path) -> Iterator[tuple[str, Path]]:
    """A real HTTPS server in place of pebble's management port, serving root_pem at /roots/0:
    (URL, its CA). demo-compose trusts one CA file for both of pebble's ports."""
    (tmp / "management").mkdir(exist_ok=True)
    with serving_pages(
        {"/roots/0": root_pem}, tmp / "management", "application/pem-certificate-chain"
    ) as served:
        yield served


def demo_compose_certs(
    directory: str, management: str, tls_ca: Path, tmp: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / "demo-compose"), "certs",
         "--directory", directory, "--management", management,
         "--tls-ca", str(tls_ca), "--domain", "server.test", "--out", str(tmp / "out"),
         "--root-out", str(tmp / "root.pem")],
        capture_output=True, text=True, timeout=timeout, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip


@pytest.mark.parametrize("management", ["closed port", "hangs up", "no root there"])
def test_demo_compose_certs_without_pebbles_root_is_one_line(
    pebble: Pebble, tmp_path: Path, management: str
) -> None:
    # pebble's directory answers; only the root fetch fails (the compose demo's `certs` step).
    with contextlib.ExitStack() as stack:
        url, ca = stack.enter_context(pebble_management(b"", tmp_path))
        if management == "closed port":
            closed = stack.enter_context(socket.socket())  # bound, not listening: refuses
            closed.bind(("127.0.0.1", 0))
            url = f"https://127.0.0.1:{closed.getsockname()[1]}"
        elif management == "hangs up":
            url = f"https://127.0.0.1:{stack.enter_context(hang_up_listener())}"
        else:
            url += "/elsewhere"  # 404
        done = demo_compose_certs(
            pebble.directory_url, url, both_cas(pebble, ca, tmp_path), tmp_path
        )

    assert done.returncode == 1
    assert done.stderr.startswith(f"demo-compose: error: cannot fetch pebble's root from {url}")
    assert done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "root.pem").exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tls_ca", ["missing", "not PEM"])
def test_demo_compose_certs_with_an_unusable_tls_ca_fails_at_once(
    pebble: Pebble, tmp_path: Path, tls_ca: str
) -> None:
    """It waited the full 60 s for pebble, then blamed pebble without naming the file."""
    ca = tmp_path / "tls-ca.pem"
    if tls_ca == "not PEM":
        ca.write_bytes(b"not a certificate\n")
    start = time.monotonic()
    done = demo_compose_certs(pebble.directory_url, "https://127.0.0.1:1", ca, tmp_path, timeout=20)
    assert time.monotonic() - start < 20
    assert done.returncode == 1
    assert done.stderr.startswith(f"demo-compose: error: cannot use --tls-ca {ca}: ")
    assert done.stderr.count("\n") == 1, done.stderr
    assert not (tmp_path / "root.pem").exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flag", "url", "problem"),
    [
        ("--directory", "pebble:14000/dir", "must be https://HOST[:PORT]/..."),
        ("--directory", "http://127.0.0.1:14000/dir", "must be https://HOST[:PORT]/..."),
        ("--directory", "https:///dir", "must be https://HOST[:PORT]/..."),
        ("--directory", "https://pebble:140000/dir", "is malformed: Port out of range"),
        ("--management", "https://[::1/roots", "is malformed: Invalid IPv6 URL"),
    ],
)
def test_demo_compose_certs_with_a_malformed_url_fails_at_once(
    tmp_path: Path, flag: str, url: str, problem: str
) -> None:
    """A URL that can never answer was fetched again for 60 s, then blamed on pebble."""
    ca = tmp_path / "tls-ca.pem"
    ca.write_bytes(make_cert(ec.generate_private_key(ec.SECP256R1()), "ca", ca=True)
                   .public_bytes(serialization.Encoding.PEM))  # fmt: skip
    urls = {"--directory": "https://127.0.0.1:1/dir", "--management": "https://127.0.0.1:1"}
    urls[flag] = url
    done = demo_compose_certs(urls["--directory"], urls["--management"], ca, tmp_path, 20)
    assert done.returncode == 1
    assert done.stderr.startswith(f"demo-compose: error: {flag} {url!r} {problem}"), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tls-ca.pem"]


def both_cas(pebble: Pebble, management_ca: Path, tmp: Path) -> Path:
    bundle = tmp / "both-cas.pem"
    bundle.write_bytes(pebble.acme_ca_bundle.read_bytes() + management_ca.read_bytes())
    return bundle


def test_demo_compose_certs_fetches_the_root_and_the_certificate(
    pebble: Pebble, tmp_path: Path
) -> None:
    with pebble_management(pebble.root_pem, tmp_path) as (url, ca):
        done = demo_compose_certs(
            pebble.directory_url, url, both_cas(pebble, ca, tmp_path), tmp_path
        )

    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "root.pem").read_bytes() == pebble.root_pem
    assert (tmp_path / "out" / "fullchain.pem").is_file()
