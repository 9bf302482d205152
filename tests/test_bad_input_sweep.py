"""A bad-input sweep of both command lines, run as the real console scripts: what a careless or
hostile operator types (empty, blank, non-UTF-8, 100,000 characters, NaN, huge numbers,
directories, FIFOs, devices, symlink loops, registries that are not pinrpc's, the same values
through PINRPC_* variables, conflicting flags) gets a non-zero exit, one line on stderr (after
argparse's usage for a usage error, exit 2), no traceback, and leaves every file as it was.

Each case runs in a fresh directory (the working directory too, so that a relative " " lands
there) and is bounded by a timeout: a FIFO or /dev/zero must neither hang nor be read for ever.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import sqlite3
import subprocess
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pinrpc.identity import Fingerprint, create_identity, load_certificate
from server.enrollment import check_certificate
from server.registry import open_registry
from tests.conftest import enroll
from tests.security.attacker import BIN, ROOT

LONG = "x" * 100_000
NOT_UTF8 = os.fsdecode(b"\xff")  # argv and file names are bytes; this one is not UTF-8
TIMEOUT = 20.0  # far above any case's run time: only a hang reaches it


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]  # "{reg}" and the like: files laid out by _lay_out
    env: dict[str, str] = field(default_factory=dict)
    expect: str = ""  # a phrase the error line must hold, where the old one misled


def _case(*argv: str, env: dict[str, str] | None = None, expect: str = "") -> Case:
    return Case(argv, env or {}, expect)


S, C = "pinrpc-server", "pinrpc"
PAIR = ("--cert", "{crt}", "--key", "{key}")
DIAL = ("--server", "127.0.0.1:1", "--timeout", "1")
SERVE = ("serve", "--listen", "127.0.0.1:0")
ACME = ("--directory", "http://127.0.0.1:1/d", "--domain", "x", "--out", "{dir}/o")

CASES = {
    # --- pinrpc-server: the registry --------------------------------------------------------
    # Fixed here (server/cli.py): a 100,000-character path was a traceback from Path.exists().
    "list-registry-long": _case(S, "list", "--registry", LONG, expect="File name too long"),
    "revoke-env-registry-long": _case(S, "revoke", "alice", env={"PINRPC_REGISTRY": LONG}),
    "permit-registry-long": _case(S, "permit", "alice", "--none", "--registry", LONG),
    # Fixed: copy-registry's resolve() raised RuntimeError on a symlink loop.
    "copy-source-loop": _case(S, "copy-registry", "{loop}", "{dir}/new.db", expect="symbolic"),
    "copy-dest-loop": _case(S, "copy-registry", "{reg}", "{loop}", expect="symbolic"),
    # Fixed (pinrpc/cli.py's path_text): a blank or space-padded path made a new registry.
    "enroll-registry-blank": _case(S, "enroll", "{crt}", "--name", "bob", "--registry", " "),
    "enroll-env-registry-blank": _case(
        S, "enroll", "{crt}", "--name", "bob", env={"PINRPC_REGISTRY": "  "}
    ),
    "enroll-registry-padded": _case(
        S, "enroll", "{crt}", "--name", "bob", "--registry", "reg.db ", expect="spaces"
    ),
    "copy-dest-blank": _case(S, "copy-registry", "{reg}", " "),
    "list-registry-empty": _case(S, "list", "--registry", ""),
    "list-registry-dir": _case(S, "list", "--registry", "{dir}"),
    "pending-registry-fifo": _case(S, "pending", "--registry", "{fifo}"),
    "list-registry-dev-zero": _case(S, "list", "--registry", "/dev/zero"),
    "revoke-registry-garbage": _case(S, "revoke", "alice", "--registry", "{garbage}"),
    "enroll-registry-other-app": _case(
        S, "enroll", "{crt}", "--name", "bob", "--registry", "{other}"
    ),
    "list-registry-truncated": _case(S, "list", "--registry", "{trunc}"),
    "revoke-registry-truncated": _case(S, "revoke", "alice", "--registry", "{trunc}"),
    "migrate-registry-other-app": _case(S, "migrate", "--registry", "{other}"),
    "list-registry-loop": _case(S, "list", "--registry", "{loop}"),
    "list-registry-not-utf8": _case(S, "list", "--registry", "{dir}/" + NOT_UTF8),
    "revoke-registry-missing": _case(S, "revoke", "alice", "--registry", "{dir}/none.db"),
    # Fixed: the clean-up after the failure unlinked "{crt}/x.db": NotADirectoryError.
    "copy-dest-under-a-file": _case(
        S, "copy-registry", "{reg}", "{crt}/x.db", expect="is not a directory"
    ),
    "serve-registry-under-a-file": _case(
        S, *SERVE, *PAIR, "--registry", "{crt}/x.db", expect="is not a directory"
    ),
    "copy-same": _case(S, "copy-registry", "{reg}", "{reg}"),
    "copy-source-garbage": _case(S, "copy-registry", "{garbage}", "{dir}/new.db"),
    "copy-dest-other-app": _case(S, "copy-registry", "{reg}", "{other}"),
    # --- pinrpc-server: names, fingerprints, patterns ---------------------------------------
    "enroll-name-blank": _case(S, "enroll", "{crt}", "--name", " ", "--registry", "{reg}"),
    "enroll-name-long": _case(S, "enroll", "{crt}", "--name", LONG, "--registry", "{reg}"),
    "enroll-name-newline": _case(S, "enroll", "{crt}", "--name", "a\nb", "--registry", "{reg}"),
    "enroll-name-not-utf8": _case(S, "enroll", "{crt}", "--name", NOT_UTF8, "--registry", "{reg}"),
    "enroll-allow-long": _case(
        S, "enroll", "{crt}", "--name", "bob", "--allow", LONG, "--registry", "{reg}"
    ),
    "enroll-env-allow-not-utf8": _case(
        S, "enroll", "{crt}", "--name", "bob", "--registry", "{reg}", env={"PINRPC_ALLOW": "/\n/"}
    ),
    "revoke-not-utf8": _case(S, "revoke", NOT_UTF8, "--registry", "{reg}"),
    "revoke-long": _case(S, "revoke", LONG, "--registry", "{reg}"),
    "approve-empty": _case(S, "approve", "", "--registry", "{reg}"),
    # Fixed: an empty --name (an unset shell variable) approved under the requested name.
    "approve-name-empty": _case(
        S, "approve", "{carol}", "--name", "", "--registry", "{reg}", expect="invalid client name"
    ),
    "approve-name-blank": _case(S, "approve", "{carol}", "--name", " ", "--registry", "{reg}"),
    "approve-allow-not-utf8": _case(
        S, "approve", "{carol}", "--allow", NOT_UTF8, "--registry", "{reg}"
    ),
    "approve-env-allow-long": _case(
        S, "approve", "{carol}", "--registry", "{reg}", env={"PINRPC_ALLOW": LONG}
    ),
    "reject-long": _case(S, "reject", LONG, "--registry", "{reg}"),
    "permit-none-and-allow": _case(
        S, "permit", "alice", "--none", "--allow", "/x/*", "--registry", "{reg}"
    ),
    "permit-nothing": _case(S, "permit", "alice", "--registry", "{reg}"),
    # --- pinrpc-server enroll: the certificate file -----------------------------------------
    # Fixed: "" was read as the working directory ("Is a directory").
    "enroll-cert-empty": _case(
        S, "enroll", "", "--name", "bob", "--registry", "{reg}", expect="must not be empty"
    ),
    "enroll-cert-dev-zero": _case(S, "enroll", "/dev/zero", "--name", "bob", "--registry", "{reg}"),
    "enroll-cert-fifo": _case(S, "enroll", "{fifo}", "--name", "bob", "--registry", "{reg}"),
    "enroll-cert-loop": _case(S, "enroll", "{loop}", "--name", "bob", "--registry", "{reg}"),
    "enroll-cert-long": _case(S, "enroll", LONG, "--name", "bob", "--registry", "{reg}"),
    "enroll-cert-key": _case(S, "enroll", "{key}", "--name", "bob", "--registry", "{reg}"),
    # --- pinrpc-server serve: flags checked before anything starts --------------------------
    # Fixed: "" named the working directory ("is not a regular file"), "  " a missing file.
    "serve-cert-empty": _case(
        S, *SERVE, "--cert", "", "--key", "{key}", "--registry", "{reg}", expect="--cert"
    ),
    "serve-key-blank": _case(
        S, *SERVE, "--cert", "{crt}", "--key", "  ", "--registry", "{reg}", expect="--key"
    ),
    # Fixed: a blank --warm-start started the server (a file named " " in the working dir).
    "serve-warm-start-blank": _case(
        S, *SERVE, *PAIR, "--registry", "{reg}", "--tls-reload", "handover", "--warm-start", " "
    ),
    "serve-cert-fifo": _case(
        S, *SERVE, "--cert", "{fifo}", "--key", "{key}", "--registry", "{reg}"
    ),
    "serve-key-dev-urandom": _case(
        S, *SERVE, "--cert", "{crt}", "--key", "/dev/urandom", "--registry", "{reg}"
    ),
    "serve-registry-long": _case(S, *SERVE, *PAIR, "--registry", LONG),
    "serve-warm-start-inline": _case(S, *SERVE, *PAIR, "--registry", "{reg}", "--warm-start", "w"),
    "serve-listen-port-huge": _case(
        S, "serve", *PAIR, "--registry", "{reg}", "--listen", "127.0.0.1:99999999999999999999"
    ),
    "serve-env-listen-not-utf8": _case(
        S, "serve", *PAIR, "--registry", "{reg}", env={"PINRPC_LISTEN": NOT_UTF8 + ":1"}
    ),
    "serve-overlap-nan": _case(
        S, *SERVE, *PAIR, "--registry", "{reg}", "--rotation-overlap", "nan"
    ),
    "serve-ttl-inf": _case(S, *SERVE, *PAIR, "--registry", "{reg}", "--enrollment-ttl", "inf"),
    "serve-workers-huge": _case(
        S, *SERVE, *PAIR, "--registry", "{reg}", "--max-workers", "99999999999999999999"
    ),
    "serve-env-workers-negative": _case(
        S, *SERVE, *PAIR, "--registry", "{reg}", env={"PINRPC_MAX_WORKERS": "-1"}
    ),
    "serve-age-1e309": _case(
        S, *SERVE, *PAIR, "--registry", "{reg}", "--max-connection-age", "1e309"
    ),
    "serve-env-tls-reload-bogus": _case(
        S, *SERVE, *PAIR, "--registry", "{reg}", env={"PINRPC_TLS_RELOAD": " "}
    ),
    "list-warn-days-long": _case(S, "list", "--registry", "{reg}", "--warn-days", LONG),
    "list-env-warn-days-nan": _case(
        S, "list", "--registry", "{reg}", env={"PINRPC_WARN_DAYS": "nan"}
    ),
    "obtain-cert-port-negative": _case(S, "obtain-cert", *ACME, "--http-port", "-1"),
    # --- pinrpc -----------------------------------------------------------------------------
    "fingerprint-empty": _case(C, "fingerprint", ""),
    "fingerprint-dir": _case(C, "fingerprint", "{dir}"),
    "fingerprint-fifo": _case(C, "fingerprint", "{fifo}"),
    "fingerprint-dev-zero": _case(C, "fingerprint", "/dev/zero"),
    "fingerprint-loop": _case(C, "fingerprint", "{loop}"),
    "fingerprint-not-utf8": _case(C, "fingerprint", "{dir}/" + NOT_UTF8),
    "keygen-days-nan": _case(C, "keygen", "k", "--dir", "{dir}/k", "--days", "nan"),
    "keygen-env-days-huge": _case(
        C, "keygen", "k", "--dir", "{dir}/k", env={"PINRPC_DAYS": "9" * 30}
    ),
    "keygen-name-blank": _case(C, "keygen", " ", "--dir", "{dir}/k"),
    "keygen-name-not-utf8": _case(C, "keygen", NOT_UTF8, "--dir", "{dir}/k"),
    "keygen-key-type-ed25519": _case(C, "keygen", "k", "--dir", "{dir}/k", "--key-type", "ed25519"),
    "whoami-cert-fifo": _case(C, "whoami", *DIAL, "--cert", "{fifo}", "--key", "{key}"),
    "whoami-key-dev-urandom": _case(C, "whoami", *DIAL, "--cert", "{crt}", "--key", "/dev/urandom"),
    "whoami-env-ca-dev-zero": _case(C, "whoami", *DIAL, *PAIR, env={"PINRPC_CA": "/dev/zero"}),
    "whoami-ca-loop": _case(C, "whoami", *DIAL, *PAIR, "--ca", "{loop}"),
    "whoami-timeout-nan": _case(C, "whoami", "--server", "127.0.0.1:1", *PAIR, "--timeout", "nan"),
    "whoami-env-timeout-negative": _case(
        C, "whoami", "--server", "127.0.0.1:1", *PAIR, env={"PINRPC_TIMEOUT": "-1"}
    ),
    "whoami-server-long": _case(C, "whoami", "--server", LONG, *PAIR),
    "whoami-env-server-blank": _case(C, "whoami", *PAIR, env={"PINRPC_SERVER": " "}),
    "whoami-cert-only": _case(C, "whoami", *DIAL, "--cert", "{crt}"),
    "echo-not-utf8": _case(C, "echo", NOT_UTF8, *DIAL, *PAIR),
    "rotate-overlap-inf": _case(C, "rotate", *DIAL, *PAIR, "--overlap", "inf"),
    "request-name-not-utf8": _case(C, "request-enrollment", *DIAL, *PAIR, "--name", NOT_UTF8),
    "admin-get-not-utf8": _case(C, "admin", "get", NOT_UTF8, *DIAL, *PAIR),
    "keygen-dir-long": _case(C, "keygen", "k", "--dir", LONG),
    "whoami-cert-long": _case(C, "whoami", *DIAL, "--cert", LONG, "--key", "{key}"),
    "keygen-dir-empty": _case(C, "keygen", "k", "--dir", ""),
    "list-postgres-host-long": _case(S, "list", "--registry", f"postgresql://u@{'h' * 64}:5432/db"),
}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The files every case starts from: alice's pair, a registry she is enrolled in, and
    registries that are not pinrpc's or are damaged."""
    where = tmp_path_factory.mktemp("template")
    pair = create_identity("alice", where)
    registry = where / "reg.db"
    enroll(registry, pair.cert_path, "alice", "/pinrpc.v1.Echo/*")
    carol = create_identity("carol", where)
    with closing(open_registry(str(registry), create=False)) as opened:
        asked = check_certificate(carol.cert_path.read_bytes(), str(carol.cert_path))
        opened.request_enrollment(asked, "carol", "ipv4:127.0.0.1:1", dt.timedelta(days=1), 9)
    other = where / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    db.close()
    data = registry.read_bytes()
    return {
        "crt": pair.cert_path.read_bytes(),
        "key": pair.key_path.read_bytes(),
        "reg": data,
        "trunc": data[: len(data) // 2],
        "garbage": b"not a database\n" * 100,
        "other": other.read_bytes(),
        "carol": str(Fingerprint.of(load_certificate(carol.cert_path))).encode(),
    }


def _lay_out(template: dict[str, bytes], where: Path) -> dict[str, str]:
    names = {"crt": "alice.crt", "key": "alice.key", "reg": "reg.db", "trunc": "trunc.db",
             "garbage": "garbage.db", "other": "other.db"}  # fmt: skip
    paths = {}
    for kind, name in names.items():
        path = where / name
        path.write_bytes(template[kind])
        path.chmod(0o600)
        paths[kind] = str(path)
    (where / "dir").mkdir()
    os.mkfifo(where / "fifo")
    (where / "loop").symlink_to(where / "loop")
    return {**paths, "dir": str(where / "dir"), "fifo": str(where / "fifo"),
            "loop": str(where / "loop"), "carol": template["carol"].decode()}  # fmt: skip


def _snapshot(where: Path) -> dict[str, str]:
    """Every name under ``where`` with its kind, and a regular file's SHA-256. Not SQLite's
    -wal and -shm beside a WAL database: reading one leaves them, a good registry's too
    (docs/OPERATIONS.md), and they hold nothing a reader wrote."""
    seen = {}
    for path in sorted(where.rglob("*")):
        if path.name.endswith(("-wal", "-shm")):
            continue
        if path.is_symlink() or not path.is_file():
            seen[str(path)] = "dir" if path.is_dir() and not path.is_symlink() else "special"
        else:
            seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return seen


def _check(case: Case, template: dict[str, bytes], tmp_path: Path) -> None:
    paths = _lay_out(template, tmp_path)
    before = _snapshot(tmp_path)
    program, *rest = case.argv
    argv = [str(BIN / program), *(a.format(**paths) if "{" in a else a for a in rest)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PINRPC_")}
    env |= {"PYTHONPATH": str(ROOT), **case.env}
    done = subprocess.run(
        argv, cwd=tmp_path, env=env, capture_output=True, text=True, errors="replace",
        stdin=subprocess.DEVNULL, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    err = done.stderr
    assert "Traceback" not in err, err[-2000:]
    lines = err.splitlines()
    # The connection cases end before dialling: bad input is refused first.
    assert done.returncode in (1, 2), (done.returncode, err[-2000:])
    if done.returncode == 2:  # argparse: its usage (one or more lines), then the error
        assert lines[0].startswith("usage: ") or len(lines) == 1, err[-2000:]
    else:
        assert len(lines) == 1, err[-2000:]
    assert lines[-1].startswith(f"{program}") and ": error: " in lines[-1], err[-2000:]
    assert case.expect in lines[-1], lines[-1][:500]
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(
    name: str, template: dict[str, bytes], tmp_path: Path
) -> None:
    _check(CASES[name], template, tmp_path)
