"""The client against a hostile or broken server: a real grpcio server on pinrpc's own service
names, holding the server's certificate (a man in the middle), whose answers misbehave.

Its text must neither drive the terminal (escape sequences, carriage returns, bidi overrides)
nor forge lines of output; its garbage must end a command with one line, not a traceback.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from client import cli as client_cli
from pinrpc.cli import Exit, shown
from pinrpc.identity import Fingerprint, KeyPairFiles, cert_to_pem, key_to_pem
from pinrpc.v1 import admin_pb2, echo_pb2, enrollment_pb2, identity_pb2
from server.app import RunningServer
from tests.certs import make_cert
from tests.conftest import SERVER_NAME, MakeClient, ServerFiles
from tests.test_enrollment_requests import enrolling  # noqa: F401 (a fixture)

# An OSC that retitles the terminal, a colour, a carriage return and a newline that forge a
# line of their own, and a right-to-left override.
EVIL = "ok\x1b]0;pwned\x07\x1b[31mRED\r\nFORGED line\u202eevil"
CONTROLS = ("\x1b", "\x07", "\r", "\u202e")
# Seconds past 9999-12-31, the last instant protobuf's Timestamp allows.
OUT_OF_RANGE = 253402300800 * 10

Handler = Callable[[Any, grpc.ServicerContext], Any]


def _hostile(
    key: bytes, cert: bytes, handlers: dict[str, dict[str, Handler]]
) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                f"pinrpc.v1.{service}",
                {
                    name: grpc.unary_unary_rpc_method_handler(
                        fn, response_serializer=lambda m: m.SerializeToString()
                    )
                    for name, fn in methods.items()
                },
            )
            for service, methods in handlers.items()
        ]
    )
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    return server, port


Serve = Callable[[dict[str, dict[str, Handler]]], list[str]]


@pytest.fixture
def hostile(devca: ServerFiles, make_client: MakeClient) -> Iterator[Serve]:
    """Start a hostile server with these handlers; returns the CLI's connection flags."""
    me = make_client("me")
    started: list[grpc.Server] = []

    def serve(handlers: dict[str, dict[str, Handler]]) -> list[str]:
        server, port = _hostile(devca.key.read_bytes(), devca.cert.read_bytes(), handlers)
        started.append(server)
        return flags(port, devca, me)

    yield serve
    for server in started:
        server.stop(None)


def flags(port: int, devca: ServerFiles, me: KeyPairFiles) -> list[str]:
    return ["--server", f"127.0.0.1:{port}", "--cert", str(me.cert_path),
            "--key", str(me.key_path), "--ca", str(devca.ca_path),
            "--server-name", SERVER_NAME, "--timeout", "5"]  # fmt: skip


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = client_cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_inert(text: str) -> None:
    assert not any(c in text for c in CONTROLS), repr(text)
    assert "FORGED" not in text or "\\r\\nFORGED" in text or "\\nFORGED" in text, repr(text)


def evil_client(**times: int) -> admin_pb2.Client:
    client = admin_pb2.Client(name=EVIL, fingerprint=EVIL, subject=EVIL, allowed_methods=[EVIL])
    client.not_after.FromDatetime(dt.datetime(9999, 12, 31, tzinfo=dt.UTC))
    for field, seconds in times.items():
        getattr(client, field).seconds = seconds
    return client


def test_shown_escapes_what_a_terminal_acts_on() -> None:
    assert shown(EVIL) == "ok\\x1b]0;pwned\\x07\\x1b[31mRED\\r\\nFORGED line\\u202eevil"
    assert shown("plain text, ümlaut, 名前") == "plain text, ümlaut, 名前"  # allowed as it is
    assert shown("a\tb\nc", keep="\n") == "a\\tb\nc"


