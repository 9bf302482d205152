"""A local user who is not the operator reads the server's private key.

Whoever holds it can pose as the server to every client (they verify the certificate, and the
key is all it takes). The client refuses a key others can read; the server now says so about
its own, at start and when a chmod makes it readable while it runs (it reloads on any change
of the files, mode included). Its group may read it (a service group, mode 0640), as the README
advises for certbot's files.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from tests.conftest import ServerFiles
from tests.security.attacker import serve_process

WARNING = "is readable by every local user"


def _key(devca: ServerFiles, tmp_path: Path, mode: int) -> Path:
    key = tmp_path / "privkey.pem"
    shutil.copyfile(devca.key, key)
    key.chmod(mode)
    return key


def _wait_for(log: Path, text: str, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return True
        time.sleep(0.1)
    return False


def test_a_server_key_others_can_read_is_warned_about(
    devca: ServerFiles, registry: Path, tmp_path: Path
) -> None:
    key = _key(devca, tmp_path, 0o644)
    with serve_process(devca.cert, key, registry, tmp_path / "serve.log") as server:
        text = server.log.read_text()
        assert f"server key {key} {WARNING} (mode 0644)" in text, text
        assert f"run: chmod o-r {key}" in text
        assert server.terminate() == 0


def test_a_chmod_that_lets_others_read_the_running_servers_key_is_warned_about(
    devca: ServerFiles, registry: Path, tmp_path: Path
) -> None:
    key = _key(devca, tmp_path, 0o600)
    with serve_process(devca.cert, key, registry, tmp_path / "serve.log") as server:
        key.chmod(0o604)
        assert _wait_for(server.log, f"{WARNING} (mode 0604)"), server.log.read_text()
        assert server.terminate() == 0


def test_a_key_only_its_owner_and_group_can_read_is_not_warned_about(
    devca: ServerFiles, registry: Path, tmp_path: Path
) -> None:
    for mode in (0o600, 0o640):
        key = _key(devca, tmp_path, mode)
        log = tmp_path / f"serve-{mode:o}.log"
        with serve_process(devca.cert, key, registry, log) as server:
            key.chmod(0o440)  # a change the server reloads: still nobody else may read it
            assert _wait_for(server.log, "serving server certificate")
            time.sleep(1)  # past the next polls (every 0.2 s)
            assert WARNING not in server.log.read_text()
            assert server.terminate() == 0
