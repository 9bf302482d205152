"""scripts/bench: the quick mode runs end to end and writes the results CI and docs rely on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "scripts" / "bench"
sys.path.insert(0, str(REPO))

from bench import memory, rootload  # noqa: E402
from bench.load import Target  # noqa: E402
from bench.procs import ALL_CPUS, SERVER_CPUS, launch, split_cpus, unpin  # noqa: E402
from bench.report import markdown, targets  # noqa: E402
from server.trust import subject_order  # noqa: E402
from tests.conftest import require_tool  # noqa: E402

VARIANTS = {"A", "B", "B+noop", "B+leaf", "B+auth", "B+gc", "C", "C-1k"}
SCALE_FIELDS = {
    "enrolled",
    "startup_s",
    "enroll_to_first_call_s",
    "revoke_to_refusal_s",
    "max_connect_wait_enroll_s",
    "max_connect_wait_revoke_s",
    "rss_mb_started",
}


def have_nginx() -> bool:
    return shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()


@pytest.mark.slow
def test_quick_mode_writes_json_and_markdown(tmp_path: Path) -> None:
    if not have_nginx() and os.environ.get("CI") == "true":
        pytest.fail("nginx is missing: variant D cannot run (apt-get install nginx)")
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results: dict[str, Any] = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert results["plan"]["mode"] == "quick"
    cmp = results["comparison"]
    expected = VARIANTS | ({"D"} if have_nginx() else set())
    assert set(cmp["unary"]["median"]) == expected
    assert set(cmp["unary"]["ratio_to_B"]) == expected - {"B"}
    # The B+ diagnostics give no tail figures; B-twin, B's identical control, gives only those.
    diagnostics = {"B+noop", "B+leaf", "B+auth"}
    assert set(cmp["latency"]["p99_ms"]) == expected - diagnostics | {"B-twin"}
    assert "B-twin" in cmp["latency"]["p99_ratio_to_B"]
    assert set(cmp["streaming"]["median"]) == expected
    per_call_only = {"A", "B+noop", "B+leaf", "B+auth", "B+gc"}
    assert set(cmp["connections"]["rsa2048"]["median"]) == expected - per_call_only
    assert all(v > 0 for v in cmp["unary"]["median"].values())
    # Every rate comes with the servers' CPU per unit and how busy they were.
    conns = cmp["connections"]["p256"]
    for block, unit in (
        (cmp["unary"], "call"),
        (cmp["streaming"], "message"),
        (conns, "connection"),
    ):
        assert set(block[f"server_cpu_us_per_{unit}"]) == set(block["median"])
        assert all(v > 0 for v in block["server_busy"].values())
    # Sustained new connections: B and C only, each slice measured after its lead-in.
    sustained = cmp["connections"]["p256-sustained"]
    assert set(sustained["median"]) == {"B", "C"}
    assert set(sustained["server_cpu_us_per_connection"]) == {"B", "C"}
    if len(os.sched_getaffinity(0)) > 1:
        pinned = results["machine"]["pinned"]
        assert not set(pinned["client_cpus"]) & set(pinned["server_cpus"])
    scale = results["scale"]
    for row in scale["pinrpc"] + scale["handover"] + scale["handover-warm"]:
        assert set(row) >= SCALE_FIELDS
        assert row["enroll_to_first_call_s"] is not None
        assert row["revoke_to_refusal_s"] is not None
    assert all(row["all_clients_s"] is not None for row in scale["handover-warm"])
    assert [(r["listeners"], r["roots"], r["roots_per_listener"]) for r in scale["shards"]] == [
        (1, 100, 100),
        (2, 100, 50),
    ]
    assert all(r["parallel_s"] > 0 for r in scale["shards"])
    assert {t["target"] for t in results["targets"]} >= {"unary calls/s C/B"}
    table = (tmp_path / "results.md").read_text()
    assert "| unary calls/s (64 in flight) |" in table
    assert "| server CPU us per new connection (p256) |" in table
    assert "| server CPU us per new connection (p256-sustained) |" in table
    assert "### Shard by port: 100 client roots over K listeners" in table
    assert "### Targets" in table


@pytest.mark.slow
def test_store_patch_builds_both_stores_and_checks_them(tmp_path: Path) -> None:
    missing = [tool for tool in ("gcc", "g++", "ar", "patch") if shutil.which(tool) is None]
    require_tool(not missing, ", ".join(missing), "apt-get install g++ patch")
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--store-patch", "--quick", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "store-patch.json").read_text())
    assert [(r["roots"], r["order"]) for r in rows] == [
        (300, "sorted"), (300, "shuffled"), (1000, "sorted"), (1000, "shuffled")
    ]  # fmt: skip
    assert all(r["stock_s"] > 0 and r["patched_s"] > 0 for r in rows)
    # The run passed because every root verified and the stranger did not; the same check
    # must fail when the "stranger" is one of the roots.
    work = tmp_path / "store-patch-work"
    roots = work / "roots-300-sorted.pem"
    for build in ("stock", "patched"):
        harness = str(work / f"rootload-{build}")
        ok = subprocess.run([harness, roots, work / "stranger.pem"], capture_output=True)
        assert ok.returncode == 0, ok.stdout
        enrolled = subprocess.run([harness, roots, roots], capture_output=True, text=True)
        assert enrolled.returncode == 1
        assert json.loads(enrolled.stdout)["stranger_verified"] is True


def _running_children(pid: int) -> set[int]:
    """PIDs of ``pid``'s children that have not exited (zombies excluded)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found |= {int(c) for c in (task / "children").read_text().split()}
    return {c for c in found if _running(c)}


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_sigterm_stops_every_server_the_benchmark_started(tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"  # where the benchmark makes its work directory
    scratch.mkdir()
    bench = subprocess.Popen(
        [sys.executable, str(BENCH), "--quick", "--skip-nginx", "--skip-scale", "--out",
         str(tmp_path / "out")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(scratch)},
    )  # fmt: skip
    servers: set[int] = set()
    try:
        # Terminated while measuring: all ten servers are up (A ... C-1k, D's backend) and grpc's
        # client threads exist, which happens only once the channels open.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and bench.poll() is None:
            servers |= _running_children(bench.pid)
            if len(servers) >= 10 and len(list(Path(f"/proc/{bench.pid}/task").iterdir())) > 1:
                break
            time.sleep(0.1)
        assert len(servers) >= 10, f"only {len(servers)} servers seen (exit {bench.poll()})"
        time.sleep(1)
        bench.terminate()
        _, err = bench.communicate(timeout=60)
        assert not {pid for pid in servers if _running(pid)}, "servers left after SIGTERM"
        assert bench.returncode == 128 + signal.SIGTERM
        assert err.decode().strip().endswith("terminated; stopped 10 servers")
        assert not list(scratch.iterdir())  # the work directory is gone too
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
        for pid in servers:  # after a failure: stop what this test started
            if _running(pid):
                os.kill(pid, signal.SIGKILL)


def test_bad_flag_is_one_line_error_and_nonzero() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--no-such-flag"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "unrecognized arguments: --no-such-flag" in proc.stderr


def _results(unary_c: float, p99_c: float, cpu_c: float | None = None) -> dict[str, Any]:
    def r(x: float) -> dict[str, float]:
        return {"median": x, "q1": x, "q3": x, "n": 1}

    return {
        "plan": {"mode": "test"},
        "duration_s": 1.0,
        "machine": {
            "cpu": "cpu",
            "cores": 2,
            "kernel": "k",
            "python": "3",
            "grpcio": "1",
            "nginx": None,
            "loadavg_start": 0.0,
            "loadavg_end": 0.0,
            "pinned": {"client_cpus": [0], "server_cpus": [1]},
        },
        "comparison": {
            "unary": {
                "median": {"B": 1.0, "C": unary_c},
                "ratio_to_B": {"C": r(unary_c)},
                **({"server_cpu_ratio_to_B": {"C": cpu_c}} if cpu_c else {}),
            },
            "latency": {
                "offered_rate": 1.0,
                "p50_ms": {},
                "p99_ms": {},
                "p50_ratio_to_B": {},
                "p99_ratio_to_B": {"C": r(p99_c)},
            },
            "streaming": {"median": {}, "ratio_to_B": {}},
            "connections": {"p256": {"median": {}, "ratio_to_B": {}}},
        },
    }


def test_targets_are_judged_from_the_figures() -> None:
    good = {t["target"]: t["met"] for t in targets(_results(0.98, 1.05))}
    bad = {t["target"]: t["met"] for t in targets(_results(0.96, 1.2))}
    assert good["unary calls/s C/B"] is True
    assert good["unary p99 latency C/B"] is True
    assert bad["unary calls/s C/B"] is False
    assert bad["unary p99 latency C/B"] is False
    assert good["streaming messages/s C/B"] is None  # not measured is not a pass


def test_capacity_is_judged_from_server_cpu_per_unit() -> None:
    # A client-bound run: the rates tie, but C's server spent 1.15x B's CPU per call.
    capacity = "unary calls/s, as server capacity (B/C server CPU per unit)"
    tied = {t["target"]: t for t in targets(_results(0.99, 1.0, cpu_c=1.15))}
    assert tied["unary calls/s C/B"]["met"] is True
    assert tied[capacity]["value"] == 0.87
    assert tied[capacity]["met"] is False
    cheap = {t["target"]: t for t in targets(_results(0.99, 1.0, cpu_c=1.02))}
    assert cheap[capacity]["met"] is True
    unmeasured = {t["target"]: t for t in targets(_results(0.99, 1.0))}
    assert unmeasured[capacity]["met"] is None


def test_c_is_also_judged_against_b_with_the_same_gc_settings() -> None:
    fair = "against B with pinrpc's GC settings"
    results = _results(0.99, 1.0)
    unary, latency = results["comparison"]["unary"], results["comparison"]["latency"]
    unary["server_cpu_us_per_call"] = {"B": 100.0, "B+gc": 95.0, "C": 100.0}
    unary["C_over_B+gc"] = {"median": 0.95, "q1": 0.95, "q3": 0.95, "n": 1}
    latency["p99_C_over_B+gc"] = {"median": 1.05, "q1": 1.05, "q3": 1.05, "n": 1}
    got = {t["target"]: t for t in targets(results)}
    assert got["unary calls/s C/B"]["met"] is True
    assert got[f"unary calls/s C/(B+gc), {fair}"]["met"] is False
    assert got[f"unary calls/s C/(B+gc), as server capacity, {fair}"]["value"] == 0.95
    assert got[f"unary calls/s C/(B+gc), as server capacity, {fair}"]["met"] is False
    assert got[f"unary p99 latency C/(B+gc), {fair}"]["met"] is True
    plain = {t["target"]: t["met"] for t in targets(_results(0.99, 1.0))}
    assert plain[f"unary calls/s C/(B+gc), {fair}"] is None  # not measured is not a pass


def test_servers_are_launched_on_their_own_cpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = os.sched_getaffinity(0)
    split = split_cpus()
    if len(mine) < 2:
        assert split is None
        return
    assert split is not None
    client, servers = split
    assert client and servers and not client & servers and client | servers == mine
    # The child reads its CPUs after a pause: launch() pins it just after it started.
    show = ["-c", "import os, time; time.sleep(0.5); print(sorted(os.sched_getaffinity(0)))"]
    monkeypatch.setenv(SERVER_CPUS, ",".join(map(str, sorted(servers))))
    pinned = launch("pinned", show, tmp_path)
    monkeypatch.delenv(SERVER_CPUS)
    free = launch("free", show, tmp_path)
    # A tool started from the pinned client side gets every CPU back.
    monkeypatch.setenv(ALL_CPUS, ",".join(map(str, sorted(mine))))
    tool = subprocess.Popen([sys.executable, *show], stdout=subprocess.PIPE, text=True)
    os.sched_setaffinity(tool.pid, client)
    unpin(tool.pid)
    for proc in (pinned, free):
        assert proc.popen.wait(30) == 0
    assert pinned.log.read_text().strip() == str(sorted(servers))
    assert free.log.read_text().strip() == str(sorted(mine))
    assert tool.communicate(timeout=30)[0].strip() == str(sorted(mine))


def test_markdown_marks_missed_targets() -> None:
    results = _results(0.9, 1.0)
    results["targets"] = targets(results)
    text = markdown(results)
    assert "| unary calls/s C/B | 0.9 | >= 0.97 | **no** |" in text
    assert "servers pinned to CPU 1, the benchmark's client to the others" in text
    assert "Noise floor" not in text  # no control measured, no claim about it


def test_markdown_gives_the_p99_noise_floor_of_the_run() -> None:
    results = _results(0.99, 1.0)
    latency = results["comparison"]["latency"]
    latency["p99_ms"] = {"B": 4.0, "B-twin": 6.4, "C": 4.0}
    latency["p99_ratio_to_B"]["B-twin"] = {"median": 1.6, "q1": 0.5, "q3": 2.5, "n": 10}
    results["targets"] = targets(results)
    text = markdown(results)
    assert "measured p99 B-twin/B = 1.600 (0.50-2.50) in this run" in text
    # The control has its own column in the p99 row, and is no target.
    p99_row = next(line for line in text.splitlines() if line.startswith("| p99 ms"))
    assert "| 6.4 |" in p99_row
    assert not any("B-twin" in t["target"] for t in results["targets"])


@pytest.mark.slow
def test_grpcio_compare_runs_the_sweep_under_both_interpreters(tmp_path: Path) -> None:
    # The project's interpreter stands in for "another grpcio": the check is that both passes
    # run every kind and size through the real sweep, not what the figures are.
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--grpcio-python", sys.executable, "--quick",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "grpcio-compare.json").read_text())
    assert set(result["grpcio"]) == {"project", "other"}
    seen = {(r["grpcio"], r["server"], r["enrolled"]) for r in result["rows"]}
    assert seen == {
        (g, kind, n) for g in ("project", "other") for kind in ("pinrpc", "handover")
        for n in (1, 100)
    }  # fmt: skip
    assert all(r["startup_s"] > 0 and r["probe_failures"] == 0 for r in result["rows"])
    assert "| handover | 100 | start-up s |" in (tmp_path / "grpcio-compare.md").read_text()


def test_rebuild_memory_cycles_really_rebuild(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--rebuild-memory", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "rebuild-memory.json").read_text())
    assert [r["server"] for r in rows] == list(memory.KINDS)
    for row in rows:
        # Every cycle saw its client admitted after the enrollment and refused after the
        # revocation: each one made the server rebuild twice.
        assert row["admitted"] == row["refused"] == memory.QUICK_CYCLES
        assert len(row["rss_mb"]) == memory.QUICK_CYCLES + 1 and min(row["rss_mb"]) > 10
    # The capped server really ran with the cap, the others without.
    assert [r["malloc_arena_max"] for r in rows] == [None, "2", None]
    assert "| inline, MALLOC_ARENA_MAX=2 | 200 |" in (tmp_path / "rebuild-memory.md").read_text()


def test_rebuild_memory_wait_gives_up_on_a_client_that_never_gets_in() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    nowhere = Target(f"127.0.0.1:{port}", None)
    with pytest.raises(RuntimeError, match="never admitted"):
        asyncio.run(memory.until(nowhere, admitted=True, timeout=0.5))
    asyncio.run(memory.until(nowhere, admitted=False, timeout=0.5))  # refused at once


@pytest.mark.parametrize(
    ("python", "message"),
    [("/nonexistent/python", "No such file"), ("/bin/false", "exit status 1")],
)
def test_grpcio_compare_refuses_an_unusable_interpreter(
    tmp_path: Path, python: str, message: str
) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--grpcio-python", python, "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "grpcio-compare.json").exists()


def test_registry_lookup_finds_clients_by_name_and_fingerprint() -> None:
    """bench/registry_lookup.py on a small SQLite registry: every lookup it times finds a
    client (registry.find raises for an unknown one), and it prints both rows."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.registry_lookup", "--clients", "50", "--lookups", "10"],
        capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()
    assert [row.split()[5] for row in rows] == ["name", "fingerprint"], rows


def test_shards_deal_every_root_to_exactly_one_listener() -> None:
    pems = rootload.client_roots(7)
    dealt = rootload.shares(pems, 3)
    assert [len(share) for share in dealt] == [3, 2, 2]
    assert sorted(pem for share in dealt for pem in share) == sorted(pems)
    # Each share keeps the order that loads fastest.
    assert all(share == sorted(share, key=subject_order) for share in dealt)
    assert rootload.shares(pems, 1) == [sorted(pems, key=subject_order)]
