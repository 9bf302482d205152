"""tests/ports.py's free_port on machines whose ephemeral range is not Linux's default."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests import ports


def _range_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    """The range as /proc gives it (tab-separated), in a file free_port reads instead."""
    path = tmp_path / "ip_local_port_range"
    path.write_text(text)
    monkeypatch.setattr(ports, "_RANGE", path)


def _listen(port: int) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()


def test_the_default_range_gives_a_port_below_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _range_file(tmp_path, monkeypatch, "32768\t60999\n")
    port = ports.free_port()
    assert 20768 <= port < 32768
    _listen(port)


@pytest.mark.parametrize("text", ["1024\t60999\n", "500\t60000\n"])
def test_a_range_starting_low_gives_a_port_above_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    """No room below 1024's start: it was random.choice() of an empty range, an IndexError
    in every test that needs a port (containers often set 1024-65535)."""
    _range_file(tmp_path, monkeypatch, text)
    port = ports.free_port()
    assert int(text.split()[1]) < port <= 65535
    _listen(port)


def test_a_range_spanning_every_port_leaves_the_kernel_to_pick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _range_file(tmp_path, monkeypatch, "1024\t65535\n")
    _listen(ports.free_port())


def test_ports_picked_before_any_is_bound_are_distinct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pebble takes four ports before it binds one: a random pick could repeat one (here, 10
    picks from 10 ports repeated one in all but 0.04 % of runs), and pebble would not start."""
    _range_file(tmp_path, monkeypatch, "1034\t60999\n")
    monkeypatch.setattr(ports, "_GIVEN", set(), raising=False)
    assert sorted(ports.free_port() for _ in range(10)) == list(range(1024, 1034))
