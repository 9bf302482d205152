"""A hostile server (holding the server's certificate) against `pinrpc admin list`'s text lines.

Names are padded to the longest in a page. A pinrpc server's names are at most 64 characters,
but one answer of 2 MiB can carry a name of a megabyte: padded to it, every other line of the
page became a megabyte too, a thousand-fold of what the server sent, held in memory and
printed, for every page.
"""

from __future__ import annotations

import pytest

from pinrpc.cli import Exit
from pinrpc.v1 import admin_pb2
from tests.security.test_hostile_server import Serve, assert_inert, cli, hostile  # noqa: F401

LONG = 200_000  # characters in the hostile name
SHORT = 300  # clients with a one-letter name on the same page


def test_a_long_name_does_not_pad_every_line_of_the_page(
    hostile: Serve,  # noqa: F811 (the fixture)
    capsys: pytest.CaptureFixture[str],
) -> None:
    page = admin_pb2.ListResponse(
        clients=[admin_pb2.Client(name="x" * LONG)]
        + [admin_pb2.Client(name=f"c{i}") for i in range(SHORT)]
    )
    sent = page.ByteSize()
    argv = hostile({"Admin": {"List": lambda req, ctx: page}})
    code, out, err = cli(["admin", "list", *argv], capsys)
    assert code == Exit.OK, err
    assert_inert(out)
    lines = out.splitlines()
    assert len(lines) == SHORT + 1, len(lines)
    assert len(out) < 2 * sent, f"{len(out)} characters printed for a {sent}-byte answer"
    assert lines[1].startswith("c0  "), lines[1][:80]
