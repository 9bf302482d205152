"""A review of the client: no private key leaves the machine, no silent refusals, and no
traceback when the output cannot be written."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import subprocess
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest

from client import cli as client_cli
from client.keyfiles import new, old
from pinrpc.channel import client_credentials, secure_channel
from pinrpc.cli import Exit
from pinrpc.errors import IdentityError
from pinrpc.identity import cert_to_pem, create_identity, load_certificate
from pinrpc.v1 import echo_pb2, echo_pb2_grpc
from server.enrollment import check_certificate
from server.registry_model import Client
from server.registry_sqlite import SqliteRegistry
from tests.certs import make_cert, p256, write_pair
from tests.conftest import SERVER_NAME, Connect, MakeClient, registry_dump, whoami
from tests.test_client_cli import usage_error
from tests.test_lifecycle import ADMIN, run
from tests.test_rotate import pair_bytes, registry_write_locked
from tests.test_scripts import BIN

ENROLL_CALL = "/pinrpc.v1.Admin/Enroll"


def test_admin_enroll_sends_no_private_key(
    connect: Connect,
    make_client: MakeClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A key file named by mistake (tab completion picks bob.key as readily as bob.crt), or a
    PEM holding the key with the certificate, was sent to the server whole, which then said
    "never share the key"."""
    root, bob = make_client("root"), make_client("bob")
    connect.enroll(root, "root", ADMIN)
    combined = tmp_path / "bob.pem"
    combined.write_bytes(bob.key_path.read_bytes() + bob.cert_path.read_bytes())
    flags = connect.cli_flags(root)
    before = registry_dump(connect.server_registry, capsys)
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        for mistake in (bob.key_path, combined):
            argv = ["admin", "enroll", str(mistake), "--name", "bob", *flags]
            code, _, err = run(argv, capsys)
            assert code == Exit.ERROR
            assert err == (
                f"pinrpc: error: {mistake} contains a private key; give the certificate (.crt) "
                "instead, and never share the key\n"
            )
        connect.server.audit.flush()
    # Refused here: the server saw no Enroll call at all, so nothing of the key reached it.
    assert not [r for r in caplog.records if ENROLL_CALL in r.getMessage()]
    assert registry_dump(connect.server_registry, capsys) == before


