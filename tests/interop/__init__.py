"""Interop tests: clients nobody on this project wrote (grpcurl, Node's grpc-js, openssl)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from pinrpc.identity import KeyPairFiles
from tests import conftest
from tests.conftest import SERVER_NAME, Connect

TIMEOUT = 60  # seconds for one tool run; they take well under one


def require_tool(path: Path | str | None, what: str) -> str:
    """The tool's path; under CI=true a missing tool fails the test, elsewhere it skips."""
    found = shutil.which(str(path)) if path is not None else None
    conftest.require_tool(found is not None, what, ".ci/run installs it")
    return str(found)


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        argv, capture_output=True, text=True, timeout=TIMEOUT, check=False, **kwargs
    )


def tls_files(connect: Connect, client: KeyPairFiles) -> dict[str, str]:
    """What every tool needs: the client's pair, the server's root and the name to expect."""
    return {
        "cert": str(client.cert_path),
        "key": str(client.key_path),
        "ca": str(connect.devca.ca_path),
        "name": SERVER_NAME,
        "target": connect.target,
    }
