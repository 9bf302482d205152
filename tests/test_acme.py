"""ACME issuance against a real pebble: server.acme.obtain_certificate and the obtain-cert CLI."""

from __future__ import annotations

import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store

from server.acme import AcmeError, ObtainResult, main, obtain_certificate
from tests.conftest import require_pebble
from tests.pebble import Pebble, start_pebble


@pytest.fixture(scope="module")
def validating_pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pebble, int]]:
    """A pebble that really fetches http://<name>:PORT/.well-known/acme-challenge/<token>."""
    require_pebble()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    with start_pebble(tmp_path_factory.mktemp("pebble-va"), http01_port=port) as running:
        yield running, port


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _verify(fullchain: Path, root_pem: bytes, name: str) -> x509.Certificate:
    """Verify like a WebPKI client would: leaf + served intermediates up to pebble's root."""
    leaf, *intermediates = x509.load_pem_x509_certificates(fullchain.read_bytes())
    verifier = (
        PolicyBuilder()
        .store(Store([x509.load_pem_x509_certificate(root_pem)]))
        .build_server_verifier(x509.DNSName(name))
    )
    verifier.verify(leaf, intermediates)
    return leaf


def _assert_one_line_error(err: str, *fragments: str) -> None:
    assert err.startswith("obtain-cert: error: ")
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def test_issues_certificate_that_verifies_to_pebble_root(pebble: Pebble, tmp_path: Path) -> None:
    result = obtain_certificate(
        pebble.directory_url,
        ["server.test"],
        tmp_path,
        http_port=_free_port(),
        acme_ca_bundle=pebble.acme_ca_bundle,
    )

    assert result.privkey == tmp_path / "privkey.pem"
    assert stat.S_IMODE(result.privkey.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "account.key").stat().st_mode) == 0o600
    leaf = _verify(result.fullchain, pebble.root_pem, "server.test")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["server.test"]
    assert leaf.serial_number == result.serial
    assert leaf.not_valid_after_utc == result.not_after
    assert result.not_after.tzinfo is not None
    # cert.pem + chain.pem are fullchain.pem split, as certbot writes them.
    assert result.cert.read_bytes() + result.chain.read_bytes() == result.fullchain.read_bytes()
    assert x509.load_pem_x509_certificate(result.cert.read_bytes()) == leaf
    key = serialization.load_pem_private_key(result.privkey.read_bytes(), password=None)
    assert key.public_key() == leaf.public_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"


def test_leaf_does_not_verify_for_another_name(pebble: Pebble, tmp_path: Path) -> None:
    result = obtain_certificate(
        pebble.directory_url,
        ["server.test"],
        tmp_path,
        http_port=_free_port(),
        acme_ca_bundle=pebble.acme_ca_bundle,
    )
    with pytest.raises(x509.verification.VerificationError):
        _verify(result.fullchain, pebble.root_pem, "other.test")


def test_second_issuance_has_new_serial_and_new_key(pebble: Pebble, tmp_path: Path) -> None:
    def issue() -> ObtainResult:
        return obtain_certificate(
            pebble.directory_url,
            ["server.test"],
            tmp_path,
            http_port=_free_port(),
            acme_ca_bundle=pebble.acme_ca_bundle,
        )

    first = issue()
    first_key = first.privkey.read_bytes()
    account_key = (tmp_path / "account.key").read_bytes()
    # The second call finds account.key and reuses the registered account.
    second = issue()

    assert second.serial != first.serial
    assert second.privkey.read_bytes() != first_key
    assert (tmp_path / "account.key").read_bytes() == account_key
    _verify(second.fullchain, pebble.root_pem, "server.test")
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_several_domains_and_rsa_key(pebble: Pebble, tmp_path: Path) -> None:
    result = obtain_certificate(
        pebble.directory_url,
        ["server.test", "API.Server.Test."],
        tmp_path,
        http_port=_free_port(),
        acme_ca_bundle=pebble.acme_ca_bundle,
        key_type="rsa2048",
    )
    leaf = _verify(result.fullchain, pebble.root_pem, "api.server.test")
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == ["api.server.test", "server.test"]


def test_http01_responder_answers_real_validation(
    validating_pebble: tuple[Pebble, int], tmp_path: Path
) -> None:
    pebble, port = validating_pebble
    result = obtain_certificate(
        pebble.directory_url,
        ["server.test"],
        tmp_path,
        http_port=port,
        acme_ca_bundle=pebble.acme_ca_bundle,
    )
    _verify(result.fullchain, pebble.root_pem, "server.test")


def test_http01_validation_failure_is_one_clear_error(
    validating_pebble: tuple[Pebble, int], tmp_path: Path
) -> None:
    pebble, _ = validating_pebble
    # The responder listens elsewhere, so pebble's fetch on its port finds nobody.
    with pytest.raises(AcmeError, match=r"HTTP-01 validation failed") as info:
        obtain_certificate(
            pebble.directory_url,
            ["server.test"],
            tmp_path,
            http_port=_free_port(),
            acme_ca_bundle=pebble.acme_ca_bundle,
        )
    assert "\n" not in str(info.value)
    assert not (tmp_path / "privkey.pem").exists()


