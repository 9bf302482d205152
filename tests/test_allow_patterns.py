"""--allow patterns are bounded in count and length: they are kept with every identity and
written whole in the audit's enroll line (one of 1.1 MB once silenced the server's log; one
over 16 KiB is split by collectors such as Docker's log drivers)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from client import cli as client_cli
from server import cli as server_cli
from server.enrollment import MAX_PATTERN_LENGTH, MAX_PATTERNS, MAX_PATTERNS_TOTAL
from tests.conftest import Connect, MakeClient, enroll, registry_dump


def patterns(count: int, length: int = MAX_PATTERN_LENGTH, fill: str = "a") -> list[str]:
    return [f"/p{i:04d}/".ljust(length, fill) for i in range(count)]


# As many as allowed (100 of 40 characters), and as long as allowed (16 of 256).
MOST = patterns(MAX_PATTERNS, MAX_PATTERNS_TOTAL // MAX_PATTERNS)
LONGEST = patterns(MAX_PATTERNS_TOTAL // MAX_PATTERN_LENGTH)


def allow_flags(allowed: list[str]) -> list[str]:
    return [f"--allow={pattern}" for pattern in allowed]


@pytest.mark.parametrize(
    ("allowed", "expected"),
    [
        (patterns(MAX_PATTERNS + 1), "101 method patterns: at most 100"),
        (patterns(1, MAX_PATTERN_LENGTH + 1), "is 257 characters long: at most 256"),
        (patterns(17), "method patterns of 4352 characters in all: at most 4096"),
    ],
)
def test_enroll_refuses_too_many_or_too_long_patterns(
    allowed: list[str],
    expected: str,
    registry: Path,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    enroll(registry, make_client("alice").cert_path, "alice")
    before = registry_dump(registry, capsys)
    carol = str(make_client("carol").cert_path)
    argv = ["enroll", carol, "--name", "carol", *allow_flags(allowed), "--registry", str(registry)]
    assert server_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("pinrpc-server: error: ") and err.count("\n") == 1, err
    assert expected in err
    assert registry_dump(registry, capsys) == before


def test_enroll_takes_as_many_patterns_as_long_as_allowed(
    registry: Path, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    enroll(registry, make_client("carol").cert_path, "carol", *MOST)
    enroll(registry, make_client("dave").cert_path, "dave", *LONGEST)
    clients = registry_dump(registry, capsys)
    assert isinstance(clients, list)
    assert [c["allowed_methods"] for c in clients] == [MOST, LONGEST]


def test_the_longest_enroll_audit_line_stays_under_16_kib(
    connect: Connect, make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    """Patterns of JSON's escaped characters, as many as allowed: each doubles when written."""
    escaped = patterns(MAX_PATTERNS_TOTAL // MAX_PATTERN_LENGTH, fill='"')
    with caplog.at_level(logging.INFO, logger="pinrpc.audit"):
        connect.enroll(make_client("carol"), "carol", *escaped)
        connect.server.audit.flush()
    (line,) = [r.getMessage() for r in caplog.records if '"event": "enroll"' in r.getMessage()]
    assert json.loads(line)["allowed_methods"] == escaped
    assert len(line.encode()) > 2 * MAX_PATTERNS_TOTAL  # the escapes: the worst case
    assert len(line.encode()) < 16 * 1024


def test_remote_enroll_has_the_same_bounds(
    connect: Connect, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """How the 1.1 MB were enrolled: through the Admin API."""
    root, carol, dave = make_client("root"), make_client("carol"), make_client("dave")
    connect.enroll(root, "root", "/pinrpc.v1.Admin/*")
    flags = connect.cli_flags(root)

    def admin_enroll(files: Path, name: str, allowed: list[str]) -> tuple[int, str]:
        capsys.readouterr()
        code = client_cli.main(["admin", "enroll", str(files), "--name", name,
                                *allow_flags(allowed), *flags])  # fmt: skip
        return code, capsys.readouterr().err

    code, err = admin_enroll(carol.cert_path, "carol", patterns(MAX_PATTERNS + 1))
    assert code == 1 and err.count("\n") == 1  # bad input, one line
    assert "the server refused: 101 method patterns: at most 100" in err
    assert admin_enroll(carol.cert_path, "carol", MOST) == (0, "")
    code, err = admin_enroll(dave.cert_path, "dave", patterns(1, MAX_PATTERN_LENGTH + 1))
    assert code == 1 and "is 257 characters long: at most 256" in err


@pytest.mark.parametrize(
    "pattern", ["/x\nbob  00:11  active  /pinrpc.v1.Admin/*", "/\x1b[31mred", "/a b", "/é", ""]
)
def test_patterns_no_method_name_matches_are_refused(
    pattern: str, registry: Path, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """A newline in a pattern wrote a forged client line into `pinrpc-server list`."""
    enroll(registry, make_client("alice").cert_path, "alice")
    before = registry_dump(registry, capsys)
    carol = str(make_client("carol").cert_path)
    argv = ["enroll", carol, "--name", "carol", f"--allow={pattern}", "--registry", str(registry)]
    assert server_cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("pinrpc-server: error: method pattern ") and err.count("\n") == 1, err
    assert registry_dump(registry, capsys) == before


def test_patterns_with_every_glob_character_are_taken(
    registry: Path, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    allowed = ["*", "/pinrpc.v1.Echo/*", "/a.B_c-9/[!X]?", "/p/~{}|^`@#$%&'()+,;<=>\"\\"]
    enroll(registry, make_client("carol").cert_path, "carol", *allowed)
    clients = registry_dump(registry, capsys)
    assert isinstance(clients, list)
    assert [c["allowed_methods"] for c in clients] == [allowed]
