"""A rotation whose outcome is unknown (both staged files, no journal): the next `pinrpc`
call asks the server with each pair and settles it, losing no pair the server admits; and
the library refuses a pair that an interrupted swap left half-way."""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import socket
import threading
import time
from pathlib import Path

import grpc
import pytest

from client.keyfiles import new, old
from pinrpc.channel import secure_channel
from pinrpc.cli import Exit
from pinrpc.errors import IdentityError
from pinrpc.identity import Fingerprint, KeyPairFiles, load_certificate
from pinrpc.v1 import echo_pb2, echo_pb2_grpc
from tests.conftest import SERVER_NAME, Connect, MakeClient
from tests.test_client_cli import run
from tests.test_rotate_crash import assert_new_pair_in_place, journal, killed_at, swap_moves


def until(files: KeyPairFiles) -> Path:
    return files.cert_path.with_name(files.cert_path.name + ".old-until")


def fingerprint(cert: Path) -> str:
    return str(Fingerprint.of(load_certificate(cert)))


def staged_bytes(files: KeyPairFiles) -> tuple[bytes, ...]:
    paths = (files.cert_path, files.key_path, new(files.cert_path), new(files.key_path))
    return tuple(path.read_bytes() for path in paths)


def enrolled_but_unjournaled(connect: Connect, files: KeyPairFiles, *overlap: str) -> str:
    """Killed after the server's yes, before the journal: the staged pair's fingerprint."""
    killed_at("swap", ["rotate", *connect.cli_flags(files), *overlap])
    journal(files.cert_path).unlink()  # as if killed a moment earlier
    connect.server.trust.poll()
    return fingerprint(new(files.cert_path))


def never_sent(files: KeyPairFiles, spare: KeyPairFiles, age: float) -> None:
    """A staged pair the server never saw (the answer lost before the call arrived), staged
    ``age`` seconds ago."""
    os.replace(spare.cert_path, new(files.cert_path))
    os.replace(spare.key_path, new(files.key_path))
    staged = time.time() - age
    for path in (new(files.cert_path), new(files.key_path)):
        os.utime(path, (staged, staged))


