"""Client certificate expiry never surprises: list, server log, client warning, clear refusal."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import pytest

from client import cli as client_cli
from pinrpc.cli import Exit
from pinrpc.identity import cert_to_pem, create_identity, generate_key, self_signed_certificate
from server import cli as server_cli
from server.enrollment import check_certificate
from tests.certs import write_pair
from tests.conftest import Connect, MakeClient, enroll


def test_list_shows_days_left_and_flags_expiring(
    registry: Path, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    enroll(registry, make_client("soon", days=5).cert_path, "soon")
    enroll(registry, make_client("later", days=200).cert_path, "later")
    capsys.readouterr()
    assert server_cli.main(["list", "--registry", str(registry)]) == 0
    soon, later = capsys.readouterr().out.splitlines()
    assert "4 days left" in soon or "5 days left" in soon
    assert "expiring" in soon
    assert "expiring" not in later
    assert server_cli.main(["list", "--json", "--warn-days", "3", "--registry", str(registry)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["expiring"]) for r in rows] == [("soon", False), ("later", False)]
    assert rows[0]["days_left"] in (4, 5)


def test_server_warns_about_expiring_clients_once(
    connect: Connect, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="pinrpc.trust"):
        connect.enroll(make_client("soon", days=3), "soon")
        connect.enroll(make_client("fine", days=300), "fine")
        for _ in range(3):
            connect.server.trust.poll()
    warnings = [r.getMessage() for r in caplog.records if "should rotate" in r.getMessage()]
    assert len(warnings) == 1
    assert "'soon'" in warnings[0]


def test_client_warns_when_its_certificate_is_expiring(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = make_client("alice", days=10)
    connect.enroll(alice, "alice")
    capsys.readouterr()
    assert client_cli.main(["whoami", *connect.cli_flags(alice)]) == Exit.OK
    err = capsys.readouterr().err
    assert "expires in 9 days" in err or "expires in 10 days" in err
    flags = [*connect.cli_flags(alice), "--warn-days", "5"]
    assert client_cli.main(["whoami", *flags]) == Exit.OK
    assert "expires" not in capsys.readouterr().err


def test_expired_client_is_told_so(
    connect: Connect, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = generate_key()
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    cert = self_signed_certificate(key, "old", days=2, now=past)
    connect.plant(check_certificate(cert_to_pem(cert), "old", now=past), "old")
    cert_path, key_path = write_pair(tmp_path, "old", key, cert)
    files = create_identity("unused", tmp_path / "x")
    flags = connect.cli_flags(files)
    flags[flags.index("--cert") + 1] = str(cert_path)
    flags[flags.index("--key") + 1] = str(key_path)
    capsys.readouterr()
    assert client_cli.main(["whoami", *flags]) == Exit.CONNECT
    err = capsys.readouterr().err
    assert "your certificate EXPIRED on" in err
