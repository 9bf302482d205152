"""The side ports know a caller only by its address, and one IPv6 host usually holds a whole
/64: each of its addresses counted as a host of its own, with its own share of the workers.
Reproduced for real in a network namespace whose loopback carries several addresses of one
/64 (needs root and util-linux's unshare)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from server import request_watch
from tests.conftest import ServerFiles, require_tool
from tests.security.attacker import ROOT, require_attack_modules

SETUP = "ip link set lo up && for a in {addresses}; do ip -6 addr add $a/128 dev lo nodad; done"


def in_namespace(devca: ServerFiles, registry: Path, sources: list[str]) -> dict[str, object]:
    """tests/security/ipv6_hosts.py's outcome, run in a new network namespace."""
    require_attack_modules()
    found = os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip")
    require_tool(bool(found), "root with unshare and ip", "run as root; apt-get install iproute2")
    script = SETUP.format(addresses=" ".join(sources)) + ' && exec "$@"'
    module = [sys.executable, "-m", "tests.security.ipv6_hosts"]
    argv = [*module, str(devca.cert), str(devca.key), str(registry), *sources]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's code first
    done = subprocess.run(
        ["unshare", "--net", "sh", "-c", script, "sh", *argv],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=env, check=False,
    )  # fmt: skip
    if done.returncode and "unshare failed" in done.stderr:
        require_tool(False, "a network namespace", "unshare --net: " + done.stderr.strip())
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_the_addresses_of_one_ipv6_host_share_one_limit(devca: ServerFiles, registry: Path) -> None:
    """Four addresses of 2001:db8::/64 withhold a health check each: as one caller, three are
    refused or ended, and the probe from ::1, another /64 and so another caller, is answered
    within GRACE + 2 s. Before, each address had a limit of its own: the attacker kept both
    workers, and the probe waited until it left."""
    outcome = in_namespace(devca, registry, [f"2001:db8::{i}" for i in range(1, 5)])
    assert outcome["probe"] == "1"  # SERVING
    assert float(str(outcome["seconds"])) < request_watch.GRACE + 2
    assert outcome["attacker"] == ["8"] * 3  # RESOURCE_EXHAUSTED; one call kept
