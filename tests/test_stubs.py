"""The committed stubs in pinrpc/v1 are exactly what scripts/gen-protos makes from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "gen-protos")],
        env={"OUT": str(tmp_path), "PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        check=True,
        capture_output=True,
    )
    fresh = sorted(p.relative_to(tmp_path) for p in (tmp_path / "pinrpc" / "v1").iterdir())
    committed = sorted(
        p.relative_to(ROOT) for p in (ROOT / "pinrpc" / "v1").iterdir() if p.is_file()
    )
    assert fresh == committed
    for rel in fresh:
        assert (tmp_path / rel).read_text() == (ROOT / rel).read_text(), f"{rel} is stale"
