"""Start the servers under comparison identically: same launcher, same session, same env.

The kernel's autogroup scheduler shares CPU per session, so a server started with setsid would
get a different share of the 2 cores than one started here. Every server is a child of the
benchmark process, its stderr goes to a log file, and it is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PORT_RE = re.compile(rb"\(port (\d+)\)")
# The CPUs servers are pinned to ("1", "2,3"), set by pin_benchmark() and inherited by the
# benchmark's helper processes; unset, nothing is pinned. Tools (the admin CLI the sweep times)
# are neither client nor server: they get every CPU the benchmark started with (ALL_CPUS), as
# an operator's command would.
SERVER_CPUS = "PINRPC_BENCH_SERVER_CPUS"
ALL_CPUS = "PINRPC_BENCH_ALL_CPUS"


# Every process launch() started, for terminate_launched().
_LAUNCHED: list[subprocess.Popen[bytes]] = []


class StartError(RuntimeError):
    """A server did not come up."""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    started: float
    port: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss_mb(self) -> float:
        """Resident set size from /proc (the process alone, not its children)."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return float("nan")
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        return int(match.group(1)) / 1024 if match else float("nan")

    def stop(self, timeout: float = 8.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)

    def tail(self, lines: int = 5) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its direct children (nginx's workers), in s."""
    total = 0.0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for p in (pid, *map(int, children)):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def split_cpus() -> tuple[set[int], set[int]] | None:
    """This process's CPUs in two halves: the client's and the servers'; None if only one."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    half = len(cpus) // 2
    return set(cpus[:half]), set(cpus[half:])


def pin_benchmark(client: set[int], servers: set[int]) -> None:
    """Keep this process (every thread) on ``client``; launch() pins servers to ``servers``.

    Unpinned, the client and the server under test compete for the same two cores, and which
    of them the scheduler favours in a slice moves a calls/s ratio by up to 0.2 between runs.
    """
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(tid), client)
    os.environ[SERVER_CPUS] = ",".join(map(str, sorted(servers)))
    os.environ[ALL_CPUS] = ",".join(map(str, sorted(client | servers)))


def _cpus(variable: str) -> set[int] | None:
    value = os.environ.get(variable)
    return {int(c) for c in value.split(",")} if value else None


def unpin(pid: int) -> None:
    """Give a tool process that has just started every CPU (see ALL_CPUS)."""
    cpus = _cpus(ALL_CPUS)
    if cpus:
        os.sched_setaffinity(pid, cpus)


def launch(
    name: str,
    argv: list[str],
    logdir: Path,
    *,
    python: bool = True,
    env: Mapping[str, str] | None = None,
) -> Proc:
    """Start ``argv`` (a Python module invocation unless python=False) as a child process,
    with ``env`` added to this process's environment."""
    log = logdir / f"{name}.log"
    cmd = [sys.executable, *argv] if python else argv
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log.open("wb") as out:
        popen = subprocess.Popen(
            cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=environment
        )
    _LAUNCHED.append(popen)
    cpus = _cpus(SERVER_CPUS)
    if cpus:
        # Not preexec_fn: forking a process that runs grpc threads is unsafe. The server has
        # only just exec'd, so its threads (and nginx's workers) are created after this.
        os.sched_setaffinity(popen.pid, cpus)
    return Proc(name, popen, log, time.monotonic())


def terminate_launched(grace: float = 5.0) -> int:
    """SIGTERM every process launch() started, SIGKILL whatever still runs after ``grace``
    seconds, reap them all; return how many there were.

    Made for a signal handler: it uses only os-level calls, none of Popen's locks, which the
    interrupted code may be holding.
    """
    pids = {p.pid for p in _LAUNCHED if p.returncode is None}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    running, deadline = set(pids), time.monotonic() + grace
    while running:
        for pid in list(running):
            try:
                done = os.waitpid(pid, os.WNOHANG)[0] == pid
            except ChildProcessError:  # reaped already
                done = True
            if done:
                running.discard(pid)
        if running and time.monotonic() > deadline:
            for pid in running:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = float("inf")  # SIGKILL cannot be ignored: wait for them now
        time.sleep(0.02)
    return len(pids)


def wait_port(proc: Proc, timeout: float) -> int:
    """Wait for the "(port N)" line a server logs once it listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = PORT_RE.search(proc.log.read_bytes())
        if match:
            proc.port = int(match.group(1))
            proc.extra["listening_s"] = time.monotonic() - proc.started
            return proc.port
        if proc.popen.poll() is not None:
            raise StartError(f"{proc.name} exited with {proc.popen.returncode}: {proc.tail()}")
        time.sleep(0.01)
    raise StartError(f"{proc.name} did not listen within {timeout:.0f} s: {proc.tail()}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