def test_admin_list_prints_one_line_per_client_whatever_it_holds(
    hostile: Serve, capsys: pytest.CaptureFixture[str]
) -> None:
    two = admin_pb2.ListResponse(clients=[evil_client(), admin_pb2.Client(name="plain")])
    argv = hostile({"Admin": {"List": lambda req, ctx: two}})
    code, out, err = cli(["admin", "list", *argv], capsys)
    assert code == Exit.OK, err
    assert_inert(out)
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(shown(EVIL)), out
    assert lines[1].startswith("plain  "), out
    # --json keeps the text whole and valid: JSON's own escapes carry it.
    code, out, err = cli(["admin", "list", "--json", *argv], capsys)
    assert code == Exit.OK, err
    assert_inert(out)
    assert [c["name"] for c in json.loads(out)] == [EVIL, "plain"]


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_admin_list_with_an_impossible_timestamp_is_one_line(
    hostile: Serve, capsys: pytest.CaptureFixture[str], json_flag: list[str]
) -> None:
    bad = admin_pb2.ListResponse(clients=[evil_client(revoked_at=OUT_OF_RANGE)])
    argv = hostile({"Admin": {"List": lambda req, ctx: bad}})
    code, out, err = cli(["admin", "list", *json_flag, *argv], capsys)
    assert code == Exit.RPC, err
    assert out == "" and err.count("\n") == 1, err
    assert "the server answered with an invalid" in err and "Traceback" not in err, err
    # Beside it: the last instant protobuf allows is printed.
    last = admin_pb2.ListResponse(clients=[evil_client(revoked_at=OUT_OF_RANGE // 10 - 1)])
    argv = hostile({"Admin": {"List": lambda req, ctx: last}})
    code, out, err = cli(["admin", "list", *json_flag, *argv], capsys)
    assert code == Exit.OK and "9999-12-31" in out, err


def test_status_details_cannot_drive_the_terminal(
    hostile: Serve, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(req: Any, ctx: grpc.ServicerContext) -> None:
        ctx.abort(grpc.StatusCode.PERMISSION_DENIED, EVIL)

    def answer(req: Any, ctx: grpc.ServicerContext) -> echo_pb2.WhoAmIResponse:
        return echo_pb2.WhoAmIResponse(name=EVIL, fingerprint=EVIL, allowed_methods=[EVIL])

    argv = hostile({"Echo": {"WhoAmI": refuse}, "Admin": {"Get": refuse}})
    for command in (["whoami"], ["admin", "get", "x"]):
        code, out, err = cli([*command, *argv], capsys)
        assert code == Exit.DENIED, err
        assert not any(c in out + err for c in CONTROLS), err
        assert "ok\\x1b]0;pwned" in err, err  # what the server said, readable
    code, out, err = cli(["whoami", *hostile({"Echo": {"WhoAmI": answer}})], capsys)
    assert code == Exit.OK and not any(c in out + err for c in CONTROLS), out
    code, out, err = cli(["whoami", "--json", *hostile({"Echo": {"WhoAmI": answer}})], capsys)
    assert code == Exit.OK and json.loads(out)["name"] == EVIL, out


def test_the_real_program_writes_no_control_character(hostile: Serve, devca: ServerFiles) -> None:
    """The console script, in its own process: what reaches the terminal byte for byte."""
    listing = admin_pb2.ListResponse(clients=[evil_client()])
    argv = hostile({"Admin": {"List": lambda req, ctx: listing}})
    done = subprocess.run(
        [sys.executable, "-m", "client.cli", "admin", "list", *argv],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert not any(c.encode() in done.stdout for c in CONTROLS), done.stdout
    assert done.stdout.count(b"\n") == 1, done.stdout


def _ticket(expires: int) -> Handler:
    """Request's answer: a ticket for the caller's own certificate, expiring at ``expires``."""

    def request(req: Any, ctx: grpc.ServicerContext) -> enrollment_pb2.EnrollmentTicket:
        raw = enrollment_pb2.EnrollmentRequest.FromString(req) if isinstance(req, bytes) else req
        mine = Fingerprint.of(x509.load_pem_x509_certificate(raw.certificate_pem.encode()))
        ticket = enrollment_pb2.EnrollmentTicket(fingerprint=str(mine))
        ticket.expires_at.seconds = expires
        return ticket

    return request


def _challenge(nonce: bytes) -> Handler:
    return lambda req, ctx: enrollment_pb2.ChallengeResponse(nonce=nonce)


@pytest.mark.parametrize("expires", [OUT_OF_RANGE, -(10**12)])
def test_request_enrollment_with_an_impossible_expiry_is_one_line(
    hostile: Serve, capsys: pytest.CaptureFixture[str], expires: int
) -> None:
    bad = {"Enrollment": {"Challenge": _challenge(b"n" * 32), "Request": _ticket(expires)}}
    code, out, err = cli(["request-enrollment", "--name", "me", *hostile(bad)], capsys)
    assert code == Exit.RPC and err.count("\n") == 1, err
    assert "invalid expiry" in err and "Traceback" not in err, err
    # Beside it: a sane expiry, and an absurd nonce (empty, 1 MiB) signed all the same.
    for nonce in (b"", b"\0" * (1 << 20)):
        good = {"Enrollment": {"Challenge": _challenge(nonce), "Request": _ticket(2 * 10**9)}}
        code, out, err = cli(["request-enrollment", "--name", "me", *hostile(good)], capsys)
        assert code == Exit.OK and "waits until  2033-05-18" in out, err


def test_request_enrollment_refusal_is_one_inert_line(
    hostile: Serve, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(req: Any, ctx: grpc.ServicerContext) -> None:
        ctx.abort(grpc.StatusCode.INVALID_ARGUMENT, EVIL)

    argv = hostile({"Enrollment": {"Challenge": refuse}})
    code, _out, err = cli(["request-enrollment", "--name", "me", *argv], capsys)
    assert code == Exit.ERROR and err.count("\n") == 1, err
    assert_inert(err)


def test_an_enrollment_port_whose_registry_failed_is_not_called_unreachable(
    enrolling: RunningServer,  # noqa: F811 (the fixture imported above)
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert enrolling.enrollment_port is not None
    port, carol = enrolling.enrollment_port, make_client("carol")
    argv = ["request-enrollment", "--name", "carol", *flags(port, devca, carol)]
    registry.rename(registry.with_name("moved.db"))
    code, out, err = cli(argv, capsys)
    assert code == Exit.RPC and out == "" and err.count("\n") == 1, err
    assert "answered, but the server could not take the request" in err, err
    assert "is gone (deleted or moved)" in err and "check the address" not in err, err
    # Nor does a stranger read where the server keeps its registry.
    assert "[location withheld]" in err and str(registry.parent) not in err, err
    # Beside it: nothing listening is still the address's problem.
    closed = [*argv]
    closed[closed.index("--server") + 1] = "127.0.0.1:1"
    code, _out, err = cli(closed, capsys)
    assert code == Exit.CONNECT and "cannot reach the enrollment port" in err, err


@pytest.mark.parametrize(
    "common_name", ["evil\x1b]0;pwned\x07\r\nok       FORGED\u202e", "My Server"]
)
def test_doctor_shows_a_hostile_certificate_inertly(
    devca: ServerFiles, capsys: pytest.CaptureFixture[str], common_name: str
) -> None:
    """Any server, before it is verified: doctor prints its certificate's names. A CN without
    a SAN that is no host name ("My Server") was a traceback; it is a failed step."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = make_cert(key, common_name, ca=None, days=1)
    server, port = _hostile(key_to_pem(key), cert_to_pem(cert), {})
    try:
        argv = ["doctor", "--server", f"127.0.0.1:{port}", "--ca", str(devca.ca_path),
                "--server-name", SERVER_NAME, "--timeout", "5"]  # fmt: skip
        code, out, err = cli(argv, capsys)
    finally:
        server.stop(None)
    assert code == Exit.CONNECT, out + err
    assert not any(c in out + err for c in CONTROLS), out
    assert not any(line.startswith("ok       FORGED") for line in out.splitlines()), out
    chain = next(line for line in out.splitlines() if line.startswith("FAILED   server chain"))
    assert "names no host a client can verify (CN:" in chain, out


@pytest.mark.parametrize("far", [True, False])
def test_a_rotate_answer_cannot_keep_the_old_key_past_its_certificate(
    hostile: Serve, devca: ServerFiles, capsys: pytest.CaptureFixture[str], far: bool
) -> None:
    """An end of 9999 for the old pair kept its private key on disk until then; it is recorded
    as the old certificate's own end, past which no server admits it. The allow twin: an end
    an hour away is recorded as the server said."""
    soon = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(hours=1)
    end = dt.datetime(9999, 12, 31, tzinfo=dt.UTC) if far else soon

    def whoami(req: Any, ctx: grpc.ServicerContext) -> echo_pb2.WhoAmIResponse:
        return echo_pb2.WhoAmIResponse(name="me")

    def rotate(req: Any, ctx: grpc.ServicerContext) -> identity_pb2.RotateResponse:
        answer = identity_pb2.RotateResponse(client=evil_client(), previous=evil_client())
        answer.previous.retire_at.FromDatetime(end)
        return answer

    argv = hostile({"Echo": {"WhoAmI": whoami}, "Identity": {"Rotate": rotate}})
    me = Path(argv[argv.index("--cert") + 1])
    own_end = x509.load_pem_x509_certificate(me.read_bytes()).not_valid_after_utc
    code, out, err = cli(["rotate", *argv], capsys)
    assert code == Exit.OK, err
    expected = own_end if far else soon
    recorded = dt.datetime.fromisoformat(me.with_name(me.name + ".old-until").read_text().strip())
    assert recorded == expected, (recorded, expected)
    assert f"works until {expected:%Y-%m-%d %H:%M} UTC" in out, out


def test_a_rotate_answer_with_an_impossible_end_still_swaps_the_pair_in(
    hostile: Serve, devca: ServerFiles, make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The server said yes (it trusts the new pair from now on) but its answer is garbage: the
    pair is swapped in all the same, and what is printed is computed here, not taken from it."""

    def whoami(req: Any, ctx: grpc.ServicerContext) -> echo_pb2.WhoAmIResponse:
        return echo_pb2.WhoAmIResponse(name="me")

    def rotate(req: Any, ctx: grpc.ServicerContext) -> identity_pb2.RotateResponse:
        answer = identity_pb2.RotateResponse(client=evil_client(), previous=evil_client())
        answer.previous.retire_at.seconds = OUT_OF_RANGE
        return answer

    argv = hostile({"Echo": {"WhoAmI": whoami}, "Identity": {"Rotate": rotate}})
    me = Path(argv[argv.index("--cert") + 1])
    old = Fingerprint.of(x509.load_pem_x509_certificate(me.read_bytes()))
    code, out, err = cli(["rotate", *argv], capsys)
    assert code == Exit.OK, err
    assert "Traceback" not in err and not any(c in out + err for c in CONTROLS), out + err
    new = Fingerprint.of(x509.load_pem_x509_certificate(me.read_bytes()))
    assert new != old and not me.with_name(me.name + ".new").exists()
    assert f"new fingerprint  {new}" in out and f"old fingerprint  {old}" in out, out
    assert "until unknown: the server answered with an invalid" in out, out
    assert len([line for line in out.splitlines() if "FORGED" in line]) <= 1, out
