"""Certificates and registries for the benchmark, made fresh in a temporary directory.

Large registries are written straight into SQLite with the registry's own schema and column
order: enrolling 10,000 clients one by one through `pinrpc-server enroll` re-reads every row
per enrollment (quadratic) and would take longer than the benchmark itself. Every row still
passes server.enrollment.check_certificate, as a CLI enrollment would.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pinrpc.identity import (
    KeyPairFiles,
    cert_to_pem,
    create_identity,
    generate_key,
    self_signed_certificate,
)
from server.devca import DevCA
from server.enrollment import Candidate, check_certificate
from server.registry import now_utc

try:  # the registry's column list moved with the SQL backends; accept both layouts
    from server.registry_schema import COLUMNS
except ImportError:  # pragma: no cover
    from server.registry import COLUMNS  # type: ignore[attr-defined,no-redef]

SERVER_NAME = "server.test"
ECHO_ALL = "/pinrpc.v1.Echo/*"


@dataclass(frozen=True)
class ServerFiles:
    ca_path: Path
    cert: Path
    key: Path


def server_files(directory: Path) -> ServerFiles:
    ca = DevCA("pinrpc bench CA")
    cert, key = ca.issue([SERVER_NAME, "127.0.0.1"]).write(directory)
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.root_pem)
    return ServerFiles(ca_path, cert, key)


def client(directory: Path, name: str, key_type: str = "p256") -> KeyPairFiles:
    return create_identity(name, directory, key_type=key_type)


def filler_candidates(count: int) -> list[Candidate]:
    """``count`` distinct enrolled-looking certificates, each with its own P-256 key."""
    out = []
    for i in range(count):
        pem = cert_to_pem(self_signed_certificate(generate_key("p256"), f"fleet-{i:05d}"))
        out.append(check_certificate(pem, f"filler {i}"))
    return out


def candidate_of(files: KeyPairFiles) -> Candidate:
    return check_certificate(files.cert_path.read_bytes(), str(files.cert_path))


def write_registry(
    path: Path, named: list[tuple[str, Candidate]], fillers: list[Candidate]
) -> None:
    """A registry holding ``named`` clients (allowed Echo/*) then ``fillers``, in one commit."""
    # The schema comes from the CLI in a fresh process, so it always matches the servers and
    # CLIs the benchmark starts (even if the code changed since this process imported it).
    subprocess.run(
        [sys.executable, "-m", "server.cli", "migrate", "--registry", str(path)],
        cwd=Path(__file__).resolve().parent.parent,
        check=True,
        capture_output=True,
    )
    now = now_utc().isoformat()
    rows = [(name, c) for name, c in named]
    rows += [(f"fleet-{i:05d}", c) for i, c in enumerate(fillers)]
    db = sqlite3.connect(path, isolation_level=None)
    # Only the columns every schema version has; newer optional columns stay NULL.
    columns = [c.strip() for c in COLUMNS.split(",")]
    fixed = columns[: columns.index("not_after") + 1]
    marks = ",".join("?" * len(fixed))
    try:
        db.execute("BEGIN IMMEDIATE")
        db.executemany(
            f"INSERT INTO clients ({', '.join(fixed)}) VALUES ({marks})",  # noqa: S608
            [
                (
                    name,
                    c.fingerprint.hex,
                    c.pem,
                    c.spki_sha256,
                    c.subject,
                    int(c.has_key_ids),
                    json.dumps([ECHO_ALL]),
                    now,
                    c.not_after.isoformat(),
                )
                for name, c in rows
            ],
        )
        db.execute("UPDATE meta SET value = value + 1 WHERE key='generation'")
        db.execute("COMMIT")
    finally:
        db.close()