def test_admin_enroll_sends_the_certificate_out_of_a_described_file(
    connect: Connect,
    make_client: MakeClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The allow beside the deny above: text around the PEM block (as `openssl x509 -text`
    prints it) is no reason to refuse, and what is enrolled is exactly that certificate."""
    root, bob = make_client("root"), make_client("bob")
    connect.enroll(root, "root", ADMIN)
    described = tmp_path / "bob-described.pem"
    described.write_bytes(b"Certificate:\n    Subject: CN=bob\n" + bob.cert_path.read_bytes())
    argv = ["admin", "enroll", str(described), "--name", "bob", *connect.cli_flags(root)]
    code, out, err = run(argv, capsys)
    assert code == Exit.OK, err
    assert out.startswith(f"bob  {bob.fingerprint}  active")


def pair_dated(tmp_path: Path, name: str, start: dt.datetime, days: float) -> tuple[Path, Path]:
    key = p256()
    cert = make_cert(key, name, key_cert_sign=False, not_before=start, days=days)
    return write_pair(tmp_path, name, key, cert)


@pytest.mark.parametrize(("shift", "says"), [(-10, "EXPIRED on"), (10, "is not valid before")])
def test_the_library_refuses_its_own_certificate_outside_its_dates(
    connect: Connect, tmp_path: Path, shift: int, says: str
) -> None:
    """README's secure_channel() took such a certificate without a word, and every call then
    failed with UNAVAILABLE "Socket closed" (the server refuses it at the handshake)."""
    start = dt.datetime.now(dt.UTC) + dt.timedelta(days=shift)
    cert, key = pair_dated(tmp_path, "dated", start, days=5)
    planted = check_certificate(cert_to_pem(load_certificate(cert)), "dated", now=start)
    connect.plant(planted, "dated")  # enrolled: only its dates stand in the way
    ca = connect.devca.ca_path
    for make in (
        lambda: secure_channel(connect.target, cert, key, ca, SERVER_NAME),
        lambda: client_credentials(cert, key, ca),  # what grpc.aio callers use
    ):
        with pytest.raises(IdentityError) as refused:
            make()
        assert str(refused.value).startswith(f"client certificate {says} ")
        assert f"({cert.absolute()})" in str(refused.value)
        assert ("pinrpc keygen" if shift < 0 else "clock") in str(refused.value)


def test_the_library_admits_a_certificate_inside_its_dates_from_sync_and_aio(
    connect: Connect, tmp_path: Path
) -> None:
    """The allow beside the deny above: one that started a minute ago and ends within the
    hour is used, by secure_channel() and by grpc.aio with client_credentials()."""
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    cert, key = pair_dated(tmp_path, "brief", start, days=1 / 24)
    connect.plant(check_certificate(cert_to_pem(load_certificate(cert)), "brief"), "brief")
    ca = connect.devca.ca_path
    with secure_channel(connect.target, cert, key, ca, SERVER_NAME) as channel:
        assert whoami(echo_pb2_grpc.EchoStub(channel)).name == "brief"

    async def aio() -> str:
        creds, _ = client_credentials(cert, key, ca)
        override = [("grpc.ssl_target_name_override", SERVER_NAME)]
        async with grpc.aio.secure_channel(connect.target, creds, options=override) as channel:
            reply = await echo_pb2_grpc.EchoStub(channel).WhoAmI(
                echo_pb2.WhoAmIRequest(), timeout=5
            )
            return reply.name

    assert asyncio.run(aio()) == "brief"


def output_commands(tmp_path: Path, cert: Path) -> list[list[str]]:
    keys = tmp_path / "keys-out"
    return [
        ["pinrpc", "fingerprint", str(cert)],
        ["pinrpc", "keygen", "bob", "--dir", str(keys)],
        ["pinrpc", "--version"],
        ["pinrpc-server", "--version"],  # the same run() as every command of both programs
    ]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_output_that_cannot_be_written_is_one_line_not_a_traceback(
    tmp_path: Path, make_client: MakeClient
) -> None:
    """`> out.json` on a full disk: print() raised OSError (ENOSPC) out of every command, a
    traceback; /dev/full fails every write the same way."""
    alice = make_client("alice")
    with Path("/dev/full").open("w") as full:
        for program, *argv in output_commands(tmp_path, alice.cert_path):
            done = subprocess.run(
                [str(BIN / program), *argv], stdout=full, stderr=subprocess.PIPE, text=True,
                timeout=30, check=False,
            )  # fmt: skip
            assert (done.returncode, done.stderr) == (
                Exit.ERROR,
                f"{program}: error: cannot write the output: No space left on device\n",
            )
    # keygen wrote the pair before it printed: it is there, and the key is the owner's alone.
    assert (tmp_path / "keys-out" / "bob.key").stat().st_mode & 0o777 == 0o600


def test_output_that_can_be_written_is_unchanged(tmp_path: Path, make_client: MakeClient) -> None:
    """The allow beside the deny above: the same commands into a pipe print and exit 0."""
    alice = make_client("alice")
    for program, *argv in output_commands(tmp_path, alice.cert_path):
        done = subprocess.run(
            [str(BIN / program), *argv], capture_output=True, text=True, timeout=30, check=False
        )
        assert (done.returncode, done.stderr.count("Traceback")) == (Exit.OK, 0), done.stderr
        assert done.stdout
    assert str(alice.fingerprint) in subprocess.run(
        [str(BIN / "pinrpc"), "fingerprint", str(alice.cert_path)],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip


def test_keygen_over_an_existing_pair_says_force_deletes_it_and_points_at_rotate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The refusal said the old pair "stops working once the server enrolls the new one",
    yet --force deletes it at once: a user renewing an enrolled pair locked themselves out
    until the operator acted, where `pinrpc rotate` needs no one."""
    first = create_identity("alice", tmp_path)
    before = first.key_path.read_bytes()
    capsys.readouterr()
    assert client_cli.main(["keygen", "alice", "--dir", str(tmp_path)]) == Exit.ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run `pinrpc rotate`" in err
    assert "--force deletes the old pair now" in err
    assert first.key_path.read_bytes() == before  # refused: nothing changed
    # The allow: --force does what the sentence says.
    assert client_cli.main(["keygen", "alice", "--dir", str(tmp_path), "--force"]) == Exit.OK
    assert first.key_path.read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alice.crt", "alice.key"]


def test_a_bad_value_from_the_environment_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """argparse named only the flag ("argument --server: not HOST:PORT ... 'localhost'")
    when the value came from PINRPC_SERVER, a flag the user never typed."""
    pair = ["--cert", "a.crt", "--key", "a.key"]
    monkeypatch.setenv("PINRPC_SERVER", "localhost")
    monkeypatch.setenv("PINRPC_TIMEOUT", "0")
    line = usage_error(["whoami", *pair], capsys)
    assert line.endswith("'localhost' (e.g. api.example.com:8443, [::1]:8443) (from PINRPC_SERVER)")
    monkeypatch.delenv("PINRPC_SERVER")
    line = usage_error(["whoami", "--server", "x:1", *pair], capsys)
    assert line.endswith("must be at least 0.001, got 0 (from PINRPC_TIMEOUT)")
    # A bad value typed as the flag is the flag's, even with the variable set (to a good one).
    monkeypatch.setenv("PINRPC_SERVER", "api.example.com:8443")
    line = usage_error(["whoami", "--server", "localhost", "--timeout", "5", *pair], capsys)
    assert line.endswith("'localhost' (e.g. api.example.com:8443, [::1]:8443)")


def test_a_second_rotate_while_one_runs_says_so_and_changes_nothing(
    connect: Connect,
    make_client: MakeClient,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two rotates of one pair at once (two cron jobs, say): the second found the first's
    staged *.new pair and called it "an earlier rotation whose outcome was unknown", telling
    the user to move it into place by hand while the first was about to swap it in."""
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    before = pair_bytes(alice)
    released, deciding = threading.Event(), threading.Event()
    real_rotate = SqliteRegistry.rotate

    def spied_rotate(self: SqliteRegistry, *args: Any) -> list[Client]:
        deciding.set()  # the first rotate's call is in: it waits for the registry lock
        return real_rotate(self, *args)

    monkeypatch.setattr(SqliteRegistry, "rotate", spied_rotate)
    flags = connect.cli_flags(alice)
    with registry_write_locked(connect.server_registry, released.is_set):
        argv = [str(BIN / "pinrpc"), "rotate", *flags, "--timeout", "20"]
        first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert deciding.wait(15), "the server never received the first Rotate call"
            code, _, err = run(["rotate", *flags], capsys)
        finally:
            released.set()
            out, first_err = first.communicate(timeout=20)
    assert (code, err.count("\n")) == (Exit.ERROR, 1)
    assert f"another `pinrpc rotate` of {alice.cert_path} is running" in err
    assert "outcome was unknown" not in err and "mv " not in err
    # The first one was left alone: it finished, and its pair is the one in place.
    assert first.returncode == Exit.OK, first_err
    assert pair_bytes(alice) != before and old(alice.key_path).read_bytes() == before[1]
    assert not new(alice.cert_path).exists() and not new(alice.key_path).exists()
    code, out, _ = run(["whoami", *flags], capsys)
    assert code == Exit.OK and "name         alice" in out
    # The allow: with the first done, a rotate runs.
    code, out, err = run(["rotate", *flags], capsys)
    assert code == Exit.OK, err
