"""server.handshakes: the credential fetcher's count, its hand-over slot, claims and expiry."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from server.handshakes import NEW_CONNECTION_WINDOW, SLOT_KEY, Handshakes, fetcher


def python_frames(call: Callable[[], object]) -> list[str]:
    """The Python functions that run inside ``call`` (C functions are not listed)."""
    names: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            names.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return names


def test_the_fetcher_hands_a_configuration_over_once_and_counts_every_call() -> None:
    hs, slot = Handshakes(), dict[str, Any]()
    fetch = hs.fetcher(slot)
    assert [fetch(), fetch()] == [None, None] and hs.total() == 2
    slot[SLOT_KEY] = "new"
    assert [fetch(), fetch()] == ["new", None] and hs.total() == 4
    assert slot == {}
    other = fetcher({SLOT_KEY: "x"})  # server-only TLS: handed over, not counted
    assert [other(), other()] == ["x", None] and hs.total() == 4


def test_the_fetcher_runs_no_python() -> None:
    """The point of the module: a Python-level fetcher costs 3-5 % per new connection."""
    fetch = Handshakes().fetcher({SLOT_KEY: "config"})
    assert python_frames(fetch) == []
    assert python_frames(lambda: None) == ["<lambda>"]  # the probe does see Python frames


def test_a_handshake_is_pending_until_claimed_and_claims_never_run_ahead() -> None:
    hs = Handshakes()
    fetch = hs.fetcher({})
    assert not hs.pending()
    fetch(), fetch()
    assert hs.pending()
    hs.claim()
    assert hs.pending()
    hs.claim()
    assert not hs.pending()
    hs.claim()  # a first call with no handshake left (one that raced another claim)
    fetch()
    assert hs.pending()  # the extra claim did not swallow the next handshake


def test_handshakes_older_than_the_window_expire_and_newer_ones_stay() -> None:
    hs = Handshakes()
    fetch = hs.fetcher({})
    fetch()
    hs.expire(now=100.0)  # the watcher's poll: one handshake before this mark
    fetch()
    hs.expire(now=100.0 + NEW_CONNECTION_WINDOW - 0.1)
    hs.claim()  # claims the oldest
    assert hs.pending()
    hs.expire(now=100.0 + NEW_CONNECTION_WINDOW)  # the first mark is now a window old
    assert hs.pending()  # the second handshake came after it
    hs.expire(now=100.0 + 2 * NEW_CONNECTION_WINDOW)
    assert not hs.pending()
    assert hs.total() == 2
