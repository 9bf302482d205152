"""Where the trust-set time goes: grpcio loading N client roots into one TLS context.

Measures ``server.add_secure_port`` (which builds the SSL context and loads the roots) for N
self-signed client certificates given in three orders: sorted by subject the way BoringSSL
compares names, shuffled (what a registry in enrollment order looks like) and reversed. A
thread ticking every 5 ms runs alongside and reports its longest gap, which shows whether the
load holds the GIL (it does not: the load can run off the request path).
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
        creds = grpc.ssl_server_credentials(
            [(key_pem, chain_pem)],
            root_certificates="".join(roots).encode(),
            require_client_auth=True,
        )
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


def measure(sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    issued = DevCA("pinrpc rootload CA").issue(["server.test"])
    key_pem, chain_pem = key_to_pem(issued.key), issued.fullchain_pem
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
