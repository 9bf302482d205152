"""What the docs promise about `pinrpc-server`'s flags: bounds, help texts, and a server that
keeps applying revocations with any value its flags accept."""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from pinrpc import secure_channel
from pinrpc.cli import env_name
from pinrpc.v1 import echo_pb2_grpc
from server import cli as server_cli
from server.app import start_server
from server.config import ServerConfig
from tests.conftest import (
    ECHO_ALL,
    SERVER_NAME,
    MakeClient,
    ServerFiles,
    admitted,
    enroll,
    eventually,
    revoke,
)

SERVE = ["serve", "--cert", "c.pem", "--key", "k.pem", "--registry", "r.db"]
LIST = ["list", "--registry", "r.db"]
# (flag, the command line it belongs to): the README gives every --*warn-days 0 to 36500.
WARN_FLAGS = [("--cert-warn-days", SERVE), ("--client-warn-days", SERVE), ("--warn-days", LIST)]


@pytest.mark.parametrize(("flag", "command"), WARN_FLAGS)
@pytest.mark.parametrize("value", ["36501", "99999999999"])
@pytest.mark.parametrize("source", ["flag", "env"])
def test_warn_days_beyond_a_century_are_a_usage_error(
    flag: str,
    command: list[str],
    value: str,
    source: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # 99999999999 client days stopped the trust watcher's thread at its first check
    # (OverflowError in the date arithmetic): no revocation applied after that.
    argv = [*command, flag, value] if source == "flag" else command
    if source == "env":
        monkeypatch.setenv(env_name(flag), value)
    with pytest.raises(SystemExit) as info:
        server_cli.build_parser().parse_args(argv)
    assert info.value.code == 2
    assert f"argument {flag}: must be at most 36500, got {value}" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "command"), WARN_FLAGS)
def test_warn_days_up_to_a_century_are_taken(flag: str, command: list[str]) -> None:
    args = server_cli.build_parser().parse_args([*command, flag, "36500"])
    assert getattr(args, flag.lstrip("-").replace("-", "_")) == 36500


def test_the_largest_client_warn_days_still_lets_revocations_apply(
    devca: ServerFiles, registry: Path, make_client: MakeClient
) -> None:
    files = make_client("alice")
    enroll(registry, files.cert_path, "alice", ECHO_ALL)
    config = ServerConfig(
        listen="127.0.0.1:0",
        cert=devca.cert,
        key=devca.key,
        registry=str(registry),
        client_warn_days=36500,  # every client is "expiring": the watcher logs it, and goes on
        poll_interval=0.1,
        grace=1.0,
    )
    with start_server(config) as running:
        target = f"127.0.0.1:{running.port}"
        channel = secure_channel(
            target, files.cert_path, files.key_path, devca.ca_path, SERVER_NAME
        )
        stub = echo_pb2_grpc.EchoStub(channel)
        assert admitted(stub)
        revoke(registry, "alice")
        # Only the server's own watcher thread applies it here: nothing polls on its behalf.
        eventually(lambda: not admitted(stub), timeout=3.0)
        channel.close()


REGISTRY_COMMANDS = [
    ["list"],
    ["pending"],
    ["migrate"],
    ["revoke", "x"],
    ["enroll", "CERT", "--name", "q"],
    ["serve", "--cert", "c.pem", "--key", "k.pem", "--listen", "127.0.0.1:0"],
]


@pytest.mark.parametrize("kind", ["fifo", "directory"])
@pytest.mark.parametrize("command", REGISTRY_COMMANDS, ids=lambda c: c[0])
def test_a_registry_that_is_not_a_regular_file_is_one_line(
    tmp_path: Path, make_client: MakeClient, kind: str, command: list[str]
) -> None:
    # `list` and `pending` waited forever on a FIFO; the others said "disk I/O error".
    # A subprocess, so that the old behaviour fails within the timeout instead of hanging.
    where = tmp_path / "registry.db"
    if kind == "fifo":
        os.mkfifo(where)
    else:
        where.mkdir()
    cert = str(make_client("q").cert_path)
    argv = [cert if a == "CERT" else a for a in command]
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", *argv, "--registry", str(where)],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip

    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        f"pinrpc-server: error: registry {where} is not a regular file; check --registry\n"
    )
    assert stat.S_ISFIFO(where.stat().st_mode) if kind == "fifo" else list(where.iterdir()) == []


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


@pytest.mark.parametrize("command", sorted(_subcommands(server_cli.build_parser())))
def test_every_argument_of_every_command_says_what_it_is(command: str) -> None:
    sub = _subcommands(server_cli.build_parser())[command]
    silent = [a.dest for a in sub._actions if not a.help]
    assert not silent, f"pinrpc-server {command} --help explains nothing for {silent}"
