"""WhoAmI tells the caller until when the server admits its certificate: the registry's end for
it, a rotation's overlap while it retires; `pinrpc whoami` prints it, and a rotation settled
after a lost answer keeps the old pair until then instead of an unknown end."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import grpc
import pytest

from client.keyfiles import UNKNOWN_END, new, old
from pinrpc.cli import Exit
from pinrpc.identity import (
    Fingerprint,
    KeyPairFiles,
    cert_to_pem,
    create_identity,
    load_certificate,
)
from pinrpc.v1 import echo_pb2
from server.enrollment import check_certificate
from tests.conftest import Connect, MakeClient, registry_dump
from tests.security.test_hostile_server import OUT_OF_RANGE, Serve, cli, hostile  # noqa: F401
from tests.test_rotate_crash import assert_new_pair_in_place
from tests.test_rotate_unknown import enrolled_but_unjournaled, fingerprint, until


def whoami_json(connect: Connect, files: KeyPairFiles, capsys: pytest.CaptureFixture[str]) -> Any:
    code, out, err = cli(["whoami", "--json", *connect.cli_flags(files)], capsys)
    assert code == Exit.OK, err
    return json.loads(out)


def row(connect: Connect, files: KeyPairFiles, capsys: pytest.CaptureFixture[str]) -> Any:
    """The registry's row for this pair, as `pinrpc-server list --json` shows it."""
    rows = registry_dump(connect.server_registry, capsys)
    assert isinstance(rows, list)
    return next(r for r in rows if r["fingerprint"] == str(files.fingerprint))


def minute(iso: str) -> str:
    return f"{dt.datetime.fromisoformat(iso):%Y-%m-%d %H:%M} UTC"


