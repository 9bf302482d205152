"""A renewal whose CA hands back a chain the server cannot serve over the current one: found
in review. Real pebble behind tests/test_acme_hostile_ca.py's HTTPS proxy."""

from __future__ import annotations

import datetime as dt
import http.server
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server.acme import main
from server.server_cert import load_server_cert
from tests.https import serving_https
from tests.pebble import Pebble
from tests.test_acme import _assert_one_line_error
from tests.test_acme_deadline import _snapshot
from tests.test_acme_hostile_ca import ChainTamper, _obtain, _proxy


def _stranger_ca(rest: list[x509.Certificate]) -> list[x509.Certificate]:
    """An intermediate named like the real one but with another key: it did not issue the leaf."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = rest[0].subject if rest else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    ca = (
        x509.CertificateBuilder(name, name, key.public_key(), x509.random_serial_number(),
                                now - dt.timedelta(days=1), now + dt.timedelta(days=900))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return [ca]


@pytest.mark.parametrize(
    ("after", "said"),
    [
        (lambda rest: [], "without the intermediate"),
        (_stranger_ca, "whose chain holds no certificate that issued it"),
    ],
    ids=["intermediate-dropped", "another-intermediate"],
)
def test_a_renewal_whose_chain_the_server_would_refuse_changes_nothing(
    pebble: Pebble,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    after: ChainTamper,
    said: str,
) -> None:
    out = tmp_path / "out"
    assert _obtain(pebble.directory_url, pebble.acme_ca_bundle, out) == 0  # the current pair
    load_server_cert(out / "fullchain.pem", out / "privkey.pem")  # served now
    before = _snapshot(out)
    capsys.readouterr()
    with _proxy(pebble, lambda leaf: leaf, tmp_path, after) as (url, ca):
        code = _obtain(url, ca, out)
    err = capsys.readouterr().err
    assert code == 1, err
    _assert_one_line_error(err, said, "the previous files are unchanged")
    assert _snapshot(out) == before


@pytest.mark.parametrize("status", [404, 502, 503])
def test_a_ca_down_behind_its_proxy_says_retry_not_check_the_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], status: int
) -> None:
    """A CDN's HTML error page during a CA outage is no reason to change a correct URL; a 404
    (the wrong path) still is."""

    class Down(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html>Service Temporarily Unavailable</html>"
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    out = tmp_path / "out"
    with serving_https(Down, tmp_path, "ca") as (port, ca):
        argv = ["--directory", f"https://127.0.0.1:{port}/dir", "--domain", "server.test"]
        code = main([*argv, "--out", str(out), "--ca-bundle", str(ca)])
    assert code == 1
    err = capsys.readouterr().err
    if status == 404:
        _assert_one_line_error(err, "HTTP 404", "check that the URL is an ACME directory")
    else:
        _assert_one_line_error(err, f"unavailable (HTTP {status})", "retry later")
        assert "check that the URL" not in err
    assert not out.exists()
