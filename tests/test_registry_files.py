"""The SQLite registry's files: made owner-only, and refused when others may write them.

Real files and real `pinrpc-server` processes, run with umask 0 so that no mode below comes
from the umask."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import MakeClient, ServerFiles
from tests.security.attacker import BIN, serve_process

COMPANIONS = ("", "-wal", "-shm")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes(registry: Path) -> dict[str, int]:
    """The mode of the registry and of each -wal/-shm file present."""
    files = (Path(f"{registry}{end}") for end in COMPANIONS)
    return {f.name: mode(f) for f in files if f.exists()}


def server_cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "pinrpc-server"), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        umask=0,
        check=False,
    )


@contextmanager
def umask(value: int) -> Iterator[None]:
    """For the processes started inside: the umask is the whole process's."""
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def enroll(registry: Path, make_client: MakeClient, name: str) -> subprocess.CompletedProcess[str]:
    cert = str(make_client(name).cert_path)
    return server_cli("enroll", cert, "--name", name, "--registry", str(registry))


def test_a_new_registry_is_owner_only_after_enroll_and_migrate(
    tmp_path: Path, make_client: MakeClient
) -> None:
    enrolled, migrated = tmp_path / "enrolled.db", tmp_path / "migrated.db"
    assert enroll(enrolled, make_client, "alice").returncode == 0
    assert server_cli("migrate", "--registry", str(migrated)).returncode == 0
    assert modes(enrolled) == {"enrolled.db": 0o600}
    assert modes(migrated) == {"migrated.db": 0o600}


def test_a_serving_registry_and_its_wal_and_shm_files_are_owner_only(
    tmp_path: Path, devca: ServerFiles, make_client: MakeClient
) -> None:
    registry = tmp_path / "new.db"  # serve creates it
    with umask(0), serve_process(devca.cert, devca.key, registry, tmp_path / "log"):
        # The server holds it open in WAL mode; an enrollment beside it writes the -wal file.
        assert enroll(registry, make_client, "alice").returncode == 0
        assert modes(registry) == {"new.db": 0o600, "new.db-wal": 0o600, "new.db-shm": 0o600}


def test_a_group_readable_registry_keeps_working(
    tmp_path: Path, devca: ServerFiles, make_client: MakeClient
) -> None:
    registry = tmp_path / "registry.db"
    assert enroll(registry, make_client, "alice").returncode == 0
    registry.chmod(0o640)  # an operator sharing it with the server's group
    assert enroll(registry, make_client, "bob").returncode == 0
    listed = server_cli("list", "--registry", str(registry))
    assert listed.returncode == 0
    assert "alice" in listed.stdout
    assert "bob" in listed.stdout
    with umask(0), serve_process(devca.cert, devca.key, registry, tmp_path / "log"):
        assert modes(registry) == {"registry.db": 0o640, "registry.db-wal": 0o640,
                                   "registry.db-shm": 0o640}  # fmt: skip


@pytest.mark.parametrize("wide", [0o660, 0o602, 0o666], ids=oct)
@pytest.mark.parametrize("command", ["enroll", "list", "revoke"])
def test_a_registry_others_may_write_is_refused(
    tmp_path: Path,
    make_client: MakeClient,
    wide: int,
    command: str,
) -> None:
    registry = tmp_path / "registry.db"
    assert enroll(registry, make_client, "alice").returncode == 0
    registry.chmod(wide)
    before = registry.read_bytes()
    argv = {
        "enroll": ["enroll", str(make_client("bob").cert_path), "--name", "bob"],
        "list": ["list"],
        "revoke": ["revoke", "alice"],
    }[command]
    done = server_cli(*argv, "--registry", str(registry))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"chmod go-w {registry}" in done.stderr
    assert f"{wide:04o}" in done.stderr
    assert registry.read_bytes() == before
    assert modes(registry) == {"registry.db": wide}  # never changed behind the operator's back


def test_a_wal_file_others_may_write_is_refused(tmp_path: Path, make_client: MakeClient) -> None:
    """SQLite would replay its frames into the registry: writing it is writing the registry."""
    registry = tmp_path / "registry.db"
    assert enroll(registry, make_client, "alice").returncode == 0
    wal = Path(f"{registry}-wal")
    wal.touch(mode=0o666)  # an empty -wal, as a killed server may leave behind
    wal.chmod(0o666)
    done = server_cli("list", "--registry", str(registry))
    assert done.returncode == 1
    assert f"chmod go-w {wal}" in done.stderr
    assert f"{registry} " not in done.stderr.split("chmod go-w")[1]  # the registry is fine


def test_a_server_refuses_to_start_on_a_registry_others_may_write(
    tmp_path: Path, devca: ServerFiles, make_client: MakeClient
) -> None:
    registry = tmp_path / "registry.db"
    assert enroll(registry, make_client, "alice").returncode == 0
    registry.chmod(0o664)
    argv = ["serve", "--listen", "127.0.0.1:0", "--cert", str(devca.cert), "--key",
            str(devca.key), "--registry", str(registry)]  # fmt: skip
    done = server_cli(*argv)
    assert done.returncode == 1
    assert f"chmod go-w {registry}" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_new_registry_made_through_a_symlink_is_owner_only(
    tmp_path: Path, make_client: MakeClient
) -> None:
    link, target = tmp_path / "link.db", tmp_path / "target.db"
    link.symlink_to(target)  # dangling until the registry is made: SQLite creates the target
    assert enroll(link, make_client, "alice").returncode == 0
    assert modes(target) == {"target.db": 0o600}
