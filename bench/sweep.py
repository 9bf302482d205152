"""Scale sweep and revocation: start-up, enrollment-to-first-call, trust-rebuild stalls, RSS.

For each registry size N a fresh server is started (as a child process, like every variant);
then, with a prober opening a new connection (and making one call) every ~10 ms:
  1. start-up: from process start to the first successful call of an enrolled client;
  2. enrollment: `pinrpc-server enroll` (the real CLI) for a new client, and the time from its
     launch (and from its commit) until the new client's first successful call;
  3. revocation: `pinrpc-server revoke` for a client that keeps calling over an open channel,
     and the time from its launch (and from its commit) until the first refused call;
  4. the longest any prober connection took while 2 and 3 were rebuilding the trust set, and
     whether calls over an already open channel failed or stalled meanwhile.
The enrolled count N is the probe (the client that calls) plus N-1 generated fillers.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from server.enrollment import Candidate

from .fixtures import ECHO_ALL, ServerFiles, candidate_of, client, write_registry
from .load import REQUEST, Target, connect_once, credentials
from .load import aio_stub as load_stub
from .procs import REPO, Proc, launch, unpin, wait_port

TIMEOUT = 120.0  # a bound on every wait; the 10,000-client rebuilds take tens of seconds


@dataclass
class Prober:
    """Opens fresh connections in a loop (until cancelled); records (start, seconds, status)."""

    target: Target
    records: list[tuple[float, float, grpc.StatusCode]] = field(default_factory=list)
    current: float | None = None  # start of the connection in progress

    async def run(self) -> None:
        while True:
            self.current = time.monotonic()
            seconds, code = await connect_once(self.target, TIMEOUT)
            self.records.append((self.current, seconds, code))
            self.current = None
            await asyncio.sleep(0.01)

    def longest(self, since: float) -> float:
        """The longest connection in progress at or after ``since`` (unfinished ones too)."""
        waits = [s for start, s, _ in self.records if start + s >= since]
        if self.current is not None:
            waits.append(time.monotonic() - self.current)
        return max(waits, default=0.0)

    def baseline(self, before: float) -> float:
        waits = [s for start, s, _ in self.records if start + s < before]
        return statistics.median(waits) if waits else float("nan")

    def failures(self, since: float) -> int:
        return sum(1 for start, _, c in self.records if start >= since and c != grpc.StatusCode.OK)

    def completed_after(self, moment: float) -> bool:
        return any(start > moment for start, _, _ in self.records)


@dataclass
class Caller:
    """Calls over one open channel in a loop (until cancelled): does it notice a rebuild?"""

    stub: Any
    errors: int = 0
    longest: float = 0.0

    async def run(self) -> None:
        while True:
            start = time.monotonic()
            try:
                await self.stub.Echo(REQUEST, timeout=TIMEOUT)
            except grpc.aio.AioRpcError:
                self.errors += 1
            self.longest = max(self.longest, time.monotonic() - start)
            await asyncio.sleep(0.002)


async def until(predicate: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(step)
    return False


async def first_success(target: Target, timeout: float) -> float | None:
    """Seconds until a fresh connection's call succeeds (retrying), None if never."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        _, code = await connect_once(target, timeout)
        if code == grpc.StatusCode.OK:
            return time.monotonic() - start
        await asyncio.sleep(0.005)
    return None


class CommitWatch:
    """Notes when the registry's generation changes: the moment a CLI change committed."""

    def __init__(self, registry: Path) -> None:
        self._db = sqlite3.connect(f"{registry.as_uri()}?mode=ro", uri=True)
        self._start = self._generation()
        self.committed: float | None = None
        self._task = asyncio.ensure_future(self._watch())

    def _generation(self) -> int:
        row = self._db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        return int(row[0])

    async def _watch(self) -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and self._generation() == self._start:
            await asyncio.sleep(0.002)
        self.committed = time.monotonic()

    async def close(self) -> float | None:
        await self._task
        self._db.close()
        return self.committed


async def cli(*argv: str) -> float:
    """Run pinrpc-server's CLI (as `python -m server.cli`), return its wall time."""
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server.cli", *argv,
        cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    unpin(proc.pid)
    _, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"pinrpc-server {argv[0]} failed: {err.decode().strip()}")
    return time.monotonic() - start


def serve_argv(files: ServerFiles, kind: str) -> Callable[[Path], list[str]]:
    """The server's command line for a registry: kind "pinrpc" (--tls-reload inline, the
    default), "handover", or "handover-warm" (with the `warm` file beside the registry)."""

    def argv(registry: Path) -> list[str]:
        line = ["-m", "server.cli", "serve", "--listen", "127.0.0.1:0", "--cert", str(files.cert),
                "--key", str(files.key), "--registry", str(registry)]  # fmt: skip
        if kind.startswith("handover"):
            line += ["--tls-reload", "handover"]
        if kind == "handover-warm":
            line += ["--warm-start", str(registry.parent / "warm")]
        return line

    return argv


def target_for(files: ServerFiles, port: int, cert: Path, key: Path) -> Target:
    creds = credentials(files.ca_path.read_bytes(), key.read_bytes(), cert.read_bytes())
    return Target(f"127.0.0.1:{port}", creds)