@pytest.mark.parametrize("command", ["whoami", "rotate"])
def test_a_pair_the_server_admits_is_swapped_in(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """Overlap 0: the server retired the old pair with its yes. Before, every call failed
    with a warning and rotate refused: locked out until a human moved files."""
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    flags = connect.cli_flags(alice)
    staged = enrolled_but_unjournaled(connect, alice, "--overlap", "0")
    code, out, err = run([command, *flags], capsys)
    assert code == Exit.OK, err
    assert err.count("\n") == 1 and "settled" in err and "no longer admitted" in err
    assert_new_pair_in_place(alice, staged)
    assert fingerprint(old(alice.cert_path)) == str(alice.fingerprint)
    assert until(alice).read_text()[:4].isdigit()  # ended: the next rotate deletes *.old
    if command == "whoami":
        assert f"fingerprint  {staged}" in out
    else:  # that rotation happened: no second one
        assert "rotated" not in out
    code, out, err = run(["whoami", *flags], capsys)
    assert code == Exit.OK and err == "" and f"fingerprint  {staged}" in out
    # Deny: the old pair, kept as *.old, is refused, so the swap was the only way back in.
    retired = KeyPairFiles(old(alice.key_path), old(alice.cert_path), alice.fingerprint)
    assert run(["whoami", *connect.cli_flags(retired)], capsys)[0] == Exit.CONNECT


def test_a_pair_in_its_overlap_is_kept_until_the_end_the_server_says(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """The end comes from WhoAmI asked with the old pair (tests/test_whoami_ends.py); before,
    it was recorded as unknown."""
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    staged = enrolled_but_unjournaled(connect, alice)  # the server's 24 h overlap
    code, _, err = run(["whoami", *connect.cli_flags(alice)], capsys)
    assert code == Exit.OK and "settled" in err and "(admitted until " in err, err
    assert_new_pair_in_place(alice, staged)
    left = dt.datetime.fromisoformat(until(alice).read_text()) - dt.datetime.now(dt.UTC)
    assert dt.timedelta(hours=23) < left <= dt.timedelta(hours=24)
    # The old pair still gets in, and its files were kept: nothing the server admits is lost.
    retired = KeyPairFiles(old(alice.key_path), old(alice.cert_path), alice.fingerprint)
    code, out, _ = run(["whoami", *connect.cli_flags(retired)], capsys)
    assert code == Exit.OK and f"fingerprint  {alice.fingerprint}" in out
    # An end not yet reached never deletes it; the next rotate replaces it, as documented.
    code, _, err = run(["rotate", *connect.cli_flags(alice)], capsys)
    assert code == Exit.OK, err
    assert fingerprint(old(alice.cert_path)) == staged


@pytest.mark.parametrize("command", ["whoami", "rotate"])
def test_a_pair_the_server_never_saw_is_removed(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    alice, spare = make_client("alice"), make_client("spare")
    connect.enroll(alice, "alice")
    never_sent(alice, spare, age=600)
    code, out, err = run([command, *connect.cli_flags(alice)], capsys)
    assert code == Exit.OK, err
    assert "rotation never happened" in err and f"removed {new(alice.cert_path)}" in err
    assert not os.path.lexists(new(alice.cert_path)) and not os.path.lexists(new(alice.key_path))
    if command == "rotate":  # and then the rotation asked for ran
        assert "rotated alice" in out
        assert fingerprint(old(alice.cert_path)) == str(alice.fingerprint)
    else:
        assert f"fingerprint  {alice.fingerprint}" in out


def test_a_refused_pair_staged_moments_ago_is_kept(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """Deny beside the removal: the server may still be deciding a rotation it received a
    moment ago (its registry busy); removing the pair then would lose what it enrolls next."""
    alice, spare = make_client("alice"), make_client("spare")
    connect.enroll(alice, "alice")
    never_sent(alice, spare, age=5)
    before = staged_bytes(alice)
    code, _, err = run(["rotate", *connect.cli_flags(alice)], capsys)
    assert code == Exit.ERROR and err.count("\n") == 1 and "may still be deciding" in err
    assert staged_bytes(alice) == before
    code, out, err = run(["whoami", *connect.cli_flags(alice)], capsys)  # goes on, warned
    assert code == Exit.OK and "warning: " in err and f"fingerprint  {alice.fingerprint}" in out
    assert staged_bytes(alice) == before


def test_a_pair_admitted_under_another_name_is_not_swapped_in(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    alice, bob = make_client("alice"), make_client("bob")
    connect.enroll(alice, "alice")
    connect.enroll(bob, "bob")
    never_sent(alice, bob, age=600)
    before = staged_bytes(alice)
    code, _, err = run(["rotate", *connect.cli_flags(alice)], capsys)
    assert code == Exit.ERROR and err.count("\n") == 1
    assert "as 'bob', not as 'alice'" in err and "nothing changed" in err
    assert staged_bytes(alice) == before


def test_an_unreachable_server_changes_nothing(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    alice, spare = make_client("alice"), make_client("spare")
    connect.enroll(alice, "alice")
    never_sent(alice, spare, age=600)
    before = staged_bytes(alice)
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    flags = connect.cli_flags(alice)
    flags[flags.index("--server") + 1] = f"127.0.0.1:{port}"
    code, _, err = run(["rotate", *flags, "--timeout", "2"], capsys)
    assert code == Exit.CONNECT and err.count("\n") == 1
    assert "cannot tell" in err and "nothing changed" in err
    assert staged_bytes(alice) == before


def library_channel(connect: Connect, files: KeyPairFiles) -> grpc.Channel:
    return secure_channel(
        connect.target, files.cert_path, files.key_path, connect.devca.ca_path, SERVER_NAME
    )


@pytest.mark.parametrize("renames_done", [0, 1, 3])
def test_the_library_refuses_a_half_swapped_pair_and_names_the_fix(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str],
    renames_done: int,
) -> None:  # fmt: skip
    """A service starting after a killed swap: it got the old pair (the server retired it at
    the yes: every call UNAVAILABLE, "Socket closed") or a bare key/certificate mismatch.
    The library renames nothing (a service may only read the files): it says what fixes it."""
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    killed_at("swap", ["rotate", *connect.cli_flags(alice), "--overlap", "0"])
    staged = fingerprint(new(alice.cert_path))
    for source, target in swap_moves(alice)[:renames_done]:
        os.replace(source, target)
    connect.server.trust.poll()
    names = sorted(path.name for path in alice.cert_path.parent.iterdir())
    with pytest.raises(IdentityError) as refused:
        library_channel(connect, alice)
    message = str(refused.value)
    assert "interrupted" in message and "\n" not in message
    assert f"pinrpc whoami --server HOST:PORT --cert {alice.cert_path}" in message
    assert sorted(path.name for path in alice.cert_path.parent.iterdir()) == names
    # The command it names finishes the swap; then the library gets in with the new pair.
    assert run(["whoami", *connect.cli_flags(alice)], capsys)[0] == Exit.OK
    with library_channel(connect, alice) as channel:
        me = echo_pb2_grpc.EchoStub(channel).WhoAmI(echo_pb2.WhoAmIRequest(), timeout=10)
    assert me.fingerprint == staged


def test_the_library_waits_for_a_live_swap_instead_of_refusing_it(
    connect: Connect, make_client: MakeClient
) -> None:
    """A swap holds the directory's lock for its milliseconds, journal and all: a service
    starting meanwhile waits for it rather than calling a healthy rotation interrupted."""
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    fd = os.open(alice.cert_path.parent, os.O_RDONLY | os.O_DIRECTORY)
    results: list[object] = []
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        journal(alice.cert_path).write_text("2030-01-01T00:00:00+00:00")
        caller = threading.Thread(target=lambda: results.append(library_channel(connect, alice)))
        caller.start()
        time.sleep(0.3)
        assert results == [] and caller.is_alive()  # waiting, not refused
        journal(alice.cert_path).unlink()  # the swap is done
    finally:
        os.close(fd)
    caller.join(10)
    assert len(results) == 1 and isinstance(results[0], grpc.Channel)
    results[0].close()
