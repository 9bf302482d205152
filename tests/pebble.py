"""Run Debian's pebble (Let's Encrypt's ACME test server) for tests and demos.

Not a test module: tests import `start_pebble` and `pebble_binary` from here.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from server.devca import DevCA
from tests.ports import free_port

# Bounded waits: pebble is up in well under a second here; 15 s absorbs a slow CI box.
_START_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Pebble:
    directory_url: str
    # CA that signed pebble's own HTTPS certificate: pass it as the ACME client's CA bundle.
    acme_ca_bundle: Path
    # Root that signs the certificates pebble issues; new on every start.
    root_pem: bytes
    root_path: Path
    # Intermediate(s) as served at /intermediates/0 (issued chains already include them).
    intermediate_pem: bytes
    log_path: Path


def pebble_binary() -> str | None:
    """Path of the pebble binary (Debian package `pebble` puts it in /usr/bin), or None."""
    found = shutil.which("pebble")
    if found is None and os.access("/usr/bin/pebble", os.X_OK):
        found = "/usr/bin/pebble"
    return found


def _write_tls_material(tmp_dir: Path) -> tuple[Path, Path, Path]:
    """Throwaway CA + leaf for pebble's HTTPS endpoints (127.0.0.1 and localhost)."""
    ca = DevCA("pinrpc test pebble TLS CA")
    cert_path, key_path = ca.issue(["localhost", "127.0.0.1"], days=1).write(tmp_dir / "tls")
    ca_path = tmp_dir / "pebble-tls-ca.pem"
    ca_path.write_bytes(ca.root_pem)
    return ca_path, cert_path, key_path


def _https_get(url: str, ca_path: Path, timeout: float) -> bytes:
    context = ssl.create_default_context(cafile=str(ca_path))
    # An empty ProxyHandler ignores *_proxy variables: pebble is on loopback, never proxied.
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    with opener.open(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def _wait_ready(
    process: subprocess.Popen[bytes], directory_url: str, ca_path: Path, log_path: Path
) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"pebble exited with code {process.returncode} during start; see {log_path}"
            )
        try:
            _https_get(directory_url, ca_path, timeout=1.0)
            return
        except (urllib.error.URLError, OSError) as exc:
            last_error = exc
            time.sleep(0.05)
    raise RuntimeError(
        f"pebble did not answer {directory_url} within {_START_TIMEOUT_S:.0f} s "
        f"({last_error}); see {log_path}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def _spawn(
    argv: list[str], env: dict[str, str], log_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
        )
        try:
            yield process
        finally:
            _stop(process)


def _wait_port(port: int, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{log_path.stem} exited during start; see {log_path}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{log_path.stem} did not listen on 127.0.0.1:{port}; see {log_path}")


@contextmanager
def start_pebble(tmp_dir: Path, *, http01_port: int | None = None) -> Iterator[Pebble]:
    """Start pebble on free 127.0.0.1 ports, yield how to use it, and always stop it.

    By default every challenge is accepted without contacting anyone (PEBBLE_VA_ALWAYS_VALID=1),
    so test names such as server.test need no DNS and no reachable HTTP-01 responder.
    With http01_port, pebble really validates HTTP-01 at 127.0.0.1:http01_port: its resolver
    is pebble-challtestsrv (same Debian package), which answers every A query with 127.0.0.1.
    """
    binary = pebble_binary()
    if binary is None:
        raise FileNotFoundError("pebble not found on PATH; install it: apt-get install -y pebble")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = _write_tls_material(tmp_dir)
    acme_port, mgmt_port = free_port(), free_port()
    config = {
        "pebble": {
            "listenAddress": f"127.0.0.1:{acme_port}",
            "managementListenAddress": f"127.0.0.1:{mgmt_port}",
            "certificate": str(cert_path),
            "privateKey": str(key_path),
            # Ports pebble's validator dials on the name being validated.
            "httpPort": http01_port if http01_port is not None else free_port(),
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
    }
    config_path = tmp_dir / "pebble-config.json"
    config_path.write_text(json.dumps(config, indent=2))
    env = {
        **os.environ,
        "PEBBLE_VA_NOSLEEP": "1",  # no random 0-15 s delay before validating
        "PEBBLE_WFE_NONCEREJECT": "0",  # no random badNonce rejections (default 5 %)
        # Fresh authorizations for an account's new order, but not always: pebble still reuses
        # a valid one 1 % of the time (`rand.Intn(100) > percent`). A test that needs a
        # challenge answered must order with a new account.
        "PEBBLE_AUTHZREUSE": "0",
    }
    argv = [binary, "-config", str(config_path)]
    log_path = tmp_dir / "pebble.log"
    directory_url = f"https://127.0.0.1:{acme_port}/dir"
    with ExitStack() as stack:
        if http01_port is None:
            env["PEBBLE_VA_ALWAYS_VALID"] = "1"
        else:
            dns_port = free_port()
            dns = stack.enter_context(
                _spawn(
                    [
                        str(Path(binary).with_name("pebble-challtestsrv")),
                        *("-dns01", f"127.0.0.1:{dns_port}"),
                        *("-management", f"127.0.0.1:{free_port()}"),
                        *("-http01", "", "-https01", "", "-tlsalpn01", ""),
                        # No AAAA answers: the responder listens on 127.0.0.1 only.
                        *("-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""),
                    ],
                    dict(os.environ),
                    tmp_dir / "pebble-challtestsrv.log",
                )
            )
            _wait_port(dns_port, dns, tmp_dir / "pebble-challtestsrv.log")
            argv += ["-dnsserver", f"127.0.0.1:{dns_port}"]
        process = stack.enter_context(_spawn(argv, env, log_path))
        _wait_ready(process, directory_url, ca_path, log_path)
        mgmt = f"https://127.0.0.1:{mgmt_port}"
        root_pem = _https_get(f"{mgmt}/roots/0", ca_path, timeout=5.0)
        intermediate_pem = _https_get(f"{mgmt}/intermediates/0", ca_path, timeout=5.0)
        root_path = tmp_dir / "pebble-root.pem"
        root_path.write_bytes(root_pem)
        yield Pebble(
            directory_url=directory_url,
            acme_ca_bundle=ca_path,
            root_pem=root_pem,
            root_path=root_path,
            intermediate_pem=intermediate_pem,
            log_path=log_path,
        )
