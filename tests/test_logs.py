"""server/logs.py: what --log-level and --log-format make of pinrpc's records."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from server.audit import Audit
from server.logs import configure_logging
from server.stderr_helper import MARK


@pytest.fixture
def restored() -> Iterator[None]:
    """configure_logging changes process-wide loggers: put them back."""
    root, audit = logging.getLogger(), logging.getLogger("pinrpc.audit")
    saved = root.handlers[:], root.level, audit.level
    yield
    root.handlers[:], level, audit_level = saved
    root.setLevel(level)
    audit.setLevel(audit_level)


@pytest.mark.parametrize("level", ["WARNING", "ERROR"])
def test_the_audit_trail_stays_on_whatever_the_log_level(restored: None, level: str) -> None:
    """Before, --log-level WARNING or ERROR turned it off: its records are INFO."""
    out = io.StringIO()
    configure_logging(level, "json", out)
    logging.getLogger("pinrpc.server").info("a note")  # quieted, as asked
    logging.getLogger("pinrpc.server").error("a failure")
    audit = Audit()
    audit.event("revoke", client="bob")
    audit.flush()
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r.get("message", r.get("event")) for r in records] == ["a failure", "revoke"]


def test_a_text_records_further_lines_are_marked(restored: None) -> None:
    """Only a record's first line starts with a timestamp, as on stderr_helper's fd 2."""
    out = io.StringIO()
    configure_logging("INFO", "text", out)
    forged = "2026-11-30 10:00:00,000 INFO pinrpc.audit: {}"
    logging.getLogger("pinrpc.server").warning("ignoring %s", f"name\n{forged}")
    first, second = out.getvalue().splitlines()
    assert first.endswith(" WARNING pinrpc.server: ignoring name")
    assert second == MARK.decode() + forged
