"""The distribution as a user installs it: the wheel's contents, metadata and console scripts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pinrpc", "server", "client")
# py.typed: the library API (pinrpc, its stubs, and the server side a user serves with).
MARKERS = ("pinrpc/py.typed", "pinrpc/v1/py.typed", "server/py.typed")


def _tracked_files() -> list[str]:
    done = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True, timeout=30
    )
    return [name for name in done.stdout.decode().split("\0") if name]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from the tracked files alone: a checkout's stale build/ or egg-info (which
    setuptools would copy into the wheel) cannot hide a missing file. No build isolation, so
    no network: this venv has setuptools."""
    root = tmp_path_factory.mktemp("packaging")
    src = root / "src"
    for name in _tracked_files():
        if (REPO / name).is_file():  # a deleted, not yet committed file is still listed
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    out = root / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-w", str(out), str(src)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    (built,) = out.glob("pinrpc-*.whl")
    return built


def _names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def _metadata(wheel: Path) -> tuple[str, str]:
    with zipfile.ZipFile(wheel) as archive:
        (meta,) = (n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        (entry,) = (n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt"))
        return archive.read(meta).decode(), archive.read(entry).decode()


def test_the_wheel_ships_every_module_with_its_types_and_nothing_else(wheel: Path) -> None:
    names = _names(wheel)
    shipped = {n for n in names if ".dist-info/" not in n}
    tracked = {
        n for n in _tracked_files() if n.split("/")[0] in PACKAGES and n.endswith((".py", ".pyi"))
    }

    assert {n for n in shipped if n.endswith((".py", ".pyi"))} == tracked
    assert set(MARKERS) <= shipped
    stubs = {n for n in tracked if re.fullmatch(r"pinrpc/v1/\w+_pb2(_grpc)?\.py", n)}
    assert stubs and {n + "i" for n in stubs} <= shipped  # every generated module's .pyi
    assert shipped - tracked == set(MARKERS)
    assert not {n for n in names if n.split("/")[0] in ("tests", "bench", "scripts", "protos")}


def test_the_wheel_declares_the_console_scripts_and_version(wheel: Path) -> None:
    meta, entry_points = _metadata(wheel)

    assert "pinrpc = client.cli:main" in entry_points
    assert "pinrpc-server = server.cli:main" in entry_points
    assert Parser().parsestr(meta)["Version"] == "0.1.0"
    assert wheel.name == "pinrpc-0.1.0-py3-none-any.whl"


def test_lower_bounds_are_not_below_what_the_committed_stubs_check_at_import(
    wheel: Path,
) -> None:
    # The stubs refuse, at import, a grpcio or protobuf older than the one that generated them.
    requires = {
        r.name: r
        for r in map(
            Requirement, Parser().parsestr(_metadata(wheel)[0]).get_all("Requires-Dist", [])
        )
        if r.marker is None
    }
    grpc_stub = (REPO / "pinrpc/v1/echo_pb2_grpc.py").read_text()
    grpc_found = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_stub)
    pb_found = re.search(
        r"Protobuf Python Version: ([\d.]+)", (REPO / "pinrpc/v1/echo_pb2.py").read_text()
    )
    assert grpc_found is not None and pb_found is not None
    for name, generated in (
        ("grpcio", grpc_found.group(1)),
        ("grpcio-health-checking", grpc_found.group(1)),
        ("grpcio-reflection", grpc_found.group(1)),
        ("protobuf", pb_found.group(1)),
    ):
        specifier = requires[name].specifier
        assert specifier.contains(generated), name
        assert all(
            s.operator == ">=" and Version(s.version) >= Version(generated) for s in specifier
        ), name


def test_console_scripts_work_from_the_installed_wheel_alone(wheel: Path, tmp_path: Path) -> None:
    # Installed without its dependencies next to this venv's (which has them), and run from a
    # directory outside the checkout with the checkout off the path.
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
         "--target", str(target), str(wheel)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    env = {k: v for k, v in env.items() if not k.startswith("PINRPC_")}

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, cwd=work, env=env, capture_output=True, text=True, timeout=60, check=False
        )

    where = run(sys.executable, "-c", "import client, server, pinrpc.v1; print(server.__file__)")
    assert where.stdout.startswith(str(target)), where.stdout + where.stderr
    keygen = run(str(target / "bin" / "pinrpc"), "keygen", "alice", "--dir", "keys")
    assert keygen.returncode == 0, keygen.stderr
    enroll = run(
        str(target / "bin" / "pinrpc-server"), "enroll", "keys/alice.crt", "--name", "alice",
        "--registry", "reg.db",
    )  # fmt: skip
    assert enroll.returncode == 0, enroll.stderr
    assert "enrolled alice" in enroll.stdout
