"""docs/OPERATIONS.md's table of `pinrpc-server serve` flags is the parser's, row for row:
every flag, its environment variable and its default, so neither drifts from the other."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest

from pinrpc.cli import env_name
from server import cli as server_cli

OPERATIONS = Path(__file__).resolve().parent.parent / "docs" / "OPERATIONS.md"
ROW = re.compile(r"^\| `(--[a-z-]+)` \| (`PINRPC_[A-Z_]+`|-) \| (`[^`]*`|required|off) \|")


def _documented() -> dict[str, tuple[str, str]]:
    text = OPERATIONS.read_text(encoding="utf-8")
    section = text.split("### `pinrpc-server serve`", 1)[1].split("\n### ", 1)[0]
    rows = (ROW.match(line) for line in section.splitlines())
    return {m[1]: (m[2].strip("`"), m[3].strip("`")) for m in rows if m}


def _serve(monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    for name in list(os.environ):
        if name.startswith("PINRPC_"):
            monkeypatch.delenv(name)  # the defaults, not this shell's settings
    commands = next(
        a for a in server_cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    serve: argparse.ArgumentParser = commands.choices["serve"]
    return serve


def _actual(action: argparse.Action) -> tuple[str, str]:
    flag = action.option_strings[0]
    if isinstance(action, argparse._StoreTrueAction):
        return "-", "off"
    default = "required" if action.required else "off" if action.default is None else action.default
    return env_name(flag), str(default)


def test_the_serve_table_is_the_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    actions = [a for a in _serve(monkeypatch)._actions if a.option_strings[0] != "-h"]
    assert _documented() == {a.option_strings[0]: _actual(a) for a in actions}


def test_the_ports_table_has_every_listener(monkeypatch: pytest.MonkeyPatch) -> None:
    # The enrollment port was missing here: an operator opening firewall ports from this
    # table would not have known it exists.
    section = OPERATIONS.read_text(encoding="utf-8").split("## Ports", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| [^|]* \| `(--[a-z-]+)`", section, re.MULTILINE))
    listeners = {
        a.option_strings[0]
        for a in _serve(monkeypatch)._actions
        if a.option_strings[0].endswith("-listen")
    }
    assert "--listen" in listeners
    assert listeners <= documented
