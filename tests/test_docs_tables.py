"""docs/OPERATIONS.md's tables are the parsers': the `serve` table row for row (every flag, its
variable and its default), the others name every flag with its variable, the client table's
defaults are the parser's, and the docs' lists of switches and always-allowed methods are the
code's, so neither drifts from the other."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from client import cli as client_cli
from pinrpc.cli import env_name
from server import cli as server_cli
from server.auth import ALWAYS_ALLOWED

OPERATIONS = Path(__file__).resolve().parent.parent / "docs" / "OPERATIONS.md"
FLAG = re.compile(r"--[a-z][a-z-]*")
VARIABLE = re.compile(r"PINRPC_[A-Z_]+")
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


def _options(
    parser: argparse.ArgumentParser, path: str = ""
) -> Iterator[tuple[str, argparse.Action]]:
    """(subcommand path, action) for every option of every subcommand, nested ones included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{path} {name}".strip())
        elif action.option_strings:
            yield path, action


def _table(heading: str) -> list[list[str]]:
    """The cells of each body row of the table under ``heading`` in OPERATIONS.md."""
    text = OPERATIONS.read_text(encoding="utf-8")
    section = text.split(heading, 1)[1].split("\n#", 1)[0]
    lines = (line.strip("| ") for line in section.splitlines() if line.startswith("| "))
    rows = [[cell.strip() for cell in line.split(" | ")] for line in lines]
    return rows[1:]  # not the header


@pytest.mark.parametrize(
    ("heading", "parser"),
    [
        ("### `pinrpc` (the client)", client_cli.build_parser),
        ("### `pinrpc-server enroll | list | permit | revoke | copy-registry`", None),
    ],
    ids=["pinrpc", "pinrpc-server"],
)
def test_every_flag_of_every_command_has_a_row_naming_its_variable(
    heading: str,
    parser: Callable[[], argparse.ArgumentParser] | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The serve table is checked whole above; these two tables only ever listed some flags
    # (`pinrpc doctor`'s, the admin ones), so a flag or its variable could go unmentioned.
    _serve(monkeypatch)  # clears this shell's PINRPC_* so the defaults are the parser's
    rows = [(set(FLAG.findall(r[0])), set(VARIABLE.findall(r[1]))) for r in _table(heading)]
    build = parser or server_cli.build_parser
    missing = set()
    for path, action in _options(build()):
        flag = action.option_strings[0]
        if action.nargs == 0 or path.startswith("serve"):  # switches have no variable
            continue
        if not any(flag in flags and env_name(flag) in names for flags, names in rows):
            missing.add((path, flag, env_name(flag)))
    assert not missing, f"{heading} has no row for {sorted(missing)}"


def test_the_client_tables_defaults_are_the_parsers(monkeypatch: pytest.MonkeyPatch) -> None:
    _serve(monkeypatch)
    options = [(p, a) for p, a in _options(client_cli.build_parser()) if a.nargs != 0]
    wrong = []
    for first, _variable, default, *_ in _table("### `pinrpc` (the client)"):
        flags, values = FLAG.findall(first), re.findall(r"`([^`]*)`", default)
        if not re.fullmatch(r"`[^`]*`(, `[^`]*`)*", default) or len(values) != len(flags):
            continue  # no default given ("-", "required", the server's own)
        command = first.split()[0].strip("`") if not first.startswith("`--") else ""
        for flag, value in zip(flags, values, strict=True):
            for path, action in options:
                same = action.option_strings[0] == flag and path.startswith(command)
                if same and str(action.default) != value:
                    wrong.append((path, flag, value, action.default))
    assert not wrong, f"(command, flag, documented, actual): {wrong}"


def test_the_ports_section_names_every_method_an_enrolled_client_may_always_call() -> None:
    # It named WhoAmI, health and reflection but not Rotate, which `grpcurl list` shows to a
    # client allowed nothing (pinrpc.v1.Identity).
    section = OPERATIONS.read_text(encoding="utf-8").split("## Ports", 1)[1].split("\n## ", 1)[0]
    text = " ".join(section.split())
    for method in ALWAYS_ALLOWED:
        service, name = method.strip("/").split("/")
        if ".reflection." not in service:  # named by its service (v1alpha: all grpcio serves)
            assert service in text and f"/{name}" in text, method
    assert "grpc.reflection.v1alpha.ServerReflection" in text


def test_the_docs_list_every_switch_as_having_no_variable() -> None:
    # Both lists of switches (flags without a value, hence without a variable) are the parsers'.
    switches = {
        action.option_strings[0]
        for build in (client_cli.build_parser, server_cli.build_parser)
        for _path, action in _options(build())
        if isinstance(action, argparse._StoreTrueAction)
    }
    readme = (OPERATIONS.parent.parent / "README.md").read_text(encoding="utf-8")
    for text in (readme, OPERATIONS.read_text(encoding="utf-8")):
        listed = re.search(r"Switches \(([^)]*)\)", " ".join(text.split()))
        assert listed is not None
        assert set(FLAG.findall(listed[1])) == switches
