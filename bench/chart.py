"""results.png: the figures of results.json as a picture (issue 5 welcomes one).

Three panels: throughput ratios to B with their quartiles and the targets (and, as diamonds, the
same as server capacity: B's server CPU per unit over the variant's), p99 latency ratios to B,
and start-up time against the number of enrolled clients. Drawn with matplotlib (in the dev
extra); without it the benchmark still writes its JSON and Markdown and says the chart was
skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Variants drawn, with what the reader should call them; absent ones (no nginx) are left out.
VARIANTS = {
    "C": "C pinrpc",
    "C-1k": "C-1k (1k clients)",
    "D": "D nginx",
    "B+auth": "B+auth",
    "B+gc": "B+gc (B, GC as C)",
    "B-twin": "B-twin (identical to B)",
}
THROUGHPUT = (  # (label, path into results["comparison"], target C/B or None)
    ("unary\ncalls/s", ("unary", "ratio_to_B"), 0.97),
    ("stream\nmessages/s", ("streaming", "ratio_to_B"), 0.97),
    ("new conns\nP-256", ("connections", "p256", "ratio_to_B"), 0.95),
    ("new conns\nRSA-2048", ("connections", "rsa2048", "ratio_to_B"), 0.95),
    ("new conns\nsustained", ("connections", "p256-sustained", "ratio_to_B"), 0.95),
)
SWEEP_LABELS = {
    "pinrpc": "inline",
    "handover": "handover",
    "handover-warm": "warm start: a recent client",
}


def _dig(tree: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for key in path:
        tree = tree.get(key, {})
    return tree


def _bars(
    ax: Any,
    groups: list[tuple[str, dict[str, Any]]],
    ylabel: str,
    capacity: list[dict[str, float]] | None = None,
) -> None:
    """Grouped bars: one group per workload, one bar per variant, whiskers at the quartiles;
    ``capacity`` (per group: variant -> B's server CPU per unit over its own) as diamonds."""
    names = [v for v in VARIANTS if any(v in ratios for _, ratios in groups)]
    width = 0.8 / max(len(names), 1)
    cap_xs: list[float] = []
    cap_ys: list[float] = []
    for i, name in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for g, (_, ratios) in enumerate(groups):
            if name in ratios:
                r = ratios[name]
                xs.append(g + (i - (len(names) - 1) / 2) * width)
                ys.append(r["median"])
                lo.append(r["median"] - r["q1"])
                hi.append(r["q3"] - r["median"])
                if capacity and name in capacity[g]:
                    cap_xs.append(xs[-1])
                    cap_ys.append(capacity[g][name])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=VARIANTS[name])
    if cap_xs:
        ax.plot(cap_xs, cap_ys, "kD", markersize=4, label="capacity (B/C server CPU)")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), [label for label, _ in groups])
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=5)


def draw(results: dict[str, Any], path: Path) -> str | None:
    """Write the chart to ``path``; return why it was skipped, or None if it was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: render straight to a file
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    cmp = results.get("comparison", {})
    fig, (through, latency, startup) = plt.subplots(
        1, 3, figsize=(17, 5), gridspec_kw={"width_ratios": [1.6, 1, 1]}
    )
    groups = [(label, _dig(cmp, keys)) for label, keys, _ in THROUGHPUT]
    capacity = [
        {v: 1 / r for v, r in _dig(cmp, (*keys[:-1], "server_cpu_ratio_to_B")).items() if r}
        for _, keys, _ in THROUGHPUT
    ]
    _bars(through, groups, "ratio to B (median, quartiles); higher is better", capacity)
    for g, (_, _, target) in enumerate(THROUGHPUT):
        through.plot([g - 0.45, g + 0.45], [target, target], "r--", linewidth=1)
    through.set_title("Throughput against bare grpcio mTLS (B); red: target")
    lat = cmp.get("latency", {})
    _bars(latency, [("p50", lat.get("p50_ratio_to_B", {})), ("p99", lat.get("p99_ratio_to_B", {}))],
          "ratio to B (median, quartiles); lower is better")  # fmt: skip
    latency.plot([0.55, 1.45], [1.1, 1.1], "r--", linewidth=1)
    latency.set_title(f"Latency at {lat.get('offered_rate', 0):.0f} calls/s offered; red: target")
    for key, label in SWEEP_LABELS.items():
        rows = [r for r in results.get("scale", {}).get(key, []) if "startup_s" in r]
        if rows:
            startup.plot([r["enrolled"] for r in rows], [r["startup_s"] for r in rows], "o-",
                         label=label)  # fmt: skip
    warm = [r for r in results.get("scale", {}).get("handover-warm", []) if "all_clients_s" in r]
    if warm:
        startup.plot([r["enrolled"] for r in warm], [r["all_clients_s"] for r in warm], "x",
                     markersize=9, label="warm start: every client")  # fmt: skip
    startup.axhline(5.0, color="red", linestyle="--", linewidth=1, label="target")
    startup.set_xscale("log")
    startup.set_yscale("log")
    startup.set_xlabel("enrolled clients")
    startup.set_ylabel("start-up to first call, s")
    startup.set_title("Start-up to a client's first call")
    startup.legend(fontsize="small")
    machine = results.get("machine", {})
    fig.suptitle(
        f"pinrpc benchmark, {results.get('plan', {}).get('mode', '?')} mode, "
        f"{results.get('duration_s', 0):.0f} s; {machine.get('cpu', '')}",
        fontsize="medium",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None
