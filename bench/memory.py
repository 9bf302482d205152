"""scripts/bench --rebuild-memory: the server's RSS across trust rebuilds. Does it leak?

A real server with N enrolled clients, then cycles of: `pinrpc-server enroll` of one more client
(the real CLI), until that client's first call succeeds; `pinrpc-server revoke` of it, until
its call is refused. Each wait makes the server rebuild its TLS trust: `inline` inside the
waiting client's handshake, `handover` in a new listener (`--max-connection-age 2`, so old
listeners retire during the run). RSS is read from /proc after every cycle. The third server is
`inline` with MALLOC_ARENA_MAX=2, which tells whether growth is glibc's per-thread arenas.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc

from server.enrollment import Candidate

from .fixtures import (
    ECHO_ALL,
    client,
    filler_candidates,
    server_files,
    write_registry,
)
from .load import Target, connect_once
from .procs import launch, wait_port
from .report import save
from .sweep import TIMEOUT, cli, target_for

SIZE, CYCLES = 3000, 40
QUICK_SIZE, QUICK_CYCLES = 200, 3
# Server kind: extra `serve` flags, extra environment.
KINDS: dict[str, tuple[list[str], dict[str, str]]] = {
    "inline": ([], {}),
    "inline, MALLOC_ARENA_MAX=2": ([], {"MALLOC_ARENA_MAX": "2"}),
    "handover": (["--tls-reload", "handover", "--max-connection-age", "2"], {}),
}
CHECKPOINTS = (1, 5, 10, 20, 30, 40)


async def until(target: Target, *, admitted: bool, timeout: float = TIMEOUT) -> None:
    """Retry fresh connections until the client's call succeeds (or is refused)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        _, code = await connect_once(target, timeout)
        if (code == grpc.StatusCode.OK) == admitted:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the client was never {'admitted' if admitted else 'refused'}")


async def measure(kind: str, fillers: list[Candidate], cycles: int, work: Path) -> dict[str, Any]:
    flags, env = KINDS[kind]
    directory = work / kind.replace(" ", "").replace(",", "-").replace("=", "")
    directory.mkdir()
    files = server_files(directory / "server")
    registry = directory / "registry.db"
    write_registry(registry, [], fillers)
    argv = ["-m", "server.cli", "serve", "--listen", "127.0.0.1:0", "--cert", str(files.cert),
            "--key", str(files.key), "--registry", str(registry), *flags]  # fmt: skip
    proc = launch(directory.name, argv, directory, env=env)
    row: dict[str, Any] = {
        "server": kind,
        "enrolled": len(fillers),
        "rss_mb": [],
        "admitted": 0,
        "refused": 0,
    }
    try:
        wait_port(proc, TIMEOUT)
        row["malloc_arena_max"] = _environ(proc.pid).get("MALLOC_ARENA_MAX")
        row["rss_mb"].append(round(proc.rss_mb(), 1))
        for i in range(cycles):
            name = f"extra-{i}"
            extra = client(directory / "keys", name)
            target = target_for(files, proc.port, extra.cert_path, extra.key_path)
            await cli("enroll", str(extra.cert_path), "--name", name, f"--allow={ECHO_ALL}",
                      "--registry", str(registry))  # fmt: skip
            await until(target, admitted=True)
            row["admitted"] += 1
            await cli("revoke", name, "--registry", str(registry))
            await until(target, admitted=False)
            row["refused"] += 1
            row["rss_mb"].append(round(proc.rss_mb(), 1))
    finally:
        proc.stop()
    return row


def _environ(pid: int) -> dict[str, str]:
    """The environment a process started with (what glibc read)."""
    pairs = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(p.split("=", 1) for p in pairs if "=" in p)


def run(out: Path, quick: bool) -> int:
    n, cycles = (QUICK_SIZE, QUICK_CYCLES) if quick else (SIZE, CYCLES)
    fillers = filler_candidates(n)  # the same clients for every server kind
    rows = []
    work = Path(tempfile.mkdtemp(prefix="pinrpc-bench-memory-"))
    try:
        for kind in KINDS:
            try:
                rows.append(asyncio.run(measure(kind, fillers, cycles, work)))
            except (RuntimeError, OSError) as exc:
                print(f"scripts/bench --rebuild-memory: {kind}: {exc}", file=sys.stderr)
                return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save(out, "rebuild-memory", rows, markdown(rows, cycles))
    return 0


def markdown(rows: list[dict[str, Any]], cycles: int) -> str:
    points = [c for c in CHECKPOINTS if c < cycles] + [cycles]
    head = " | ".join(f"after {c}" for c in points)
    lines = [
        "Server RSS (MB) after start-up and after enroll + revoke cycles (two rebuilds each)",
        "",
        f"| server | N | start | {head} |",
        "|---|---|---|" + "---|" * len(points),
    ]
    for row in rows:
        cells = " | ".join(str(row["rss_mb"][c]) for c in points)
        lines.append(f"| {row['server']} | {row['enrolled']:,} | {row['rss_mb'][0]} | {cells} |")
    return "\n".join(lines) + "\n"
