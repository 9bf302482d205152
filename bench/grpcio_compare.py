"""scripts/bench --grpcio-python PY: the scale sweep on the project's grpcio and on another one.

Made for a grpcio built with bench/store_patch/sorted-insert.patch (recipe in
docs/PERFORMANCE.md): PY is the interpreter of the virtualenv it is installed in. Each round
runs the sweep's own measure_size (bench/sweep.py) at every size, for --tls-reload inline and
handover, first under this interpreter, then under PY. Each pass is a child process of that
interpreter, so the servers it starts (with sys.executable) use that interpreter's grpcio.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.report import save

REPO = Path(__file__).resolve().parent.parent
SIZES = (1, 10000)
QUICK_SIZES = (1, 100)
ROUNDS = 2
KINDS = ("pinrpc", "handover")
CAP = 40.0  # as the full sweep's: the longest wait for a new enrollment to become usable
PASS_TIMEOUT = 900.0  # one child: at N=10,000 as released, about a minute per kind
FIGURES = {
    "startup_s": "start-up s",
    "enroll_commit_to_first_call_s": "enrollment usable, from the registry commit s",
    "max_connect_wait_enroll_s": "longest new-connection wait during the enrollment's rebuild s",
    "revoke_to_refusal_s": "revocation reaches an open channel, from CLI launch s",
    "probe_failures": "failed prober connections",
    "rss_mb_started": "server RSS after start-up MB",
}
PROBE = "import grpc; print(grpc.__version__, grpc._cython.cygrpc.__file__)"


def one_pass(sizes: list[int]) -> None:
    """In the child: every kind and size once, one JSON row per line on stdout."""
    from bench.fixtures import filler_candidates, server_files
    from bench.sweep import measure_size, serve_argv

    work = Path(tempfile.mkdtemp(prefix="pinrpc-grpcio-compare-"))
    try:
        files = server_files(work)
        fillers = filler_candidates(max(sizes))
        for kind in KINDS:
            for n in sizes:
                argv = serve_argv(files, kind)
                row = asyncio.run(measure_size(n, argv, kind, files, work, fillers, CAP))
                print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _child(python: str, *argv: str, timeout: float) -> str:
    """Run ``python`` in the repository; its stdout, or RuntimeError with its last error line."""
    try:
        proc = subprocess.run(
            [python, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"{python}: {exc}") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise RuntimeError(f"{python}: {last}")
    return proc.stdout


def run(out: Path, other: str, quick: bool) -> int:
    sizes = QUICK_SIZES if quick else SIZES
    rounds = 1 if quick else ROUNDS
    pythons = {"project": sys.executable, "other": other}
    result: dict[str, Any] = {"sizes": sizes, "rounds": rounds, "grpcio": {}, "rows": []}
    try:
        for label, python in pythons.items():
            version, library = _child(python, "-c", PROBE, timeout=60).split()
            result["grpcio"][label] = {"python": python, "version": version, "library": library}
        for round_ in range(1, rounds + 1):
            for label, python in pythons.items():
                print(f"round {round_}: {label} grpcio ...", file=sys.stderr)
                text = _child(python, "-m", "bench.grpcio_compare",
                              ",".join(map(str, sizes)), timeout=PASS_TIMEOUT)  # fmt: skip
                rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
                result["rows"] += [row | {"grpcio": label, "round": round_} for row in rows]
    except RuntimeError as exc:
        print(f"scripts/bench --grpcio-python: {exc}", file=sys.stderr)
        return 1
    save(out, "grpcio-compare", result, markdown(result))
    return 0


def _cell(rows: list[dict[str, Any]], key: str) -> str:
    values = [row.get(key) for row in sorted(rows, key=lambda r: int(r["round"]))]
    return " / ".join("-" if v is None else f"{v:.3g}" for v in values)


def markdown(result: dict[str, Any]) -> str:
    project, other = (result["grpcio"][k] for k in ("project", "other"))
    lines = [
        "The scale sweep on two builds of grpcio, alternating (one figure per round)",
        "",
        f"- project: grpcio {project['version']}, {project['library']}",
        f"- other: grpcio {other['version']}, {other['library']}",
        "",
        "| server | N | figure | project | other |",
        "|---|---|---|---|---|",
    ]
    for kind in KINDS:
        for n in result["sizes"]:
            mine = [r for r in result["rows"] if r["server"] == kind and r["enrolled"] == n]
            by = {k: [r for r in mine if r["grpcio"] == k] for k in ("project", "other")}
            for key, name in FIGURES.items():
                cells = (_cell(by["project"], key), _cell(by["other"], key))
                lines.append(f"| {kind} | {n:,} | {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    one_pass([int(n) for n in sys.argv[1].split(",")])
