"""Node's @grpc/grpc-js (a gRPC stack nobody here wrote) calls WhoAmI with a pinrpc key pair."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import Connect, MakeClient
from tests.interop import require_tool, run, tls_files

NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="module")
def node() -> str:
    """node, with tests/interop/node/node_modules installed from the lock file.

    .ci/run installs node_modules before the tests; this installs it for a developer who has
    not, and fails under CI=true (skips elsewhere) when that is impossible.
    """
    node = require_tool("node", "Node.js (Debian package nodejs)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        npm = require_tool("npm", "npm (Debian package npm)")
        done = run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR)
        if done.returncode != 0:
            message = f"npm ci failed in {NODE_DIR}: {done.stderr.strip()[-500:]}"
            if os.environ.get("CI") == "true":
                pytest.fail(message)
            shutil.rmtree(NODE_DIR / "node_modules", ignore_errors=True)
            pytest.skip(message)
    return node


def whoami(node: str, files: dict[str, str]) -> tuple[int, str, str]:
    argv = [node, str(NODE_DIR / "whoami.js"), files["target"], files["cert"], files["key"]]
    done = run([*argv, files["ca"], files["name"]])
    return done.returncode, done.stdout, done.stderr


def test_node_client_calls_whoami(node: str, connect: Connect, make_client: MakeClient) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice", "/pinrpc.v1.Echo/Echo")
    code, out, err = whoami(node, tls_files(connect, alice))
    assert code == 0, err
    assert json.loads(out) == {
        "name": "alice",
        "fingerprint": str(alice.fingerprint),
        "allowed_methods": ["/pinrpc.v1.Echo/Echo"],
    }


def test_node_client_with_unenrolled_certificate_is_refused(
    node: str, connect: Connect, make_client: MakeClient
) -> None:
    connect.enroll(make_client("alice"), "alice")
    code, out, err = whoami(node, tls_files(connect, make_client("mallory")))
    assert code == 1, (out, err)
    assert out == ""
    assert json.loads(err.strip().splitlines()[-1])["code"] == "UNAVAILABLE"