async def measure_size(
    n: int,
    server_argv: Callable[[Path], list[str]],
    label: str,
    files: ServerFiles,
    workdir: Path,
    fillers: list[Candidate],
    cap: float,
    warm_fraction: float = 0.0,
) -> dict[str, float | int | str | None]:
    """All sweep figures for one server kind with ``n`` enrolled clients (the probe + fillers).

    ``warm_fraction``: write a --warm-start file (``warm`` beside the registry) naming that
    fraction of the fillers, as if they had connected before a restart, and the probe, seen
    most recently. One more client, ``cold``, waits for the full set, and its first call tells
    when all clients are served: at a fraction of 1 it is in the file, seen least recently
    (beyond server.warm.FIRST_MAX most recent ones when N is larger), otherwise not in it.

    ``cap`` bounds the wait for a new enrollment to become usable (a rebuild inside the
    handshake at N=10,000 takes over a minute on a busy 2-core machine); a capped figure is
    reported as None plus ``*_gave_up_after_s``, and the connection wait as at least ``cap``.
    """
    directory = workdir / f"{label}-{n}"
    directory.mkdir()
    probe = client(directory, "probe")
    newcomer = client(directory, "newcomer")
    registry = directory / "registry.db"
    named = [("probe", candidate_of(probe))]
    if warm_fraction:
        cold = client(directory, "cold")
        named.append(("cold", candidate_of(cold)))
    # Enrollment order is arbitrary in real life (and the root-loading cost depends on order).
    chosen = fillers[: n - len(named)]
    random.Random(n).shuffle(chosen)
    write_registry(registry, named, chosen)
    if warm_fraction:
        seen = [c.fingerprint for c in chosen[: int(warm_fraction * len(chosen))]]
        oldest = [cold.fingerprint] if warm_fraction >= 1 else []
        seen = [*oldest, *seen, probe.fingerprint]
        (directory / "warm").write_text("".join(f"{f.digest.hex()}\n" for f in seen))
    result: dict[str, float | int | str | None] = {"server": label, "enrolled": n}
    proc: Proc = launch(f"{label}-{n}", server_argv(registry), directory)
    tasks: list[asyncio.Future[None]] = []
    try:
        wait_port(proc, TIMEOUT)
        probe_target = target_for(files, proc.port, probe.cert_path, probe.key_path)
        up = await first_success(probe_target, TIMEOUT)
        result["listening_s"] = proc.extra["listening_s"]
        result["startup_s"] = None if up is None else time.monotonic() - proc.started
        if warm_fraction:
            cold_target = target_for(files, proc.port, cold.cert_path, cold.key_path)
            everyone = await first_success(cold_target, TIMEOUT + cap)
            result["all_clients_s"] = None if everyone is None else time.monotonic() - proc.started
        result["rss_mb_started"] = round(proc.rss_mb(), 1)
        # The probe's long-lived channel: revoked at the end while it keeps calling.
        resident = probe_target.channel()
        stub = load_stub(resident)
        await stub.Echo(REQUEST, timeout=TIMEOUT)

        # 1. Enrollment through the real CLI, while the probe keeps opening new connections.
        prober = Prober(probe_target)
        tasks.append(asyncio.ensure_future(prober.run()))
        caller = Caller(stub)
        tasks.append(asyncio.ensure_future(caller.run()))
        await asyncio.sleep(1.0)
        result["probe_noise_floor_s"] = prober.longest(0.0)  # longest connect, nothing changing
        new_target = target_for(files, proc.port, newcomer.cert_path, newcomer.key_path)
        watch = CommitWatch(registry)
        t0 = time.monotonic()
        enroll_cli = asyncio.ensure_future(
            cli("enroll", str(newcomer.cert_path), "--name", "newcomer",
                f"--allow={ECHO_ALL}", "--registry", str(registry))
        )  # fmt: skip
        usable = await first_success(new_target, cap)
        done = time.monotonic()
        result["enroll_cli_s"] = await enroll_cli
        committed = await watch.close()
        result["enroll_to_first_call_s"] = None if usable is None else done - t0
        result["enroll_commit_to_first_call_s"] = (
            None if usable is None or committed is None else done - committed
        )
        if usable is None:
            result["enroll_gave_up_after_s"] = cap
        else:  # let the prober finish what the rebuild held up, within the cap
            moment = time.monotonic()
            await until(lambda: prober.completed_after(moment), cap)
        result["probe_baseline_s"] = prober.baseline(t0)
        result["max_connect_wait_enroll_s"] = prober.longest(t0)
        result["probe_failures"] = prober.failures(t0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        tasks.clear()
        result["open_channel_errors"] = caller.errors
        result["open_channel_longest_call_s"] = caller.longest

        # 2. Revocation of the probe, calling over its open channel.
        watch = CommitWatch(registry)
        t1 = time.monotonic()
        revoke_cli = asyncio.ensure_future(cli("revoke", "probe", "--registry", str(registry)))
        refused = None
        while time.monotonic() - t1 < TIMEOUT:
            try:
                await stub.Echo(REQUEST, timeout=TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                    refused = time.monotonic() - t1
                    break
                raise
        result["revoke_cli_s"] = await revoke_cli
        committed = await watch.close()
        result["revoke_to_refusal_s"] = refused
        result["revoke_commit_to_refusal_s"] = (
            None if refused is None or committed is None else t1 + refused - committed
        )
        await resident.close(None)
        # A revocation may rebuild the trust set too: probe with the newcomer, if it got in.
        if usable is not None:
            prober = Prober(new_target)
            tasks.append(asyncio.ensure_future(prober.run()))
            moment = time.monotonic() + 0.5
            await until(lambda: prober.completed_after(moment), cap)
            result["max_connect_wait_revoke_s"] = prober.longest(t1)
        result["rss_mb_end"] = round(proc.rss_mb(), 1)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        proc.stop()
    return result
