"""A renewal whose CA (or something between obtain-cert and it) hands back a certificate the
server must not serve: real pebble behind a real HTTPS proxy that swaps the issued leaf."""

from __future__ import annotations

import datetime as dt
import http.client
import http.server
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server.acme import main
from tests.https import serving_https
from tests.pebble import Pebble
from tests.ports import free_port
from tests.test_acme import _assert_one_line_error
from tests.test_acme_deadline import _snapshot

_CHAIN = "application/pem-certificate-chain"
Tamper = Callable[[x509.Certificate], x509.Certificate]
ChainTamper = Callable[[list[x509.Certificate]], list[x509.Certificate]]


def _reissued(leaf: x509.Certificate, names: list[str], not_after: dt.datetime) -> x509.Certificate:
    """A leaf for the issued one's key (so the key check passes), with other names or dates."""
    signer = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(leaf.issuer)
        .public_key(leaf.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_after - dt.timedelta(days=30))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .sign(signer, hashes.SHA256())
    )


@contextmanager
def _proxy(
    pebble: Pebble, tamper: Tamper, tmp: Path, after: ChainTamper = list
) -> Iterator[tuple[str, Path]]:
    """HTTPS in front of pebble, passing Host through (pebble builds its URLs and checks the
    JWS url from it), with the leaf of every certificate chain it returns replaced (and the
    certificates after it by ``after``)."""
    host, port = pebble.directory_url.split("/")[2].split(":")
    upstream_tls = ssl.create_default_context(cafile=str(pebble.acme_ca_bundle))

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            upstream = http.client.HTTPSConnection(
                host, int(port), context=upstream_tls, timeout=10
            )
            try:
                upstream.request(self.command, self.path, body, dict(self.headers))
                answer = upstream.getresponse()
                data = answer.read()
            finally:
                upstream.close()
            if answer.getheader("Content-Type", "").startswith(_CHAIN):
                leaf, *rest = x509.load_pem_x509_certificates(data)
                swapped = [tamper(leaf), *after(rest)]
                data = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in swapped)
            self.send_response(answer.status)
            for name, value in answer.getheaders():
                if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_HEAD = _forward

        def log_message(self, format: str, *args: object) -> None:
            pass

    with serving_https(Handler, tmp, "proxy") as (listening, ca):
        yield f"https://127.0.0.1:{listening}/dir", ca


def _obtain(url: str, ca: Path, out: Path) -> int:
    argv = ["--directory", url, "--domain", "server.test", "--out", str(out)]
    # Loopback only: 0.0.0.0 would collide with any address's use of the port picked.
    port = ["--http-host", "127.0.0.1", "--http-port", str(free_port())]
    return main([*argv, *port, "--ca-bundle", str(ca)])


def _other_key(leaf: x509.Certificate) -> x509.Certificate:
    stranger = x509.CertificateBuilder(
        leaf.issuer, leaf.subject, ec.generate_private_key(ec.SECP256R1()).public_key(),
        leaf.serial_number, leaf.not_valid_before_utc, leaf.not_valid_after_utc,
        list(leaf.extensions),
    )  # fmt: skip
    return stranger.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())


def _in_a_year() -> dt.datetime:
    return dt.datetime.now(dt.UTC) + dt.timedelta(days=365)


@pytest.mark.parametrize(
    ("tamper", "said"),
    [
        (lambda leaf: _reissued(leaf, ["other.test"], _in_a_year()), "not for server.test"),
        (
            lambda leaf: _reissued(leaf, ["server.test"], dt.datetime.now(dt.UTC)),
            "not valid now",
        ),
        (
            lambda leaf: _reissued(leaf, ["server.test"], _in_a_year() - dt.timedelta(days=300)),
            "check this machine's clock",
        ),
        (lambda leaf: _other_key(leaf), "for a different key"),
        (lambda leaf: _reissued(leaf, ["\x1b[2Jx.test"], _in_a_year()), "'\\x1b[2jx.test'"),
    ],
    ids=["another-name", "expired", "not-yet-valid", "another-key", "escape-in-name"],
)
def test_a_renewal_that_returns_an_unusable_certificate_changes_nothing(
    pebble: Pebble,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tamper: Tamper,
    said: str,
) -> None:
    out = tmp_path / "out"
    assert _obtain(pebble.directory_url, pebble.acme_ca_bundle, out) == 0  # the current pair
    before = _snapshot(out)
    capsys.readouterr()
    with _proxy(pebble, tamper, tmp_path) as (url, ca):
        code = _obtain(url, ca, out)
    err = capsys.readouterr().err
    assert code == 1, err
    _assert_one_line_error(err, said, "the previous files are unchanged")
    assert "\x1b" not in err
    assert _snapshot(out) == before


def test_the_proxy_passes_a_good_certificate_through(pebble: Pebble, tmp_path: Path) -> None:
    """The allow beside the denials: the same proxy, leaving the leaf alone, renews."""
    out = tmp_path / "out"
    with _proxy(pebble, lambda leaf: leaf, tmp_path) as (url, ca):
        assert _obtain(url, ca, out) == 0
    leaf = x509.load_pem_x509_certificates((out / "fullchain.pem").read_bytes())[0]
    assert leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName) == ["server.test"]
