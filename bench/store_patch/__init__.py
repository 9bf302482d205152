"""scripts/bench --store-patch: the root-loading fix proposed upstream, measured.

Start-up with N enrolled clients is one root load, and BoringSSL (as bundled by grpcio) sorts
the store's whole object list at every X509_STORE_add_cert, so N roots cost N sorts
(docs/PERFORMANCE.md). sorted-insert.patch keeps the list sorted instead: each add inserts at
the position its binary search found. This builds the BoringSSL of the installed grpcio's own
source release twice, as released and patched, and times rootload.cc (grpc-core's loading loop)
against both with the same roots, alternating. rootload.cc also checks that every sampled root
still verifies and that a stranger does not, so a wrong store fails the run.

Needs g++, `patch` and the package registry (pip downloads the grpcio sdist once into the work
directory, which is kept for reruns).
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import statistics
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from bench.report import save
from bench.rootload import client_roots, orders

HERE = Path(__file__).resolve().parent
BORINGSSL = "third_party/boringssl-with-bazel"
# No assembly: the load is name comparisons and sorting, which have none; both builds agree.
CFLAGS = ["-O2", "-DOPENSSL_NO_ASM", "-DNDEBUG", "-fPIC"]
SIZES = (1000, 4000, 10000)
QUICK_SIZES = (300, 1000)  # with --quick: the build and the checks, in seconds once built
ROUNDS = 2


def _sh(*cmd: str | Path, cwd: Path | None = None) -> None:
    subprocess.run([str(c) for c in cmd], cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def _source(work: Path) -> Path:
    """The grpcio source release matching the installed grpcio, unpacked."""
    name = f"grpcio-{grpc.__version__}"
    tree = work / name
    if not tree.exists():
        sdist = work / f"{name}.tar.gz"
        if not sdist.exists():
            print(f"downloading the {name} source release (once) ...", file=sys.stderr)
            _sh(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                ":all:", "-d", work, f"grpcio=={grpc.__version__}")  # fmt: skip
        partial = work / "extracting"  # renamed when complete, as the patched tree below
        shutil.rmtree(partial, ignore_errors=True)
        try:
            with tarfile.open(sdist) as tar:
                tar.extractall(partial, filter="data")
        except tarfile.TarError:
            raise RuntimeError(f"{sdist} is unreadable; delete it to download again") from None
        (partial / name).rename(tree)
    return tree


def _compile(source: Path, root: Path, obj: Path) -> None:
    compiler, std = ("gcc", "-std=c11") if source.suffix == ".c" else ("g++", "-std=c++17")
    partial = obj.with_suffix(".part")  # an interrupted build leaves no object to reuse
    _sh(compiler, std, *CFLAGS, "-I", root / "include", "-c", source, "-o", partial)
    partial.rename(obj)


def _library(tree: Path, sources: list[str], out: Path, reuse: Path | None = None) -> Path:
    """Compile BoringSSL under ``tree`` into out/libcrypto.a; with ``reuse``, copy the objects
    of files the patch did not touch from that earlier build."""
    objs = out / "obj"
    objs.mkdir(parents=True, exist_ok=True)
    patched = set(_patched_files()) if reuse else set()
    jobs = []
    for src in sources:
        obj = objs / (src.replace("/", "_") + ".o")
        rel = src.removeprefix(BORINGSSL + "/")
        if reuse is not None and rel not in patched:
            shutil.copy(reuse / "obj" / obj.name, obj)
        elif rel in patched or not obj.exists():
            jobs.append((tree / rel, obj))
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        list(pool.map(lambda job: _compile(job[0], tree, job[1]), jobs))
    lib = out / "libcrypto.a"
    lib.unlink(missing_ok=True)
    _sh("ar", "rcs", lib, *sorted(objs.glob("*.o")))
    return lib


def _patched_files() -> list[str]:
    lines = (HERE / "sorted-insert.patch").read_text().splitlines()
    return [line.removeprefix("+++ b/") for line in lines if line.startswith("+++ b/")]


def build(work: Path) -> dict[str, Path]:
    """The rootload harness linked against BoringSSL as released and as patched."""
    sdist = _source(work)
    deps = runpy.run_path(str(sdist / "src/python/grpcio/grpc_core_dependencies.py"))
    sources = [s for s in deps["CORE_SOURCE_FILES"] if s.startswith(BORINGSSL + "/")]
    stock_tree, patched_tree = sdist / BORINGSSL, work / "boringssl-patched"
    if not patched_tree.exists():  # patched aside, then renamed: a failed patch leaves none
        partial = work / "boringssl-patching"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(stock_tree, partial)
        _sh("patch", "-s", "-p1", "-i", HERE / "sorted-insert.patch", cwd=partial)
        partial.rename(patched_tree)
    binaries = {}
    stock = _library(stock_tree, sources, work / "stock")
    patched = _library(patched_tree, sources, work / "patched", reuse=work / "stock")
    for label, tree, lib in (("stock", stock_tree, stock), ("patched", patched_tree, patched)):
        binary = binaries[label] = work / f"rootload-{label}"
        _sh("g++", "-std=c++17", "-O2", "-I", tree / "include", HERE / "rootload.cc", lib,
            "-lpthread", "-o", binary)  # fmt: skip
    return binaries


def measure(binaries: dict[str, Path], work: Path, sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    pems = client_roots(max(sizes) + 1)
    stranger = work / "stranger.pem"
    stranger.write_text(pems.pop())
    rows = []
    for n in sizes:
        arranged = orders(pems[:n])
        for order in ("sorted", "shuffled"):  # pinrpc's order and the registry's (reversed: slow)
            path = work / f"roots-{n}-{order}.pem"
            path.write_text("".join(arranged[order]))
            times: dict[str, list[float]] = {label: [] for label in binaries}
            for r in range(ROUNDS):
                for label in binaries if r % 2 == 0 else reversed(binaries):
                    done = subprocess.run(
                        [binaries[label], path, stranger], capture_output=True, text=True
                    )
                    if done.returncode != 0:
                        raise RuntimeError(f"{label} store is wrong: {done.stdout}{done.stderr}")
                    times[label].append(json.loads(done.stdout)["load_s"])
            stock, patched = (statistics.median(times[k]) for k in ("stock", "patched"))
            row: dict[str, Any] = {"roots": n, "order": order, "stock_s": round(stock, 3),
                                   "patched_s": round(patched, 3)}  # fmt: skip
            row["speedup"] = round(stock / patched, 1)  # from the unrounded medians
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"### Loading N client roots: BoringSSL of grpcio {grpc.__version__}, "
        "as released and with sorted-insert.patch",
        "",
        "| roots | order | as released s | patched s | speed-up |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['roots']:,} | {r['order']} | {r['stock_s']} | {r['patched_s']} | {r['speedup']}x |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def run(out: Path, work: Path, sizes: tuple[int, ...] = SIZES) -> int:
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = measure(build(work), work, sizes)
    except (subprocess.CalledProcessError, RuntimeError, OSError) as exc:
        print(f"scripts/bench --store-patch: {exc}", file=sys.stderr)
        return 1
    save(out, "store-patch", rows, markdown(rows))
    return 0
