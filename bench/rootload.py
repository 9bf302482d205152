"""Where the trust-set time goes: grpcio loading N client roots into one TLS context.

Measures ``server.add_secure_port`` (which builds the SSL context and loads the roots) for N
self-signed client certificates given in three orders: sorted by subject the way BoringSSL
compares names, shuffled (what a registry in enrollment order looks like) and reversed. A
thread ticking every 5 ms runs alongside and reports its longest gap, which shows whether the
load holds the GIL (it does not: the load can run off the request path).

``sharded`` measures the "shard by port" design that docs/PERFORMANCE.md proposes: the same roots
split over K listeners, one TLS context each, loaded in parallel.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from pinrpc.identity import cert_to_pem, generate_key, key_to_pem, self_signed_certificate
from server.devca import DevCA
from server.trust import subject_order


def _credentials(key_pem: bytes, chain_pem: bytes, roots: list[str]) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(key_pem, chain_pem)], root_certificates="".join(roots).encode(), require_client_auth=True
    )


def _load(key_pem: bytes, chain_pem: bytes, roots: list[str]) -> tuple[float, float]:
    gaps: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        last = time.perf_counter()
        while not stop.wait(0.005):
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = threading.Thread(target=tick, daemon=True)
    with ThreadPoolExecutor(1) as executor:
        server = grpc.server(executor)
        creds = _credentials(key_pem, chain_pem, roots)
        ticker.start()
        start = time.perf_counter()
        server.add_secure_port("127.0.0.1:0", creds)
        took = time.perf_counter() - start
        stop.set()
        ticker.join()
        server.stop(None)
    return took, max(gaps, default=0.0)


def client_roots(count: int) -> list[str]:
    """``count`` self-signed client certificates (PEM) as pinrpc's CLI makes them."""
    return [
        cert_to_pem(self_signed_certificate(generate_key("p256"), f"c{i:05d}")).decode()
        for i in range(count)
    ]


def orders(pems: list[str]) -> dict[str, list[str]]:
    """The roots sorted the way BoringSSL compares subjects, shuffled, and reversed."""
    ordered = sorted(pems, key=subject_order)
    shuffled = list(ordered)
    random.Random(len(pems)).shuffle(shuffled)
    return {"sorted": ordered, "shuffled": shuffled, "reversed": ordered[::-1]}


def _server_pair() -> tuple[bytes, bytes]:
    issued = DevCA("pinrpc rootload CA").issue(["server.test"])
    return key_to_pem(issued.key), issued.fullchain_pem


def measure(sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    key_pem, chain_pem = _server_pair()
    pems = client_roots(max(sizes, default=0))
    out = []
    for n in sizes:
        row: dict[str, Any] = {"roots": n}
        for label, roots in orders(pems[:n]).items():
            took, gap = _load(key_pem, chain_pem, roots)
            row[f"{label}_s"] = round(took, 3)
            row[f"{label}_max_tick_gap_ms"] = round(1000 * gap, 1)
        out.append(row)
    return out


def shares(pems: list[str], k: int) -> list[list[str]]:
    """``pems`` dealt over ``k`` listeners, each share in the faster, sorted order."""
    ordered = sorted(pems, key=subject_order)
    return [ordered[i::k] for i in range(k)]


def sharded(pems: list[str], listeners: tuple[int, ...]) -> list[dict[str, Any]]:
    """Seconds until K listeners, listener i trusting every K-th root from the i-th on, have all
    loaded their shares in parallel threads (the load releases the GIL), for each K in
    ``listeners``. K = 1 is one TLS context with every root, measured in the same run."""
    key_pem, chain_pem = _server_pair()
    out = []
    for k in listeners:
        dealt = shares(pems, k)
        with ThreadPoolExecutor(k) as executor:
            servers = [grpc.server(executor) for _ in range(k)]

            def add(
                i: int, servers: list[grpc.Server] = servers, dealt: list[list[str]] = dealt
            ) -> None:
                creds = _credentials(key_pem, chain_pem, dealt[i])
                servers[i].add_secure_port("127.0.0.1:0", creds)

            threads = [threading.Thread(target=add, args=(i,)) for i in range(k)]
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            took = time.perf_counter() - start
            for server in servers:
                server.stop(None)
        row = {"roots": len(pems), "listeners": k, "roots_per_listener": len(dealt[0])}
        out.append(row | {"parallel_s": round(took, 3)})
    return out
