"""Mistakes a new operator made on a first day with the installed wheel, against real servers."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from client import cli as client_cli
from pinrpc.cli import Exit
from server.app import start_server
from tests.conftest import Connect, MakeClient, ServerFiles, enroll
from tests.test_doctor import doctor, status
from tests.test_handover import handover_config


@pytest.mark.parametrize("exists", [True, False], ids=["directory", "missing-directory"])
def test_a_warm_start_file_that_cannot_be_saved_is_said_at_start(
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    exists: bool,
) -> None:
    # Before, `--warm-start state/warm` with no state/ started silently; the first word came a
    # minute later or at stop, naming a temporary file, and no restart was ever warm.
    alice = make_client("alice")
    enroll(registry, alice.cert_path, "alice")
    state = tmp_path / "state"
    if exists:
        state.mkdir()
    config = replace(handover_config(registry, devca.cert, devca.key), warm_start=state / "warm")
    with caplog.at_level(logging.WARNING), start_server(config):
        said = [r.getMessage() for r in caplog.records if "warm-start" in r.getMessage()]
    expected = f"the warm-start file {state / 'warm'} cannot be saved: {state} is not a directory"
    assert said == ([] if exists else [expected])


@pytest.fixture
def two_ports(
    devca: ServerFiles, registry: Path, make_client: MakeClient
) -> Iterator[tuple[list[str], list[str]]]:
    """An enrolled client's CLI flags for the server's --listen port, and the same flags
    pointed at its --enrollment-listen port, while the server runs."""
    alice = make_client("alice")
    enroll(registry, alice.cert_path, "alice")
    config = replace(
        handover_config(registry, devca.cert, devca.key), enrollment_listen="127.0.0.1:0"
    )
    with start_server(config) as running:
        flags = Connect(running, devca).cli_flags(alice)
        wrong = list(flags)
        wrong[flags.index("--server") + 1] = f"127.0.0.1:{running.enrollment_port}"
        yield flags, wrong


def test_doctor_on_the_enrollment_port_says_which_port_to_dial(
    two_ports: tuple[list[str], list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: "FAILED whoami UNIMPLEMENTED: Method not found!", exit 3 (a connection failure),
    # and a fix that pointed at the steps above, which had all passed.
    right, wrong = two_ports
    code, steps = doctor(right, capsys)
    assert code == Exit.OK, steps
    code, steps = doctor(wrong, capsys)
    assert code == Exit.RPC
    assert status(steps["client accepted"]) == "ok"
    assert status(steps["whoami"]) == "FAILED"
    assert "UNIMPLEMENTED" in steps["whoami"]
    assert "dial the server's --listen port" in steps["whoami"]


def test_whoami_on_the_enrollment_port_says_which_port_to_dial(
    two_ports: tuple[list[str], list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    # Before: only "call failed: UNIMPLEMENTED: Method not found!", with no word on why.
    right, wrong = two_ports
    capsys.readouterr()
    assert client_cli.main(["whoami", *right]) == Exit.OK
    assert "dial the server" not in capsys.readouterr().err
    assert client_cli.main(["whoami", *wrong]) == Exit.RPC
    err = capsys.readouterr().err.splitlines()
    server = wrong[wrong.index("--server") + 1]
    assert err[0].endswith("call failed: UNIMPLEMENTED: Method not found!"), err
    assert err[1:] == [f"  {server} does not serve this call: dial the server's --listen port"]