def test_whoami_says_a_current_pair_is_admitted_until_its_end(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    alice = make_client("alice", days=30)
    connect.enroll(alice, "alice")
    end = row(connect, alice, capsys)["not_after"]
    assert dt.datetime.fromisoformat(end) == load_certificate(alice.cert_path).not_valid_after_utc
    code, out, err = cli(["whoami", *connect.cli_flags(alice)], capsys)
    assert code == Exit.OK, err
    assert f"admitted     until {minute(end)}\n" in out, out  # not retiring: nothing after
    me = whoami_json(connect, alice, capsys)
    assert me["admitted_until"] == end and me["retiring"] is False, me


def test_whoami_says_an_end_the_registry_set_before_the_certificates(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """The registry's end, not the certificate's own notAfter, is when the server stops."""
    bob = make_client("bob")  # valid 365 days
    earlier = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=2)
    candidate = check_certificate(cert_to_pem(load_certificate(bob.cert_path)), "bob")
    connect.plant(dataclasses.replace(candidate, not_after=earlier), "bob")
    me = whoami_json(connect, bob, capsys)
    assert me["admitted_until"] == earlier.isoformat() and me["retiring"] is False, me
    code, out, _ = cli(["whoami", *connect.cli_flags(bob)], capsys)
    assert code == Exit.OK and f"admitted     until {earlier:%Y-%m-%d %H:%M} UTC\n" in out, out


def test_whoami_says_a_retiring_pair_ends_with_its_overlap(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    carol = make_client("carol")
    connect.enroll(carol, "carol")
    code, _, err = cli(["rotate", "--overlap", "3600", *connect.cli_flags(carol)], capsys)
    assert code == Exit.OK, err
    retiring = KeyPairFiles(old(carol.key_path), old(carol.cert_path), carol.fingerprint)
    ends = row(connect, retiring, capsys)["retire_at"]
    left = dt.datetime.fromisoformat(ends) - dt.datetime.now(dt.UTC)
    assert dt.timedelta(minutes=59) < left <= dt.timedelta(hours=1), ends
    me = whoami_json(connect, retiring, capsys)
    assert me["admitted_until"] == ends and me["retiring"] is True, me
    code, out, _ = cli(["whoami", *connect.cli_flags(retiring)], capsys)
    assert (
        code == Exit.OK
        and f"admitted     until {minute(ends)} (retiring: a rotation replaced" in out
    ), out
    # Beside it, the successor is not retiring: its end is its own certificate's.
    successor = KeyPairFiles(
        carol.key_path, carol.cert_path, Fingerprint.of(load_certificate(carol.cert_path))
    )
    me = whoami_json(connect, successor, capsys)
    assert me["retiring"] is False, me
    assert me["admitted_until"] == row(connect, successor, capsys)["not_after"], me


def test_a_settled_rotation_keeps_the_old_pair_until_the_servers_end(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before, the old pair's end was recorded as unknown: kept until the next rotate,
    whenever that came, though the server had said when it stops admitting it."""
    dave = make_client("dave")
    connect.enroll(dave, "dave")
    staged = enrolled_but_unjournaled(connect, dave, "--overlap", "7200")
    ends = row(connect, dave, capsys)["retire_at"]
    code, _, err = cli(["whoami", *connect.cli_flags(dave)], capsys)
    assert code == Exit.OK and err.count("\n") == 1 and "settled" in err, err
    assert f"(admitted until {minute(ends)})" in err, err
    assert_new_pair_in_place(dave, staged)
    assert until(dave).read_text() == ends


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_an_impossible_end_from_a_server_is_one_line(
    hostile: Serve,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    json_flag: list[str],
) -> None:
    def answer(seconds: int) -> Any:
        reply = echo_pb2.WhoAmIResponse(name="me", fingerprint="AB")
        reply.admitted_until.seconds = seconds
        return lambda req, ctx: reply

    argv = hostile({"Echo": {"WhoAmI": answer(OUT_OF_RANGE)}})
    code, out, err = cli(["whoami", *json_flag, *argv], capsys)
    assert code == Exit.RPC, err
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert "the server answered with an invalid end of admission" in err, err
    # Beside it: the last instant protobuf allows is printed.
    argv = hostile({"Echo": {"WhoAmI": answer(OUT_OF_RANGE // 10 - 1)}})
    code, out, err = cli(["whoami", *json_flag, *argv], capsys)
    assert code == Exit.OK and "9999-12-31" in out, err


@pytest.mark.parametrize(
    ("seconds", "said"),
    [
        (OUT_OF_RANGE, "its end unknown: the server answered with an invalid"),
        (None, "its end unknown here: the next rotate replaces it"),  # an older server
    ],
)
def test_a_settled_rotation_without_a_valid_end_keeps_it_unknown(
    hostile: Serve,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    seconds: int | None,
    said: str,
) -> None:
    """The server admits the staged pair (so it is swapped in) but gives no end for the old
    pair, or garbage: recorded as unknown, one line, no traceback."""
    bad = echo_pb2.WhoAmIResponse(name="me")
    if seconds is not None:
        bad.admitted_until.seconds = seconds

    def echo(req: Any, ctx: grpc.ServicerContext) -> echo_pb2.EchoResponse:
        return echo_pb2.EchoResponse(message="hi", caller="me")  # no deserializer here

    argv = hostile({"Echo": {"WhoAmI": lambda req, ctx: bad, "Echo": echo}})
    cert = Path(argv[argv.index("--cert") + 1])
    key = Path(argv[argv.index("--key") + 1])
    staged = create_identity("me", tmp_path / "staged")  # as rotate stages it: same name
    os.replace(staged.cert_path, new(cert))
    os.replace(staged.key_path, new(key))
    code, out, err = cli(["echo", "hi", *argv], capsys)
    assert code == Exit.OK and out == "hi\n", err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert said in err, err
    assert fingerprint(cert) == str(staged.fingerprint) and not new(cert).exists()
    assert until(KeyPairFiles(key, cert, staged.fingerprint)).read_text() == UNKNOWN_END


def test_a_settled_rotation_records_no_end_past_the_old_certificates_own(
    hostile: Serve,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A server (or a man in the middle with its certificate) that says the old pair is
    admitted until 9999 had the client keep the old private key until then (or until the next
    rotate): no server admits a certificate past its notAfter, so that is the latest end."""
    late = echo_pb2.WhoAmIResponse(name="me")
    late.admitted_until.FromDatetime(dt.datetime(9999, 12, 31, tzinfo=dt.UTC))
    soon = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(hours=1)
    early = echo_pb2.WhoAmIResponse(name="me")
    early.admitted_until.FromDatetime(soon)

    def echo(req: Any, ctx: grpc.ServicerContext) -> echo_pb2.EchoResponse:
        return echo_pb2.EchoResponse(message="hi", caller="me")

    def answering(reply: echo_pb2.WhoAmIResponse) -> Any:
        return lambda req, ctx: reply

    for answer, expected in ((late, None), (early, soon)):
        argv = hostile({"Echo": {"WhoAmI": answering(answer), "Echo": echo}})
        cert = Path(argv[argv.index("--cert") + 1])
        key = Path(argv[argv.index("--key") + 1])
        old_end = load_certificate(cert).not_valid_after_utc
        staged = create_identity("me", tmp_path / f"staged{expected is None}")
        os.replace(staged.cert_path, new(cert))
        os.replace(staged.key_path, new(key))
        code, out, err = cli(["echo", "hi", *argv], capsys)
        assert code == Exit.OK and out == "hi\n", err
        recorded = until(KeyPairFiles(key, cert, staged.fingerprint)).read_text()
        # Denied: 9999 is cut to the old certificate's notAfter. Allowed: an earlier end stays.
        assert dt.datetime.fromisoformat(recorded) == (expected or old_end), recorded
        assert f"admitted until {(expected or old_end):%Y-%m-%d %H:%M} UTC" in err, err
        for path in (old(cert), old(key), until(KeyPairFiles(key, cert, staged.fingerprint))):
            path.unlink()
