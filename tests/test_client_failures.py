"""How `pinrpc` fails: the cause it names, its exit code, one line for bad input, no traceback."""

from __future__ import annotations

import pytest

from client import cli
from pinrpc.cli import Exit
from tests.conftest import MakeClient
from tests.test_client_cli import run


@pytest.mark.parametrize(
    "argv",
    [
        ["fingerprint", ""],
        ["whoami", "--server", "127.0.0.1:1", "--cert", "", "--key", "k"],
        ["whoami", "--server", "127.0.0.1:1", "--cert", "c", "--key", ""],
        ["echo", "hi", "--server", "127.0.0.1:1", "--cert", "c", "--key", "k", "--ca", ""],
        ["doctor", "--server", "127.0.0.1:1", "--cert", "", "--key", "k"],
        [
            "admin",
            "enroll",
            "",
            "--name",
            "x",
            "--server",
            "127.0.0.1:1",
            "--cert",
            "c",
            "--key",
            "k",
        ],
    ],
)
def test_an_empty_file_name_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Not "cannot read certificate /current/dir: Is a directory" (exit 1)."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == Exit.USAGE
    assert "must not be empty" in capsys.readouterr().err


def test_a_file_name_that_is_not_utf8_still_works(
    make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """The allow next to the deny above: any non-empty name is a file name."""
    alice = make_client("alice")
    odd = alice.cert_path.with_name("caf\udce9.crt")  # the byte 0xE9: Latin-1, not UTF-8
    odd.write_bytes(alice.cert_path.read_bytes())
    code, out, _ = run(["fingerprint", str(odd)], capsys)
    assert (code, out) == (Exit.OK, f"{alice.fingerprint}\n")
