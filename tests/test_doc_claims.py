"""docs/OPERATIONS.md's claims that no other test held it to, checked against real servers and
tools: the meaning of gRPC's handshake lines, the metrics table, and the backup recipes."""

from __future__ import annotations

import datetime as dt
import re
import socket
import stat
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from pinrpc import secure_channel
from pinrpc.identity import KeyPairFiles
from pinrpc.v1 import echo_pb2, echo_pb2_grpc
from server import cli as server_cli
from server.app import start_server
from server.config import ServerConfig
from tests.certs import make_cert, p256, write_pair
from tests.conftest import SERVER_NAME, MakeClient, ServerFiles, enroll, eventually, revoke
from tests.postgres import Postgres
from tests.security.attacker import attack, serve_process

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = (ROOT / "docs" / "OPERATIONS.md").read_text(encoding="utf-8")


def _section(heading: str) -> str:
    return OPERATIONS.split(heading, 1)[1].split("\n#", 1)[0]


def _first_cells(section: str, header: str) -> list[str]:
    """The first column of the table under ``header``, without its backquotes."""
    table = section.split(header, 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^\| `([^`]+)`", table, re.M)


def _whoami(channel: grpc.Channel) -> grpc.StatusCode:
    with channel:
        try:
            echo_pb2_grpc.EchoStub(channel).WhoAmI(echo_pb2.WhoAmIRequest(), timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _tls(devca: ServerFiles, port: int, pair: tuple[Path, Path] | None) -> grpc.Channel:
    """A plain grpcio channel: pinrpc's own refuses an expired certificate before dialling."""
    key, cert = (pair[1].read_bytes(), pair[0].read_bytes()) if pair else (None, None)
    credentials = grpc.ssl_channel_credentials(devca.ca_path.read_bytes(), key, cert)
    options = [("grpc.ssl_target_name_override", SERVER_NAME)]
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials, options)


def _http1(port: int) -> grpc.StatusCode:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(100) == b""  # closed unanswered
    return grpc.StatusCode.UNAVAILABLE


def test_each_refused_handshake_leaves_the_line_the_table_names(
    devca: ServerFiles, make_client: MakeClient, registry: Path, tmp_path: Path
) -> None:
    """ "What the server's lines mean": every row, provoked against a real `serve` (which the
    table once got wrong: an expired client certificate never said `certificate has expired`,
    and two lines end with gRPC's `: Invalid certificate verification context`)."""
    alice, stranger = make_client("alice"), make_client("stranger")
    enroll(registry, alice.cert_path, "alice")
    key = p256()
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    brief_cert = make_cert(
        key, "brief", key_cert_sign=False, not_before=start, days=310 / 86400
    )  # valid 10 s more
    brief = write_pair(tmp_path, "brief", key, brief_cert)
    enroll(registry, brief[0], "brief")
    rows = _first_cells(_section("## gRPC's own log lines"), "| line on the server ends with")
    with serve_process(devca.cert, devca.key, registry, tmp_path / "serve.log") as served:
        port = served.port

        def pinned(files: KeyPairFiles) -> grpc.Channel:
            return secure_channel(
                f"127.0.0.1:{port}", files.cert_path, files.key_path, devca.ca_path, SERVER_NAME
            )

        def stolen() -> grpc.StatusCode:
            target = ["--server", f"127.0.0.1:{port}", "--ca", str(devca.ca_path)]
            run = attack(*target, "--server-name", SERVER_NAME, "--cert", alice.cert_path)
            assert run.code == 0, run.out  # 0: refused
            return grpc.StatusCode.UNAVAILABLE

        def expired() -> grpc.StatusCode:
            time.sleep(max(0.0, (brief_cert.not_valid_after_utc - _now()).total_seconds() + 0.5))
            return _whoami(_tls(devca, port, brief))

        assert _whoami(_tls(devca, port, brief)) == grpc.StatusCode.OK  # while it is valid
        causes: dict[str, list[Callable[[], grpc.StatusCode]]] = {
            "unable to get local issuer certificate": [lambda: _whoami(pinned(stranger)), expired],
            "PEER_DID_NOT_RETURN_A_CERTIFICATE": [lambda: _whoami(_tls(devca, port, None))],
            "BAD_SIGNATURE": [stolen],
            "WRONG_VERSION_NUMBER": [lambda: _whoami(grpc.insecure_channel(f"127.0.0.1:{port}"))],
            "HTTP_REQUEST": [lambda: _http1(port)],
        }
        cause_of = {row: next((c for c in causes if c in row), None) for row in rows}
        assert None not in cause_of.values(), f"a row no action provokes: {cause_of}"
        assert set(cause_of.values()) == set(causes)
        handshake_lines = _handshake_lines(served.log)
        # The control: an enrolled client's calls leave no handshake line.
        assert _whoami(pinned(alice)) == grpc.StatusCode.OK
        time.sleep(0.5)
        assert _handshake_lines(served.log) == handshake_lines
        for row in rows:
            for cause in causes[str(cause_of[row])]:
                before = _lines_with(served.log, row)
                assert cause() == grpc.StatusCode.UNAVAILABLE
                assert eventually(_more_lines(served.log, row, before), 10)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _lines_with(log: Path, text: str) -> int:
    return sum(line.rstrip().endswith(text) for line in log.read_text().splitlines())


def _more_lines(log: Path, text: str, before: int) -> Callable[[], bool]:
    return lambda: _lines_with(log, text) > before


def _handshake_lines(log: Path) -> int:
    return log.read_text().count("Handshake failed")


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def test_the_metrics_table_is_what_the_server_exposes(
    devca: ServerFiles, make_client: MakeClient, registry: Path
) -> None:
    """Every metric the table names, with its type and labels, and no other (alerts are written
    from the table): a server that renamed, dropped or added one would fail here."""
    alice = make_client("alice")
    enroll(registry, alice.cert_path, "alice")
    config = ServerConfig(
        "127.0.0.1:0", devca.cert, devca.key, str(registry), metrics_listen="127.0.0.1:0"
    )
    with start_server(config) as running:
        target = f"127.0.0.1:{running.port}"
        channel = secure_channel(
            target, alice.cert_path, alice.key_path, devca.ca_path, SERVER_NAME
        )
        with channel, pytest.raises(grpc.RpcError):  # so the labelled metrics have a sample
            echo_pb2_grpc.EchoStub(channel).Echo(echo_pb2.EchoRequest(), timeout=10)
        assert running.metrics_port is not None
        text = _scrape(running.metrics_port)
    exposed = {name: kind for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M)}
    labels: dict[str, set[str]] = {}
    for name, inside in re.findall(r"^([a-z_]+)(?:\{(.*)\})? ", text, re.M):
        family = re.sub(r"_(bucket|count|sum)$", "", name)
        labels.setdefault(family, set()).update(re.findall(r"(\w+)=", inside or ""))
    section = _section("## Metrics")
    table = re.findall(r"^\| `(pinrpc_\w+)` \| (\w+) \| ([^|]*)\|", section, re.M)
    documented = {name: kind for name, kind, _ in table}
    created = re.search(r"`_created` gauge beside (.*?)\(", section, re.S)
    assert created, "the metrics section names the _created series"
    extra = {f"{re.sub(r'_total$', '', n)}_created" for n in re.findall(r"`(\w+)`", created[1])}
    assert exposed == {**documented, **dict.fromkeys(extra, "gauge")}
    for name, _, cell in table:
        assert labels.get(name, set()) - {"le"} == set(re.findall(r"`(\w+)`", cell)), name


def _recipe(prefix: str) -> str:
    """The backup command the section gives, in backquotes, starting with ``prefix``."""
    commands: list[str] = re.findall(rf"`({re.escape(prefix)}[^`]*)`", _section("## Backups"))
    assert len(commands) == 1, commands
    return commands[0]


def _keeps_revocations(backup: str, alice: KeyPairFiles, bob: KeyPairFiles) -> None:
    """The copy lists both clients as they were, and still refuses the revoked key."""
    assert server_cli.main(["list", "--registry", backup]) == 0
    argv = ["--registry", backup]
    assert server_cli.main(["enroll", str(alice.cert_path), "--name", "again", *argv]) == 1
    assert server_cli.main(["enroll", str(bob.cert_path), "--name", "bob2", *argv]) == 1


def test_the_sqlite_backup_recipe_copies_a_serving_registry_owner_only(
    devca: ServerFiles,
    make_client: MakeClient,
    registry: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    enroll(registry, alice.cert_path, "alice")
    enroll(registry, bob.cert_path, "bob")
    revoke(registry, "alice")
    (tmp_path / "backups").mkdir()
    command = _recipe("(umask 077; sqlite3")
    assert "/backups/registry.db" in command
    local = command.replace("/backups/", "backups/")
    config = ServerConfig("127.0.0.1:0", devca.cert, devca.key, str(registry))
    with start_server(config):  # "while the server runs"
        for argv in (
            local,
            local.replace("(umask 077; ", "(umask 022; ").replace('registry.db"', 'open.db"'),
        ):
            subprocess.run(["sh", "-c", argv], cwd=registry.parent, check=True, timeout=60)
    backup, unguarded = tmp_path / "backups" / "registry.db", tmp_path / "backups" / "open.db"
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    # Why the umask: without it sqlite3's copy is readable by every local user.
    assert stat.S_IMODE(unguarded.stat().st_mode) & 0o004
    capsys.readouterr()
    _keeps_revocations(str(backup), alice, bob)
    out = capsys.readouterr().out
    assert re.search(r"^alice .* revoked ", out, re.M) and re.search(r"^bob .* active ", out, re.M)


def test_the_postgresql_backup_recipe_restores_every_revocation(
    pg: Postgres, make_client: MakeClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    source = pg.create_database("backed_up")
    for argv in (
        ["enroll", str(alice.cert_path), "--name", "alice"],
        ["enroll", str(bob.cert_path), "--name", "bob"],
        ["revoke", "alice"],
    ):
        assert server_cli.main([*argv, "--registry", source]) == 0
    dump = _recipe("pg_dump").replace("postgresql://pinrpc@db:5432/pinrpc", source).split()
    subprocess.run(dump, cwd=tmp_path, check=True, timeout=60, capture_output=True)
    assert "`pg_restore -d`" in _section("## Backups")
    restored = pg.create_database("restored")
    restore = ["pg_restore", "-d", restored, "registry.dump"]
    subprocess.run(restore, cwd=tmp_path, check=True, timeout=60, capture_output=True)
    capsys.readouterr()
    _keeps_revocations(restored, alice, bob)
    out = capsys.readouterr().out
    assert re.search(r"^alice .* revoked ", out, re.M) and re.search(r"^bob .* active ", out, re.M)
