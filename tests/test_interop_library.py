"""The Python library as a user meets it: the README's snippet run as written against a real
server, a user's script type-checked with mypy --strict, and the errors it documents."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pinrpc import PinrpcError, secure_channel
from pinrpc.channel import client_credentials, load_pair
from pinrpc.errors import IdentityError, KeyPermissionError
from tests.conftest import Connect, MakeClient

ROOT = Path(__file__).parent.parent
USER_SCRIPT = """\
from pathlib import Path

import grpc

from pinrpc import Fingerprint, PinrpcError, secure_channel
from pinrpc.channel import client_credentials, load_pair
from pinrpc.v1 import echo_pb2, echo_pb2_grpc
from server.auth import Identity, caller


def call(target: str, cert: Path, key: Path) -> str:
    creds, fingerprint = client_credentials(cert, key)
    assert isinstance(fingerprint, Fingerprint)
    channel: grpc.Channel = secure_channel(target, cert, key, ca=None, server_name="x")
    reply = echo_pb2_grpc.EchoStub(channel).WhoAmI(echo_pb2.WhoAmIRequest(), timeout=5)
    return reply.name


def handler_side() -> str:
    who: Identity = caller()
    return f"{who.name} {who.fingerprint} {','.join(who.allowed_methods)}"


try:
    load_pair("a.crt", "a.key", passphrase=b"x", insecure_key_permissions=True)
except PinrpcError as exc:
    print(exc)
"""


def readme_snippet() -> str:
    found = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert found is not None
    return found.group(1)


def test_the_readme_snippet_runs_as_written(
    connect: Connect, make_client: MakeClient, tmp_path: Path
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    (tmp_path / "keys").mkdir(exist_ok=True)
    # Only the address changes; the server's root stands in for gRPC's default roots.
    code = readme_snippet().replace("api.example.com:8443", f"localhost:{connect.server.port}")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env["GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"] = str(connect.devca.ca_path)
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=alice.cert_path.parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert 'name: "alice"' in done.stdout
    assert str(alice.fingerprint) in done.stdout


def test_a_user_script_passes_mypy_strict(tmp_path: Path) -> None:
    script = tmp_path / "user.py"
    script.write_text(readme_snippet() + "\n" + USER_SCRIPT)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(script)],
        cwd=ROOT,
        env={**os.environ, "MYPYPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_library_errors_are_pinrpc_errors_naming_the_files(
    make_client: MakeClient, tmp_path: Path
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    with pytest.raises(IdentityError, match=r"does not belong to certificate .*alice\.crt"):
        secure_channel("localhost:1", alice.cert_path, bob.key_path)
    with pytest.raises(PinrpcError, match=re.escape(str(tmp_path / "missing.crt"))):
        client_credentials(tmp_path / "missing.crt", alice.key_path)
    alice.key_path.chmod(0o640)
    with pytest.raises(KeyPermissionError, match="chmod 600"):
        load_pair(str(alice.cert_path), str(alice.key_path))
    load_pair(alice.cert_path, alice.key_path, insecure_key_permissions=True)
    assert (
        client_credentials(alice.cert_path, alice.key_path, insecure_key_permissions=True)[1]
        == alice.fingerprint
    )