def test_cli_writes_certbot_files(
    pebble: Pebble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "live" / "server.test"
    code = main(
        [
            *("--directory", pebble.directory_url),
            *("--domain", "server.test"),
            *("--out", str(out)),
            *("--http-port", str(_free_port())),
            *("--ca-bundle", str(pebble.acme_ca_bundle)),
            *("--email", "ops@example.com"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""
    assert "fullchain.pem" in captured.out
    names = {"privkey.pem", "cert.pem", "chain.pem", "fullchain.pem", "account.key"}
    assert {p.name for p in out.iterdir()} == names


def test_cli_directory_from_environment(
    pebble: Pebble,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PINRPC_ACME_DIRECTORY", pebble.directory_url)
    monkeypatch.setenv("PINRPC_ACME_HTTP_PORT", str(_free_port()))
    argv = ["--domain", "server.test", "--out", str(tmp_path)]
    code = main([*argv, "--ca-bundle", str(pebble.acme_ca_bundle)])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("directory", "fragment"),
    [
        ("not a url", "must start with https://"),
        ("http://127.0.0.1:14000/dir", "must start with https://"),
        ("https://127.0.0.1:1/dir", "cannot reach the ACME server"),
    ],
)
def test_cli_bad_directory_url_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], directory: str, fragment: str
) -> None:
    code = main(["--directory", directory, "--domain", "server.test", "--out", str(tmp_path)])
    assert code == 1
    _assert_one_line_error(capsys.readouterr().err, fragment)
    assert not (tmp_path / "privkey.pem").exists()


def test_cli_url_that_is_not_a_directory_fails_cleanly(
    pebble: Pebble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = pebble.directory_url.removesuffix("/dir") + "/not-a-directory"
    argv = ["--directory", wrong, "--domain", "server.test", "--out", str(tmp_path)]
    code = main([*argv, "--ca-bundle", str(pebble.acme_ca_bundle)])
    assert code == 1
    _assert_one_line_error(capsys.readouterr().err, wrong, "HTTP 404")


def test_cli_untrusted_acme_tls_fails_cleanly(
    pebble: Pebble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--directory", pebble.directory_url, "--domain", "server.test", "--out", str(tmp_path)]
    code = main([*argv, "--http-port", str(_free_port())])
    assert code == 1
    _assert_one_line_error(capsys.readouterr().err, "TLS verification", "--ca-bundle")


def test_cli_wrong_ca_bundle_fails_cleanly(
    pebble: Pebble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # pebble's issuing root did not sign pebble's own HTTPS certificate.
    argv = ["--directory", pebble.directory_url, "--domain", "server.test", "--out", str(tmp_path)]
    code = main([*argv, "--ca-bundle", str(pebble.root_path)])
    assert code == 1
    _assert_one_line_error(capsys.readouterr().err, "TLS verification")


def test_cli_http_port_in_use_fails_cleanly(
    pebble: Pebble, tmp_path: Path, capsys: pytest.CaptureFixture[str], busy_port: int
) -> None:
    code = main(
        [
            *("--directory", pebble.directory_url),
            *("--domain", "server.test"),
            *("--out", str(tmp_path)),
            *("--http-port", str(busy_port)),
            *("--ca-bundle", str(pebble.acme_ca_bundle)),
        ]
    )
    assert code == 1
    _assert_one_line_error(capsys.readouterr().err, f"127.0.0.1:{busy_port}", "--http-port")
    assert not (tmp_path / "privkey.pem").exists()


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--out", "x"], "--domain"),
        (["--domain", "a.test", "--out", "x"], "PINRPC_ACME_DIRECTORY"),
        (["--domain", "a.test", "--out", "x", "--http-port", "70000"], "out of range"),
        (["--domain", "a.test", "--out", "x", "--http-port", "eighty"], "--http-port"),
    ],
)
def test_cli_usage_errors_are_one_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    fragment: str,
) -> None:
    monkeypatch.delenv("PINRPC_ACME_DIRECTORY", raising=False)
    assert main(argv) == 2
    _assert_one_line_error(capsys.readouterr().err, fragment)


def test_cli_bad_port_in_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PINRPC_ACME_HTTP_PORT", "http")
    assert main(["--directory", "https://127.0.0.1:1/dir", "--domain", "a", "--out", "x"]) == 2
    _assert_one_line_error(capsys.readouterr().err, "PINRPC_ACME_HTTP_PORT")


@pytest.mark.parametrize(
    ("domain", "fragment"),
    [("*.server.test", "DNS-01"), ("https://server.test", "bare DNS name"), ("", "bare DNS")],
)
def test_bad_domains_are_refused_before_contacting_the_ca(
    tmp_path: Path, domain: str, fragment: str
) -> None:
    # Port 1 refuses connections: reaching it would give a different error.
    with pytest.raises(AcmeError, match=fragment):
        obtain_certificate("https://127.0.0.1:1/dir", [domain], tmp_path)


def test_obtain_cert_script_runs_under_the_repository_venv(tmp_path: Path) -> None:
    # A copy of the script in a repository whose .venv is the one running the tests, started
    # by a Python without the acme extra, as `scripts/obtain-cert` after README's install.
    base_python = Path(sys.base_prefix) / "bin" / "python3"
    probe = subprocess.run([base_python, "-c", "import acme"], capture_output=True, check=False)
    assert probe.returncode != 0, "the base Python has acme: nothing to show"
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "obtain-cert"
    shutil.copy(Path(__file__).parent.parent / "scripts" / "obtain-cert", script)
    (tmp_path / ".venv").symlink_to(sys.prefix)
    done = subprocess.run(
        [base_python, script, "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: obtain-cert")
