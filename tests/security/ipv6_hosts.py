"""Run inside a network namespace (tests/security/test_ipv6_hosts.py): a server whose health
port listens on [::1], an attacker withholding one Check from each of several addresses of one
IPv6 /64, and a probe from ::1 (another /64). Prints the outcome as JSON.

    python -m tests.security.ipv6_hosts CERT KEY REGISTRY SOURCE...
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from server.app import start_server
from server.config import ServerConfig
from tests.security.test_withheld_requests import withheld_raw
from tests.test_health import check


def main(argv: list[str]) -> None:
    cert, key, registry, *sources = argv
    config = ServerConfig("127.0.0.1:0", Path(cert), Path(key), registry, health_listen="[::1]:0")
    with start_server(config) as running, ThreadPoolExecutor(len(sources)) as pool:
        address = ("::1", running.health_port or 0)
        method = "/grpc.health.v1.Health/Check"
        attacks = [pool.submit(withheld_raw, address, source, method, 1) for source in sources]
        time.sleep(0.3)  # the attacker's calls hold both workers, and more wait for one
        with grpc.insecure_channel(f"[::1]:{address[1]}") as probe:
            started = time.monotonic()
            try:
                outcome = str(check(probe))
            except grpc.RpcError as exc:
                outcome = exc.code().name
            seconds = time.monotonic() - started
        statuses = [status for attack in attacks for status in attack.result(timeout=30)]
    print(json.dumps({"probe": outcome, "seconds": seconds, "attacker": statuses}))


if __name__ == "__main__":
    main(sys.argv[1:])
