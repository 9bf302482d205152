"""Every test the docs cite exists where they say, so "proved by" never names a test that was
renamed, moved or never written (docs/SECURITY.md's threat table above all)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# `tests/x.py`, `tests/x.py::test_y`, `x.py::test_y` (a file named earlier in full) or `test_y`.
CITATION = re.compile(r"`((?:tests/[\w/]+\.py|test_\w+\.py)(?:::(\w+))?|test_\w+)`")


def _tests_in(path: Path) -> set[str]:
    return set(re.findall(r"^\s*(?:async )?def (test_\w+)\(", path.read_text(), re.M))


def _file(cited: str) -> Path | None:
    """``tests/a/b.py`` as is; a bare ``b.py`` by its name, if exactly one test file has it."""
    if "/" in cited:
        return ROOT / cited if (ROOT / cited).is_file() else None
    found = list((ROOT / "tests").rglob(cited))
    return found[0] if len(found) == 1 else None


def _missing(text: str, everywhere: set[str]) -> list[str]:
    """Citations in ``text`` that do not resolve. A bare test name must be in the file cited
    last before it (SECURITY.md's cells name the file once), or in any test file if none was."""
    missing, current = [], None
    for match in CITATION.finditer(text):
        cited, name = match[1], match[2]
        if cited.endswith(".py") or name:
            current = _file(cited.split("::")[0])
            if current is None or (name and name not in _tests_in(current)):
                missing.append(cited)
        elif cited not in (_tests_in(current) if current else everywhere):
            where = current.relative_to(ROOT) if current else "tests/"
            missing.append(f"{cited} (looked in {where})")
    return missing


def _all_tests() -> set[str]:
    return set().union(*(_tests_in(p) for p in (ROOT / "tests").rglob("test_*.py")))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_cited_test_exists(doc: Path) -> None:
    everywhere = _all_tests()
    # One paragraph or table row at a time: a file named in one does not cover the next.
    blocks = re.split(r"\n\s*\n|\n(?=\|)", doc.read_text(encoding="utf-8"))
    missing = [m for block in blocks for m in _missing(block, everywhere)]
    assert not missing, f"{doc.name} cites tests that do not exist: {missing}"


def test_a_misplaced_or_invented_citation_is_caught() -> None:
    everywhere = _all_tests()
    assert _missing("`tests/test_server.py::test_no_such_test`", everywhere)
    assert _missing("`tests/no_such_file.py`", everywhere)
    # Exists, but in another file than the one the cell named.
    assert _missing(
        "`tests/test_server.py`, `test_one_host_cannot_fill_the_pending_list`", everywhere
    )
    assert not _missing(
        "`tests/test_enroll_review.py`, `test_one_host_cannot_fill_the_pending_list`", everywhere
    )
