"""`pinrpc rotate` and `pinrpc keygen` killed (SIGKILL: no cleanup runs) at each step of
replacing a pair: the next pinrpc call finishes or undoes it, and nothing the server accepted
is lost. Overlap 0 throughout: once the server said yes, only the new pair gets in."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from client import cli
from client.keyfiles import new, old
from pinrpc.channel import load_pair
from pinrpc.cli import Exit
from pinrpc.identity import Fingerprint, KeyPairFiles, load_certificate
from tests.conftest import Connect, MakeClient
from tests.security.attacker import BIN
from tests.test_client_cli import run


def killed_at(point: str, argv: list[str], sig: signal.Signals = signal.SIGKILL) -> str:
    """Run the real CLI until it reaches the test-only pause ``point``, then send ``sig``
    (SIGKILL: no cleanup runs); what it printed on stderr after that."""
    env = {**os.environ, "PINRPC_TEST_PAUSE_AT": point}
    proc = subprocess.Popen(
        [str(BIN / "pinrpc"), *argv], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env=env,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # EOF if the process ends without pausing
        assert line == f"paused at {point}\n", line + proc.stderr.read()
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        return proc.stderr.read()
    finally:
        proc.kill()
        proc.wait(timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()


def journal(cert: Path) -> Path:  # spelled out here: the test also runs against older code
    return cert.with_name(cert.name + ".swap")


def swap_moves(files: KeyPairFiles) -> list[tuple[Path, Path]]:
    """The swap's renames, in its order: a kill can fall between any two."""
    key, cert = files.key_path, files.cert_path
    return [(key, old(key)), (new(key), key), (cert, old(cert)), (new(cert), cert)]


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def assert_new_pair_in_place(files: KeyPairFiles, fingerprint: str) -> None:
    certificate, _ = load_pair(files.cert_path, files.key_path)  # raises on a mismatch
    assert str(Fingerprint.of(certificate)) == fingerprint
    assert mode(files.key_path) == 0o600 and mode(old(files.key_path)) == 0o600
    assert not any(os.path.lexists(p) for p in (new(files.cert_path), new(files.key_path)))
    assert not os.path.lexists(journal(files.cert_path))
    leftovers = [p.name for p in files.cert_path.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize("renames_done", range(5))
def test_a_rotate_killed_during_its_swap_is_finished_by_the_next_call(
    connect: Connect,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
    renames_done: int,
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    flags = connect.cli_flags(alice)
    killed_at("swap", ["rotate", *flags, "--overlap", "0"])  # the server has said yes
    staged = str(Fingerprint.of(load_certificate(new(alice.cert_path))))
    for source, target in swap_moves(alice)[:renames_done]:
        os.replace(source, target)
    connect.server.trust.poll()
    code, out, err = run(["whoami", *flags], capsys)
    assert code == Exit.OK, err
    assert err.count("\n") == 1 and "finished an interrupted rotation" in err
    assert f"fingerprint  {staged}" in out
    assert_new_pair_in_place(alice, staged)
    assert alice.cert_path.with_name("alice.crt.old-until").exists()
    # The old pair was retired at once: the new one is all that gets in, and it was kept.
    retired = KeyPairFiles(old(alice.key_path), old(alice.cert_path), alice.fingerprint)
    code, _, _ = run(["whoami", *connect.cli_flags(retired)], capsys)
    assert code == Exit.CONNECT


@pytest.mark.parametrize("command", ["whoami", "rotate"])
def test_a_pair_half_swapped_by_older_pinrpc_is_finished(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """The reported defect: killed between the two renames, the new key beside the old
    certificate. Every call failed, and rotate's advice named a *.new key that was gone."""
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    flags = connect.cli_flags(alice)
    code, _, err = run(["rotate", *flags, "--overlap", "0"], capsys)
    assert code == Exit.OK, err
    enrolled = str(Fingerprint.of(load_certificate(alice.cert_path)))
    # Back to the moment between the two renames, with older pinrpc's in-progress marker.
    os.replace(alice.cert_path, new(alice.cert_path))
    os.replace(old(alice.cert_path), alice.cert_path)
    until = alice.cert_path.with_name("alice.crt.old-until")
    os.replace(until, new(until))
    connect.server.trust.poll()
    code, out, err = run([command, *flags], capsys)
    assert code == Exit.OK, err
    assert "finished an interrupted rotation" in err and "Traceback" not in err
    if command == "whoami":
        assert f"fingerprint  {enrolled}" in out
        assert_new_pair_in_place(alice, enrolled)
    else:  # and then rotated again, from the pair the server had enrolled
        assert "rotated alice" in out
        assert str(Fingerprint.of(load_certificate(old(alice.cert_path)))) == enrolled
        connect.server.trust.poll()
        assert run(["whoami", *flags], capsys)[0] == Exit.OK


def test_a_rotate_killed_while_staging_is_undone_by_the_next_rotate(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """Staging writes the key first and asks the server only once both files are whole: a
    lone *.new key never reached the server. The next rotate named a *.new certificate that
    did not exist and refused to run."""
    alice, spare = make_client("alice"), make_client("spare")
    connect.enroll(alice, "alice")
    os.link(spare.key_path, new(alice.key_path))
    leftover = alice.key_path.with_name(".alice.key.new.0123abcd.tmp")  # write_all's temp
    leftover.write_bytes(spare.key_path.read_bytes())
    before = alice.cert_path.read_bytes()
    code, out, err = run(["rotate", *connect.cli_flags(alice), "--overlap", "0"], capsys)
    assert code == Exit.OK, err
    assert f"removed {new(alice.key_path)}" in err and "rotated alice" in out
    assert old(alice.cert_path).read_bytes() == before and not leftover.exists()
    connect.server.trust.poll()
    assert run(["whoami", *connect.cli_flags(alice)], capsys)[0] == Exit.OK


@pytest.mark.parametrize("renames_done", range(3))
def test_a_keygen_force_killed_mid_way_leaves_one_whole_pair(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], renames_done: int
) -> None:
    keys = tmp_path / "keys"
    assert cli.main(["keygen", "alice", "--dir", str(keys)]) == Exit.OK
    files = KeyPairFiles(keys / "alice.key", keys / "alice.crt", Fingerprint(b"\0" * 32))
    killed_at("keygen", ["keygen", "alice", "--dir", str(keys), "--force"])
    staged = str(Fingerprint.of(load_certificate(new(files.cert_path))))
    for source, target in [(new(files.key_path), files.key_path),
                           (new(files.cert_path), files.cert_path)][:renames_done]:  # fmt: skip
        os.replace(source, target)
    code, _, err = run(["keygen", "alice", "--dir", str(keys)], capsys)
    assert code == Exit.ERROR and "already exists" in err
    assert "finished an interrupted keygen" in err
    certificate, _ = load_pair(files.cert_path, files.key_path)
    assert str(Fingerprint.of(certificate)) == staged and mode(files.key_path) == 0o600
    assert sorted(p.name for p in keys.iterdir()) == ["alice.crt", "alice.key"]


def test_a_first_keygen_killed_before_its_pair_was_whole_starts_afresh(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Killed after the key was placed, before the certificate: the key alone, and a second
    keygen refused (it exists). Now the journal says a keygen was under way."""
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / "alice.crt.swap").write_text("keygen")
    (keys / "alice.key.new").write_bytes(b"half")
    code, out, err = run(["keygen", "alice", "--dir", str(keys)], capsys)
    assert code == Exit.OK, err
    assert "removed" in err and "private key" in out
    load_pair(keys / "alice.crt", keys / "alice.key")
    assert sorted(p.name for p in keys.iterdir()) == ["alice.crt", "alice.key"]


@pytest.mark.parametrize("planted", ["alice.crt.swap", "alice.crt.new"])
def test_a_symlink_planted_at_a_staged_path_redirects_nothing(
    connect: Connect,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    planted: str,
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (alice.cert_path.parent / planted).symlink_to(victim)
    before = (alice.cert_path.read_bytes(), alice.key_path.read_bytes())
    code, _, err = run(["rotate", *connect.cli_flags(alice)], capsys)
    assert code == Exit.ERROR and err.count("\n") == 1 and planted in err
    assert victim.read_bytes() == b"untouched"
    assert (alice.cert_path.read_bytes(), alice.key_path.read_bytes()) == before


def test_a_symlink_planted_at_the_staged_key_is_removed_not_followed(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    new(alice.key_path).symlink_to(victim)
    code, _, err = run(["rotate", *connect.cli_flags(alice)], capsys)
    assert code == Exit.OK, err
    assert victim.read_bytes() == b"untouched"
    assert mode(alice.key_path) == 0o600 and not alice.key_path.is_symlink()


def test_two_calls_recovering_at_once_leave_one_whole_pair(
    connect: Connect, make_client: MakeClient
) -> None:
    """Two services starting together after the crash: both finish the swap, neither moves
    the new pair aside as the old one."""
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    flags = connect.cli_flags(alice)
    killed_at("swap", ["rotate", *flags, "--overlap", "0"])
    staged = str(Fingerprint.of(load_certificate(new(alice.cert_path))))
    connect.server.trust.poll()
    argv = [str(BIN / "pinrpc"), "whoami", *flags]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    results = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [Exit.OK, Exit.OK], results
    assert sum("finished an interrupted rotation" in err for _, err in results) == 1
    assert_new_pair_in_place(alice, staged)


def test_ctrl_c_during_the_swap_leaves_it_to_the_next_call(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C after the server said yes: the moves are put back, the journal stays, and the
    message says the next call finishes it (not to move files by hand)."""
    alice = make_client("alice")
    connect.enroll(alice, "alice")
    flags = connect.cli_flags(alice)
    err = killed_at("swap", ["rotate", *flags, "--overlap", "0"], signal.SIGINT)
    assert "the next `pinrpc` call with" in err and "Traceback" not in err
    staged = str(Fingerprint.of(load_certificate(new(alice.cert_path))))
    connect.server.trust.poll()
    code, _, err = run(["whoami", *flags], capsys)
    assert code == Exit.OK and "finished an interrupted rotation" in err
    assert_new_pair_in_place(alice, staged)
