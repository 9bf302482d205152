"""A certificate from a real ACME CA (pebble): served, verified by clients, renewed under load."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest

from client import cli as client_cli
from pinrpc.channel import secure_channel
from pinrpc.cli import Exit
from pinrpc.v1 import echo_pb2, echo_pb2_grpc
from server.acme import obtain_certificate
from server.app import RunningServer, start_server
from server.config import ServerConfig
from server.devca import DevCA
from tests.certs import certbot_link
from tests.conftest import MakeClient, enroll, eventually
from tests.pebble import Pebble
from tests.test_server_cert import served_serial

NAME = "server.test"


def obtain(pebble: Pebble, out: Path) -> tuple[Path, Path, int]:
    result = obtain_certificate(
        pebble.directory_url, [NAME], out, http_port=0, acme_ca_bundle=pebble.acme_ca_bundle
    )
    return result.fullchain, result.privkey, result.serial


def cli_flags(running: RunningServer, files_cert: Path, files_key: Path, ca: Path) -> list[str]:
    return ["--server", f"127.0.0.1:{running.port}", "--cert", str(files_cert),
            "--key", str(files_key), "--ca", str(ca), "--server-name", NAME]  # fmt: skip


def test_acme_certificate_verifies_with_pebble_root_only(
    pebble: Pebble,
    registry: Path,
    make_client: MakeClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cert, key, _ = obtain(pebble, tmp_path / "acme")
    alice = make_client("alice")
    enroll(registry, alice.cert_path, "alice")
    config = ServerConfig("127.0.0.1:0", cert, key, str(registry))
    with start_server(config) as running:
        flags = cli_flags(running, alice.cert_path, alice.key_path, pebble.root_path)
        capsys.readouterr()
        assert client_cli.main(["whoami", "--json", *flags]) == Exit.OK
        assert '"name": "alice"' in capsys.readouterr().out

        wrong_name = [*flags[:-1], "other.test"]
        assert client_cli.main(["whoami", *wrong_name]) == Exit.CONNECT
        assert "could not verify the server" in capsys.readouterr().err

        other_root = tmp_path / "other-root.pem"
        other_root.write_bytes(DevCA("not pebble").root_pem)
        ca_at = flags.index("--ca") + 1
        flags[ca_at] = str(other_root)
        assert client_cli.main(["whoami", *flags]) == Exit.CONNECT
        assert "could not verify the server" in capsys.readouterr().err


def test_renewal_under_load_drops_no_call(
    pebble: Pebble, registry: Path, make_client: MakeClient, tmp_path: Path
) -> None:
    live = tmp_path / "letsencrypt" / "live" / NAME
    cert, key, first_serial = obtain(pebble, tmp_path / "order1")
    certbot_link(live, cert, key, 1)
    alice = make_client("alice")
    enroll(registry, alice.cert_path, "alice", "/pinrpc.v1.Echo/*")
    config = ServerConfig(
        "127.0.0.1:0", live / "fullchain.pem", live / "privkey.pem", str(registry)
    )
    with start_server(config) as running:
        target = f"127.0.0.1:{running.port}"
        channel = secure_channel(target, alice.cert_path, alice.key_path, pebble.root_path, NAME)
        stub = echo_pb2_grpc.EchoStub(channel)
        ok, failed = 0, []
        stop = threading.Event()

        def load() -> None:
            nonlocal ok
            deadline = time.monotonic() + 60  # bounded even if the renewal hangs
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    stub.Echo(echo_pb2.EchoRequest(message="x"), timeout=5)
                    ok += 1
                except grpc.RpcError as exc:
                    failed.append(exc)

        worker = threading.Thread(target=load)
        worker.start()
        try:
            time.sleep(0.5)
            cert2, key2, second_serial = obtain(pebble, tmp_path / "order2")
            certbot_link(live, cert2, key2, 2)
            # Keep calling across the swap and the reload (the poll's, however late a loaded
            # machine runs it), and on after it.
            eventually(lambda: served_serial(running.port, alice) == second_serial, timeout=10)
            reloaded = ok
            eventually(lambda: ok >= reloaded + 20, timeout=10)
        finally:
            stop.set()
            worker.join()
        assert failed == []
        assert ok > 50
        assert second_serial != first_serial
        assert served_serial(running.port, alice) == second_serial
        # The channel opened before the renewal still works.
        assert stub.Echo(echo_pb2.EchoRequest(message="after"), timeout=5).message == "after"
        channel.close()
