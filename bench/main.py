"""scripts/bench: pinrpc against bare grpcio and nginx, and pinrpc's trust store at scale.

Method: every server is a child of this process, started the same way; one grpc.aio client
here drives them, on CPUs of its own (procs.pin_benchmark). Variants are compared with all
servers up and channels open, in short alternating slices (order reversed every round: ABC
CBA ...), and the report gives medians of the per-round ratios to variant B, never a lone
absolute time.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import grpc

from . import chart, grpcio_compare, load, memory, report, rootload, store_patch
from .fixtures import candidate_of, client, filler_candidates, server_files, write_registry
from .load import aio_stub as load_stub
from .nginx import nginx_binary, start_nginx
from .procs import (
    Proc,
    StartError,
    launch,
    pin_benchmark,
    split_cpus,
    terminate_launched,
    wait_port,
)
from .sweep import measure_size, serve_argv


@dataclass(frozen=True)
class Plan:
    mode: str
    rounds: int  # alternation rounds for throughput workloads (one slice per variant each)
    slice_s: float
    latency_rounds: int
    latency_slice_s: float
    conn_rounds: int
    sweep: tuple[int, ...]
    handover: tuple[int, ...]  # sizes for pinrpc-server serve --tls-reload handover
    warm: tuple[int, ...]  # sizes for handover with a --warm-start file (all seen before)
    fleet: int  # enrolled clients in variant C-1k
    cap: float  # the longest the sweep waits for a new enrollment to become usable
    rootload: tuple[int, ...]  # root counts for the add_secure_port measurement
    shards: tuple[int, ...]  # listener counts for the shard-by-port load of the sweep's largest N
    # New connections sustained: each slice is measured after a lead-in of the same workload,
    # long enough to empty pinrpc's audit token bucket (200 lines), which refills while the
    # other variants run and would otherwise give every short slice a burst of audit lines.
    sustained_rounds: int
    sustained_s: float
    lead_in_s: float


FULL = Plan("full", 11, 0.5, 10, 0.6, 8, (1, 100, 1000, 10000), (1000, 10000), (10000,), 1000,
            40.0, (1000, 2000, 4000), (1, 2, 5, 10), 6, 1.0, 0.6)  # fmt: skip
QUICK = Plan("quick", 2, 0.15, 2, 0.2, 2, (1, 100), (100,), (100,), 100, 10.0, (300,), (1, 2), 1,
             0.2, 0.2)  # fmt: skip
# A steady fleet: every client connected before the restart, the case server.warm.FIRST_MAX
# is for.
WARM_FRACTION = 1.0
# The B+ variants split C's per-call CPU cost; their tails would be noise, so the latency
# workload leaves them out and spends the time on rounds instead. B-twin, a second server
# identical to B, runs only there: its p99 ratio to B is each run's own noise floor, since a
# p99 over short slices rests on one or two stalls of the machine (docs/PERFORMANCE.md).
DIAGNOSTICS = frozenset({"B+noop", "B+leaf", "B+auth"})
TWIN = "B-twin"

Slice = Callable[[], Awaitable[Any]]
# Removed by the SIGTERM handler, which leaves without unwinding the `with` that made them.
_WORKDIRS: list[Path] = []


async def alternate(slices: dict[str, Slice], rounds: int) -> list[dict[str, Any]]:
    """One warm-up round, then ``rounds`` rounds, every other one in reverse order.

    Within a round, every variant's slice sits between two slices of the reference B
    (B X1 B X2 B ...), and the round records, besides each raw result, X's ratio to the mean of
    its two neighbouring B slices: the machine's drift cancels out of that ratio.
    """
    others = [n for n in slices if n != "B"]
    results = []
    for r in range(rounds + 1):
        got: dict[str, Any] = {}
        ref: list[Any] = [await slices["B"]()]
        for name in others if r % 2 else reversed(others):
            got[name] = await slices[name]()
            ref.append(await slices["B"]())
            got[f"{name}@B"] = (ref[-2], ref[-1])
        got["B"] = ref[len(ref) // 2]
        if r:
            results.append(got)
    return results


def ratio(rounds: list[dict[str, Any]], a: str, b: str) -> dict[str, float]:
    """Median and quartiles of the per-round ratio a/b, b taken from a's neighbouring slices."""

    def one(r: dict[str, Any]) -> float:
        if b == "B" and f"{a}@B" in r:
            return float(r[a] / ((r[f"{a}@B"][0] + r[f"{a}@B"][1]) / 2))
        return float(r[a] / r[b])

    values = sorted(one(r) for r in rounds)
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": round(q[1], 3), "q1": round(q[0], 3), "q3": round(q[2], 3), "n": len(values)}


