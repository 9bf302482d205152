"""How long the registry takes to find a client by name, and by fingerprint, at 10,000 clients.

    PYTHONPATH=CHECKOUT python -m bench.registry_lookup [--clients N] [--lookups N] [--postgres]

Run it with PYTHONPATH at two checkouts to compare them: every run makes fresh registries with
the schema of the code it runs. The rows are
copies of one real enrollment under other names and fingerprints, written in one statement
(enrolling 10,000 one by one re-reads every row each time). PostgreSQL is ANALYZEd after the bulk
copy, as its autovacuum would do for a registry that grew over time; SQLite, like pinrpc, is not.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pinrpc.identity import create_identity
from server.enrollment import check_certificate
from server.registry import is_postgres, open_registry
from server.registry_schema import COLUMNS


def _copy(fingerprint: str, series: str) -> str:
    """Copy the one real row ('c0') as c1, c2, ... with made-up fingerprints."""
    columns = "cert_pem, spki_sha256, subject, has_key_ids, allowed_methods, enrolled_at"
    return (
        f"INSERT INTO clients ({COLUMNS}) SELECT 'c' || i, {fingerprint}, {columns}, "  # noqa: S608
        f"not_after, NULL, NULL FROM {series}, clients WHERE clients.name = 'c0'"
    )


SQLITE_COPY = _copy(
    "printf('%064x', i)",
    "(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) "
    "SELECT i FROM n) AS n",
)
POSTGRES_COPY = _copy("lpad(to_hex(i), 64, '0')", "generate_series(1, %s) AS i")


def populate(spec: str, clients: int, keys: Path) -> None:
    files = create_identity("c0", keys, force=True)
    registry = open_registry(spec)
    try:
        registry.enroll(check_certificate(files.cert_path.read_bytes(), "c0"), "c0", [])
    finally:
        registry.close()
    if is_postgres(spec):
        import psycopg

        with psycopg.connect(spec, autocommit=True) as conn:
            conn.execute(POSTGRES_COPY.encode(), (clients - 1,))
            conn.execute("ANALYZE clients")
    else:
        import sqlite3

        with sqlite3.connect(spec) as db:
            db.execute(SQLITE_COPY, (clients - 1,))
        db.close()


def timed(lookup: Callable[[str], object], refs: list[str]) -> tuple[float, float]:
    """Median and 90th percentile, in milliseconds."""
    times = []
    for ref in refs:
        start = time.perf_counter()
        lookup(ref)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), statistics.quantiles(times, n=10)[-1]


def measure(spec: str, clients: int, lookups: int) -> None:
    registry = open_registry(spec, create=False)
    try:
        picks = random.Random(1).sample(range(clients), min(lookups, clients))
        names = [f"c{i}" for i in picks]
        fingerprints = [registry.find(name).fingerprint.hex for name in names[:5]] * (
            len(names) // 5
        )
        kind = "postgresql" if is_postgres(spec) else "sqlite"
        for what, refs in (("name", names), ("fingerprint", fingerprints)):
            median, p90 = timed(registry.find, refs)
            print(f"{kind:<10}  {clients:>6} clients  find by {what:<11}  "
                  f"median {median:.3f} ms  p90 {p90:.3f} ms")  # fmt: skip
    finally:
        registry.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--lookups", type=int, default=500)
    parser.add_argument("--postgres", action="store_true", help="also a throwaway PostgreSQL 15")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = str(Path(tmp) / "registry.db")
        populate(sqlite, args.clients, Path(tmp) / "keys")
        measure(sqlite, args.clients, args.lookups)
        if args.postgres:
            from tests.postgres import running_postgres

            with running_postgres() as cluster:
                url = cluster.create_database("lookup")
                populate(url, args.clients, Path(tmp) / "keys")
                measure(url, args.clients, args.lookups)


if __name__ == "__main__":
    main()