def project(rounds: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Rounds of latency dicts reduced to one figure (p50 or p99), neighbours included."""
    return [
        {n: (v[0][key], v[1][key]) if "@" in n else v[key] for n, v in r.items()} for r in rounds
    ]


def summary(rounds: list[dict[str, Any]], ref: str = "B") -> dict[str, Any]:
    names = [n for n in rounds[0] if "@" not in n]
    return {
        "median": {n: round(statistics.median(r[n] for r in rounds), 1) for n in names},
        "ratio_to_B": {n: ratio(rounds, n, ref) for n in names if n != ref},
    }


def machine(pinned: tuple[set[int], set[int]] | None) -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nginx = nginx_binary()
    nginx_version = None
    if nginx:
        out = subprocess.run([nginx, "-v"], capture_output=True, text=True, check=False)
        nginx_version = out.stderr.strip()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "nginx": nginx_version,
        "loadavg_start": os.getloadavg()[0],
        "pinned": {"client_cpus": sorted(pinned[0]), "server_cpus": sorted(pinned[1])}
        if pinned
        else None,
    }


class Servers:
    """The comparison's servers, all up at once; stopped by PID on exit."""

    def __init__(self, workdir: Path, plan: Plan, skip_nginx: bool) -> None:
        self.procs: dict[str, Proc] = {}
        self.targets: dict[str, dict[str, load.Target]] = {}
        self.skipped: list[str] = []
        self.workdir = workdir
        self.plan = plan
        self.skip_nginx = skip_nginx

    def start(self) -> None:
        w = self.workdir
        files = server_files(w / "server")
        self.files = files
        keys = w / "keys"
        p256, rsa = client(keys, "bench-p256"), client(keys, "bench-rsa", "rsa2048")
        roots = w / "bare-roots.pem"
        roots.write_bytes(p256.cert_path.read_bytes() + rsa.cert_path.read_bytes())
        named = [("bench-p256", candidate_of(p256)), ("bench-rsa", candidate_of(rsa))]
        small, fleet = w / "small.db", w / "fleet.db"
        write_registry(small, named, [])
        write_registry(fleet, named, filler_candidates(self.plan.fleet - len(named)))
        tls = ["--cert", str(files.cert), "--key", str(files.key)]
        serve = ["-m", "server.cli", "serve", "--listen", "127.0.0.1:0", *tls]
        bare_mtls = ["-m", "bench.bare_server", "--mtls", *tls, "--roots", str(roots)]
        argv = {
            "A": ["-m", "bench.bare_server"],
            "B": bare_mtls,
            TWIN: bare_mtls,
            "B+noop": [*bare_mtls, "--interceptor", "noop"],
            "B+leaf": [*bare_mtls, "--interceptor", "leaf", "--registry", str(small)],
            "B+auth": [*bare_mtls, "--interceptor", "auth", "--registry", str(small)],
            "B+gc": [*bare_mtls, "--gc-settle"],
            "C": [*serve, "--registry", str(small)],
            "C-1k": [*serve, "--registry", str(fleet)],
            "D-backend": ["-m", "bench.bare_server"],
        }
        for name, args in argv.items():
            self.procs[name] = launch(name, args, w)
        for proc in self.procs.values():
            wait_port(proc, 60)
        if self.skip_nginx:
            self.skipped.append("D: skipped (--skip-nginx)")
        elif nginx_binary() is None:
            self.skipped.append("D: skipped, nginx is not installed (apt-get install nginx)")
        else:
            pems = [p256.cert_path.read_bytes(), rsa.cert_path.read_bytes()]
            backend = self.procs["D-backend"].port
            self.procs["D"] = start_nginx(w / "nginx", backend, files.cert, files.key, pems)
        ca = files.ca_path.read_bytes()
        for kind, who in (("p256", p256), ("rsa2048", rsa)):
            creds = load.credentials(ca, who.key_path.read_bytes(), who.cert_path.read_bytes())
            self.targets[kind] = {
                name: load.Target(f"127.0.0.1:{self.procs[name].port}", creds)
                for name in ("B", TWIN, "B+noop", "B+leaf", "B+auth", "B+gc", "C", "C-1k", "D")
                if name in self.procs
            }
        self.targets["plain"] = {"A": load.Target(f"127.0.0.1:{self.procs['A'].port}", None)}

    def processes(self, variant: str) -> list[Proc]:
        """The processes doing a variant's server work: nginx and its backend for D."""
        if variant == "D":
            return [self.procs["D"], self.procs["D-backend"]]
        return [self.procs[variant]]

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()


class Meter:
    """The servers' CPU time over a variant's slices of a rate workload.

    CPU per unit of work is far steadier than the rate on a shared machine (another process
    taking the CPU slows the work and the CPU it uses alike), and "busy" (CPU seconds per
    second) shows whether the server or the client was the bottleneck.
    """

    def __init__(self, servers: Servers) -> None:
        self.servers = servers
        self.cpu: dict[str, float] = {}
        self.units: dict[str, float] = {}
        self.wall: dict[str, float] = {}

    def slice(
        self,
        name: str,
        run: Callable[[], Awaitable[float]],
        lead_in: Callable[[], Awaitable[float]] | None = None,
    ) -> Slice:
        """``run`` measured; ``lead_in`` (unmeasured) first, when given."""

        async def metered() -> float:
            if lead_in is not None:
                await lead_in()
            procs = self.servers.processes(name)
            before, start = sum(p.cpu() for p in procs), time.monotonic()
            rate = await run()
            elapsed = time.monotonic() - start
            self.cpu[name] = self.cpu.get(name, 0.0) + sum(p.cpu() for p in procs) - before
            self.units[name] = self.units.get(name, 0.0) + rate * elapsed
            self.wall[name] = self.wall.get(name, 0.0) + elapsed
            return rate

        return metered

    def report(self, unit: str) -> dict[str, Any]:
        per = {n: 1e6 * cpu / self.units[n] for n, cpu in self.cpu.items() if self.units[n]}
        return {
            f"server_cpu_us_per_{unit}": {n: round(v, 1) for n, v in per.items()},
            "server_cpu_ratio_to_B": {
                n: round(v / per["B"], 3) for n, v in per.items() if n != "B" and "B" in per
            },
            "server_busy": {n: round(cpu / self.wall[n], 2) for n, cpu in self.cpu.items()},
        }


async def comparisons(servers: Servers, plan: Plan) -> dict[str, Any]:
    targets = {"A": servers.targets["plain"]["A"], **servers.targets["p256"]}
    channels = {name: t.channel() for name, t in targets.items()}
    stubs = {name: load_stub(ch) for name, ch in channels.items()}
    out: dict[str, Any] = {}
    try:
        for stub in stubs.values():
            await stub.Echo(load.REQUEST, timeout=10)

        throughput = {n: s for n, s in stubs.items() if n != TWIN}
        unary = Meter(servers)
        rates = {n: partial(load.unary_rate, s, plan.slice_s) for n, s in throughput.items()}
        rounds = await alternate({n: unary.slice(n, r) for n, r in rates.items()}, plan.rounds)
        out["unary"] = summary(rounds) | {"unit": "calls/s", "slice_s": plan.slice_s}
        out["unary"] |= unary.report("call")
        if "D" in stubs:
            out["unary"]["C_over_D"] = ratio(rounds, "C", "D")
        # pinrpc's server process tunes the garbage collector; B+gc is B with the same settings.
        out["unary"]["C_over_B+gc"] = ratio(rounds, "C", "B+gc")

        # Half of B's ceiling: below saturation for every TLS variant, so latency is latency.
        rate = 0.5 * out["unary"]["median"]["B"]
        tails = [n for n in stubs if n not in DIAGNOSTICS]
        lat: dict[str, list[float]] = {n: [] for n in tails}

        def latency(name: str) -> Slice:
            async def run() -> dict[str, float]:
                # A full collection of this client's heap (17-21 ms measured) would be a stall
                # of the very tail being measured: collect between slices, never during one.
                gc.collect()
                gc.disable()
                try:
                    got = await load.unary_latencies(stubs[name], plan.latency_slice_s, rate)
                finally:
                    gc.enable()
                lat[name] += got
                return {"p50": load.percentile(got, 50), "p99": load.percentile(got, 99)}

            return run

        lrounds = await alternate({n: latency(n) for n in tails}, plan.latency_rounds)
        p99, p50 = project(lrounds, "p99"), project(lrounds, "p50")
        out["latency"] = {
            "offered_rate": round(rate, 1),
            "p50_ms": {n: round(1000 * load.percentile(v, 50), 2) for n, v in lat.items()},
            "p99_ms": {n: round(1000 * load.percentile(v, 99), 2) for n, v in lat.items()},
            "p50_ratio_to_B": summary(p50)["ratio_to_B"],
            "p99_ratio_to_B": summary(p99)["ratio_to_B"],
            "calls": {n: len(v) for n, v in lat.items()},
        }
        if "D" in stubs:
            out["latency"]["p99_C_over_D"] = ratio(p99, "C", "D")
        out["latency"]["p99_C_over_B+gc"] = ratio(p99, "C", "B+gc")

        streams = Meter(servers)
        rates = {n: partial(load.stream_rate, s, plan.slice_s) for n, s in throughput.items()}
        srounds = await alternate({n: streams.slice(n, r) for n, r in rates.items()}, plan.rounds)
        out["streaming"] = summary(srounds) | {"unit": "messages/s"} | streams.report("message")
    finally:
        for ch in channels.values():
            await ch.close(None)

    out["connections"] = {"unit": "connections/s (connect + 1 call, 4 in parallel)"}
    for kind in ("p256", "rsa2048"):
        # Only the servers whose handshakes differ: not the per-call variants (interceptors, GC
        # settings) nor the latency control.
        group = {k: t for k, t in servers.targets[kind].items() if k in ("B", "C", "C-1k", "D")}
        if kind == "p256":
            group = {"A": servers.targets["plain"]["A"], **group}
        conns = Meter(servers)
        rates = {n: partial(load.connection_rate, t, plan.slice_s) for n, t in group.items()}
        crounds = await alternate(
            {n: conns.slice(n, r) for n, r in rates.items()}, plan.conn_rounds
        )
        out["connections"][kind] = summary(crounds) | conns.report("connection")
    group = {k: t for k, t in servers.targets["p256"].items() if k in ("B", "C")}
    sustained = Meter(servers)
    slices = {
        n: sustained.slice(n, partial(load.connection_rate, t, plan.sustained_s),
                           lead_in=partial(load.connection_rate, t, plan.lead_in_s))
        for n, t in group.items()
    }  # fmt: skip
    srounds = await alternate(slices, plan.sustained_rounds)
    out["connections"]["p256-sustained"] = summary(srounds) | sustained.report("connection")
    return out


async def scale(workdir: Path, plan: Plan, files: Any, include_handover: bool) -> dict[str, Any]:
    biggest = max((*plan.sweep, *plan.handover, *plan.warm))
    started = time.monotonic()
    fillers = filler_candidates(biggest)
    out: dict[str, Any] = {"fillers_generated_s": round(time.monotonic() - started, 1)}
    out["rootload"] = await asyncio.to_thread(rootload.measure, plan.rootload)
    pems = [c.pem for c in fillers]
    out["shards"] = await asyncio.to_thread(rootload.sharded, pems, plan.shards)
    kinds = [("pinrpc", plan.sweep, 0.0)]
    if include_handover:
        kinds.append(("handover", plan.handover, 0.0))
        kinds.append(("handover-warm", plan.warm, WARM_FRACTION))
    for label, sizes, fraction in kinds:
        out[label] = []
        argv = serve_argv(files, label)
        for n in sizes:
            try:
                row = await measure_size(
                    n, argv, label, files, workdir, fillers, plan.cap, fraction
                )
            except (RuntimeError, OSError, sqlite3.Error, grpc.RpcError) as exc:
                # One failed size must not lose the others: record it, go on, exit non-zero.
                row = {"server": label, "enrolled": n, "error": str(exc).splitlines()[0]}
            out[label].append(row)
    return out


def _terminated(signum: int, frame: FrameType | None) -> NoReturn:
    # Not an exception to unwind with: raised here, it can land inside grpc.aio's callbacks,
    # which then hang or swallow it (measured: 2 of 30 terminations left every server running).
    stopped = terminate_launched()
    print(f"scripts/bench: terminated; stopped {stopped} servers", file=sys.stderr)
    for workdir in _WORKDIRS:
        shutil.rmtree(workdir, ignore_errors=True)
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smoke-test mode (< 1 minute)")
    parser.add_argument(
        "--out", type=Path, help="directory for results.json, results.md and results.png"
    )
    parser.add_argument("--skip-nginx", action="store_true", help="leave out variant D")
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="let the client and the servers share every CPU (default: half the CPUs each)",
    )
    parser.add_argument("--skip-scale", action="store_true", help="leave out the scale sweep")
    parser.add_argument(
        "--skip-handover", action="store_true", help="leave out the sweep of --tls-reload handover"
    )
    parser.add_argument(
        "--store-patch",
        action="store_true",
        help="instead: time root loading with BoringSSL as released and with the proposed fix "
        "(bench/store_patch; builds BoringSSL twice, a few minutes; reuse --out to rerun faster)",
    )
    parser.add_argument(
        "--grpcio-python",
        metavar="PY",
        help="instead: the scale sweep at N=1 and 10,000, alternating between this grpcio and "
        "the one of interpreter PY (a grpcio built with the fix; bench/grpcio_compare.py)",
    )
    parser.add_argument(
        "--rebuild-memory",
        action="store_true",
        help="instead: the server's RSS across enroll/revoke trust rebuilds, inline and "
        "handover (bench/memory.py; about 4 minutes)",
    )
    args = parser.parse_args(argv)
    # On SIGTERM, stop the servers instead of leaving them running without their parent.
    signal.signal(signal.SIGTERM, _terminated)
    plan = QUICK if args.quick else FULL
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="pinrpc-bench-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.store_patch:
        sizes = store_patch.QUICK_SIZES if args.quick else store_patch.SIZES
        return store_patch.run(out_dir, out_dir / "store-patch-work", sizes)
    pinned = None if args.no_pin else split_cpus()
    if pinned:
        pin_benchmark(*pinned)
    if args.grpcio_python:
        return grpcio_compare.run(out_dir, args.grpcio_python, args.quick)
    if args.rebuild_memory:
        return memory.run(out_dir, args.quick)
    started = time.monotonic()
    results: dict[str, Any] = {"plan": asdict(plan), "machine": machine(pinned)}

    def save() -> str:
        """Written after every phase, so a failure later keeps what was measured."""
        results["machine"]["loadavg_end"] = os.getloadavg()[0]
        results["duration_s"] = round(time.monotonic() - started, 1)
        results["targets"] = report.targets(results)
        (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        markdown = report.markdown(results)
        (out_dir / "results.md").write_text(markdown)
        skipped = chart.draw(results, out_dir / "results.png")
        if skipped:
            markdown += f"\n(results.png not drawn: {skipped})\n"
        return markdown

    with tempfile.TemporaryDirectory(prefix="pinrpc-bench-work-") as tmp:
        workdir = Path(tmp)
        _WORKDIRS.append(workdir)
        servers = Servers(workdir, plan, args.skip_nginx)
        try:
            servers.start()
            results["comparison"] = asyncio.run(comparisons(servers, plan))
        except StartError as exc:
            print(f"scripts/bench: {exc}", file=sys.stderr)
            return 1
        finally:
            servers.stop()
        results["skipped"] = servers.skipped
        save()
        if not args.skip_scale:
            results["scale"] = asyncio.run(
                scale(workdir, plan, servers.files, not args.skip_handover)
            )
    print(save())
    print(f"results: {out_dir / 'results.json'}, {out_dir / 'results.md'} and results.png")
    errors = [r for k in report.SWEEPS for r in results.get("scale", {}).get(k, [])
              if "error" in r]  # fmt: skip
    for row in errors:
        where = f"{row['server']} N={row['enrolled']}"
        print(f"scripts/bench: {where}: {row['error']}", file=sys.stderr)
    return 1 if errors else 0
