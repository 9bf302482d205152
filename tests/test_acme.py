"""ACME issuance against a real pebble: server.acme.obtain_certificate and the obtain-cert CLI."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import pytest
from acme import client, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store
from josepy.jwa import ES256
from josepy.jwk import JWKEC

from pinrpc.errors import AcmeError
from pinrpc.identity import key_to_pem
from server.acme import ObtainResult, main, obtain_certificate
from tests.conftest import require_pebble
from tests.https import serving_pages
from tests.pebble import Pebble, start_pebble
from tests.ports import free_port


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
        http_port=free_port(),
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
        http_port=free_port(),
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
            http_port=free_port(),
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
        http_port=free_port(),
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
            http_port=free_port(),
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
            *("--http-port", str(free_port())),
            *("--ca-bundle", str(pebble.acme_ca_bundle)),
            *("--email", "ops@example.com"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""
    assert "fullchain.pem" in captured.out
    names = {"privkey.pem", "cert.pem", "chain.pem", "fullchain.pem", "account.key"}
    names.add(".obtain-cert.lock")  # empty; runs lock it one at a time
    assert {p.name for p in out.iterdir()} == names


def test_cli_directory_from_environment(
    pebble: Pebble,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PINRPC_ACME_DIRECTORY", pebble.directory_url)
    monkeypatch.setenv("PINRPC_ACME_HTTP_PORT", str(free_port()))
    argv = ["--domain", "server.test", "--out", str(tmp_path)]
    code = main([*argv, "--ca-bundle", str(pebble.acme_ca_bundle)])
    assert code == 0, capsys.readouterr().err


@pytest.mark.parametrize(
    ("directory", "fragment"),
    [
        ("not a url", "must start with https://"),
        ("http://127.0.0.1:14000/dir", "must start with https://"),
        ("https://127.0.0.1:1/dir", "cannot reach the ACME server"),
        ("https://[::1", "is malformed"),
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
    code = main([*argv, "--http-port", str(free_port())])
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
    # All interfaces by default: the CA connects from outside.
    _assert_one_line_error(capsys.readouterr().err, f"0.0.0.0:{busy_port}", "--http-port")
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
    [
        ("*.server.test", "DNS-01"),
        ("https://server.test", "bare DNS name"),
        ("", "bare DNS"),
        ("192.0.2.1", "IP address"),
    ],
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


def _issue(pebble: Pebble, out: Path, **kwargs: object) -> ObtainResult:
    return obtain_certificate(
        pebble.directory_url,
        ["server.test"],
        out,
        http_port=free_port(),
        acme_ca_bundle=pebble.acme_ca_bundle,
        **kwargs,  # type: ignore[arg-type]
    )


def test_failed_write_leaves_every_previous_file(
    pebble: Pebble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = _issue(pebble, tmp_path)
    first.fullchain.unlink()
    first.fullchain.mkdir()  # the last file cannot be replaced
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    argv = ["--directory", pebble.directory_url, "--domain", "server.test", "--out", str(tmp_path)]
    argv += ["--http-port", str(free_port()), "--ca-bundle", str(pebble.acme_ca_bundle)]
    assert main(argv) == 1
    _assert_one_line_error(capsys.readouterr().err, str(first.fullchain), "unchanged")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_root_renewal_keeps_the_key_owner(pebble: Pebble, tmp_path: Path) -> None:
    """A server that owns its key (0600, user nobody) must read the renewed one too, or it
    serves the old certificate until it expires. Only root may give a file away (the tests run
    as root, as the chown tests here need)."""
    first = _issue(pebble, tmp_path)
    os.chown(first.privkey, 65534, -1)
    second = _issue(pebble, tmp_path)
    st = second.privkey.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, os.getgid(), 0o600)
    assert second.privkey.read_bytes() != b""


def test_renewal_keeps_the_key_group_but_never_other_read(pebble: Pebble, tmp_path: Path) -> None:
    first = _issue(pebble, tmp_path)
    os.chown(first.privkey, -1, 4242)  # as an operator's chgrp for a non-root server
    first.privkey.chmod(0o644)
    second = _issue(pebble, tmp_path)
    st = second.privkey.stat()
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (4242, 0o640)
    assert second.privkey.read_bytes() != b""
    # Without group read before, none after.
    second.privkey.chmod(0o600)
    st = _issue(pebble, tmp_path).privkey.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_unicode_domain_uses_idna2008(pebble: Pebble, tmp_path: Path) -> None:
    leaf = x509.load_pem_x509_certificate(
        obtain_certificate(
            pebble.directory_url,
            ["Faß.test"],
            tmp_path,
            http_port=free_port(),
            acme_ca_bundle=pebble.acme_ca_bundle,
        ).cert.read_bytes()
    )
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["xn--fa-hia.test"]  # not fass.test


def test_http01_responder_on_ipv6(pebble: Pebble, tmp_path: Path) -> None:
    result = _issue(pebble, tmp_path, http_host="::1")
    _verify(result.fullchain, pebble.root_pem, "server.test")
    with socket.socket(socket.AF_INET6) as busy:
        busy.bind(("::1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(AcmeError, match=rf"cannot listen on \[::1\]:{port}"):
            # A new account: pebble reuses a valid authorization of the same account 1 % of the
            # time even at PEBBLE_AUTHZREUSE=0 (`rand.Intn(100) > percent`), and then no
            # challenge, so no responder, is needed (this failed once in a full run).
            obtain_certificate(
                pebble.directory_url,
                ["server.test"],
                tmp_path / "second",
                http_port=port,
                http_host="::1",
                acme_ca_bundle=pebble.acme_ca_bundle,
            )


@pytest.fixture(scope="module")
def fake_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """An HTTPS server that answers JSON which is not an ACME directory: (base URL, CA file)."""
    bodies = {
        "/empty": b"{}",
        "/list": b"[]",
        "/string": b'"x"',
        "/eab": b'{"newNonce": "https://127.0.0.1:1/n", "newAccount": "https://127.0.0.1:1/a",'
        b' "newOrder": "https://127.0.0.1:1/o", "meta": {"externalAccountRequired": true}}',
    }
    with serving_pages(bodies, tmp_path_factory.mktemp("fake-directory")) as served:
        yield served


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/empty", "no newNonce, newAccount, newOrder in it"),
        ("/list", "check that the URL is an ACME directory"),
        ("/string", "check that the URL is an ACME directory"),
        ("/eab", "external account binding"),
    ],
)
def test_json_that_is_not_a_directory_fails_cleanly(
    fake_directory: tuple[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    path: str,
    fragment: str,
) -> None:
    base, ca = fake_directory
    argv = ["--directory", base + path, "--domain", "server.test", "--out", str(tmp_path)]
    assert main([*argv, "--ca-bundle", str(ca)]) == 1
    _assert_one_line_error(capsys.readouterr().err, fragment)
    assert not (tmp_path / "privkey.pem").exists()


def test_empty_port_variable_counts_as_unset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PINRPC_ACME_HTTP_PORT", "")
    # Past the usage check (exit 2) to the URL check (exit 1).
    assert main(["--directory", "not a url", "--domain", "a.test", "--out", str(tmp_path)]) == 1
    _assert_one_line_error(capsys.readouterr().err, "must start with https://")


@pytest.mark.parametrize(
    ("bundle", "error"),
    [
        ("garbage", "cannot use CA bundle"),
        ("a FIFO nobody writes to", "cannot use CA bundle"),  # read as empty: it hung before
        ("directory", "cannot read CA bundle"),
    ],
)
def test_unusable_ca_bundle_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bundle: str, error: str
) -> None:
    path = tmp_path / "bundle.pem"
    if bundle == "garbage":
        path.write_bytes(b"not a certificate")
    elif bundle == "directory":
        path.mkdir()
    else:
        os.mkfifo(path)
    # Port 1 refuses connections: reaching it would give a different error.
    argv = ["--directory", "https://127.0.0.1:1/dir", "--domain", "a.test", "--out", str(tmp_path)]
    assert main([*argv, "--ca-bundle", str(path)]) == 1
    _assert_one_line_error(capsys.readouterr().err, f"{error} {path}")


@pytest.mark.parametrize("where", ["unreachable", "not a directory"])
def test_a_failure_before_registering_leaves_no_out_directory(
    fake_directory: tuple[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    where: str,
) -> None:
    base, ca = fake_directory
    url = "https://127.0.0.1:1/dir" if where == "unreachable" else base + "/empty"
    out = tmp_path / "new" / "out"
    argv = ["--directory", url, "--domain", "a.test", "--out", str(out), "--ca-bundle", str(ca)]
    assert main(argv) == 1
    _assert_one_line_error(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []  # neither the directory nor an account key


def test_out_directory_and_account_key_are_made_once_the_ca_answers(
    pebble: Pebble, tmp_path: Path
) -> None:
    out = tmp_path / "new" / "out"
    result = _issue(pebble, out)
    assert result.privkey.parent == out
    assert stat.S_IMODE((out / "account.key").stat().st_mode) == 0o600


def test_out_under_a_file_is_refused_before_contacting_the_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_bytes(b"")
    # Port 1 refuses connections: reaching it would give a different error.
    argv = ["--directory", "https://127.0.0.1:1/dir", "--domain", "a.test"]
    assert main([*argv, "--out", str(tmp_path / "file" / "a" / "b")]) == 1
    _assert_one_line_error(capsys.readouterr().err, "cannot create output directory")


def test_empty_out_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `--out "$DIR"` with DIR unset must not write the key into the current directory.
    argv = ["--directory", "https://127.0.0.1:1/dir", "--domain", "a.test", "--out", ""]
    assert main(argv) == 2
    _assert_one_line_error(capsys.readouterr().err, "--out")


@pytest.mark.parametrize("content", ["encrypted", "directory"])
def test_unusable_account_key_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str
) -> None:
    path = tmp_path / "account.key"
    if content == "encrypted":
        key = ec.generate_private_key(ec.SECP256R1())
        path.write_bytes(key_to_pem(key, b"secret"))
    else:
        path.mkdir()
    argv = ["--directory", "https://127.0.0.1:1/dir", "--domain", "a.test"]
    assert main([*argv, "--out", str(tmp_path)]) == 1
    _assert_one_line_error(capsys.readouterr().err, str(path), "delete it")


@contextmanager
def _account(
    pebble: Pebble, out: Path
) -> Iterator[tuple[client.ClientV2, messages.RegistrationResource]]:
    """An ACME client for the account of out/account.key, and that account."""
    key = serialization.load_pem_private_key((out / "account.key").read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    net = client.ClientNetwork(
        JWKEC(key=key), alg=ES256, verify_ssl=cast(bool, str(pebble.acme_ca_bundle))
    )
    net.session.trust_env = False
    try:
        acme = client.ClientV2(client.ClientV2.get_directory(pebble.directory_url, net), net)
        existing = messages.NewRegistration(only_return_existing=True)
        with pytest.raises(errors.ConflictError) as found:
            acme.new_account(existing)
        yield (
            acme,
            messages.RegistrationResource(body=messages.Registration(), uri=found.value.location),
        )
    finally:
        net.session.close()


def _account_contact(pebble: Pebble, out: Path) -> tuple[str, ...]:
    """The contact the CA holds for the account of out/account.key, as the CA reports it."""
    with _account(pebble, out) as (acme, account):
        return tuple(acme.query_registration(account).body.contact)


def test_a_new_email_updates_the_existing_accounts_contact(
    pebble: Pebble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _issue(pebble, tmp_path, email="old@pinrpc.test")
    account_key = (tmp_path / "account.key").read_bytes()
    assert _account_contact(pebble, tmp_path) == ("mailto:old@pinrpc.test",)
    argv = ["--directory", pebble.directory_url, "--domain", "server.test", "--out", str(tmp_path)]
    argv += ["--http-port", str(free_port()), "--ca-bundle", str(pebble.acme_ca_bundle)]
    assert main([*argv, "--email", "new@pinrpc.test"]) == 0
    assert "contact to mailto:new@pinrpc.test" in capsys.readouterr().out
    assert _account_contact(pebble, tmp_path) == ("mailto:new@pinrpc.test",)
    assert (tmp_path / "account.key").read_bytes() == account_key  # the same account


def test_the_same_or_no_email_leaves_the_accounts_contact(
    pebble: Pebble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _issue(pebble, tmp_path, email="ops@pinrpc.test")
    argv = ["--directory", pebble.directory_url, "--domain", "server.test", "--out", str(tmp_path)]
    argv += ["--http-port", str(free_port()), "--ca-bundle", str(pebble.acme_ca_bundle)]
    assert main([*argv, "--email", "ops@pinrpc.test"]) == 0
    assert main(argv) == 0  # no --email: not a request to remove the contact
    assert "contact" not in capsys.readouterr().out
    assert _account_contact(pebble, tmp_path) == ("mailto:ops@pinrpc.test",)


def test_a_contact_the_ca_refuses_is_one_line(
    pebble: Pebble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _issue(pebble, tmp_path, email="ops@pinrpc.test")
    argv = ["--directory", pebble.directory_url, "--domain", "server.test", "--out", str(tmp_path)]
    argv += ["--http-port", str(free_port()), "--ca-bundle", str(pebble.acme_ca_bundle)]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main([*argv, "--email", "not an address"]) == 1
    _assert_one_line_error(capsys.readouterr().err, "contact")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert _account_contact(pebble, tmp_path) == ("mailto:ops@pinrpc.test",)


@pytest.mark.parametrize("email", [None, "ops@pinrpc.test"])
def test_a_deactivated_account_says_to_move_its_key_away(
    pebble: Pebble, tmp_path: Path, capsys: pytest.CaptureFixture[str], email: str | None
) -> None:
    """The CA refuses a deactivated account for good; the error only quoted the CA."""
    _issue(pebble, tmp_path)
    with _account(pebble, tmp_path) as (acme, account):
        acme.deactivate_registration(account)
    argv = ["--directory", pebble.directory_url, "--domain", "server.test", "--out", str(tmp_path)]
    argv += ["--http-port", str(free_port()), "--ca-bundle", str(pebble.acme_ca_bundle)]
    argv += ["--email", email] if email else []
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert main(argv) == 1
    account_key = tmp_path / "account.key"
    _assert_one_line_error(capsys.readouterr().err, str(account_key), "deactivated", "move")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    account_key.rename(tmp_path / "deactivated-account.key")
    assert main(argv) == 0  # as the error says: a new account
    assert account_key.read_bytes() != before["account.key"]


Run = Callable[[], subprocess.CompletedProcess[str]]


@contextmanager
def _out_handed_to_nobody(pebble: Pebble) -> Iterator[tuple[Path, Run]]:
    """--out as root's first run left it, handed to the user of the cron job (nobody) with
    `chown nobody OUT/*`, which skips dot files; and a real obtain-cert run as that user."""
    nobody = 65534
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="pinrpc-nobody-") as tmp:
        out = Path(tmp) / "out"
        _issue(pebble, out)
        ca_bundle = Path(tmp) / "pebble-tls.pem"  # pytest's own directories are root's only
        shutil.copy(pebble.acme_ca_bundle, ca_bundle)
        visible = [p for p in out.iterdir() if not p.name.startswith(".")]
        for path in [Path(tmp), out, ca_bundle, *visible]:
            os.chown(path, nobody, nobody)
        argv = ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups",
                sys.executable, str(Path(__file__).parent.parent / "scripts" / "obtain-cert"),
                "--directory", pebble.directory_url, "--domain", "server.test",
                "--out", str(out), "--ca-bundle", str(ca_bundle)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}

        def run() -> subprocess.CompletedProcess[str]:
            port = ["--http-port", str(free_port())]
            return subprocess.run([*argv, *port], capture_output=True, text=True, env=env,
                                  timeout=60)  # fmt: skip

        yield out, run


def test_a_lock_file_of_another_user_says_to_chown_it(pebble: Pebble) -> None:
    """The lock file stays root's: the error said only EACCES."""
    with _out_handed_to_nobody(pebble) as (out, run):
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        done = run()
        assert done.returncode == 1
        lock = out / ".obtain-cert.lock"
        _assert_one_line_error(done.stderr, str(lock), "Permission denied", "chown it")
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        os.chown(lock, 65534, 65534)  # as the error says
        lock.chmod(0o400)  # flock needs only read access
        done = run()
        assert done.returncode == 0, done.stderr
        assert (out / "fullchain.pem").read_bytes() != before["fullchain.pem"]


def test_a_key_group_the_user_may_not_give_is_named_and_changes_nothing(pebble: Pebble) -> None:
    """privkey.pem is shared with root's group, which nobody may not give the renewed key:
    the error was 'cannot write OUT: Operation not permitted'."""
    with _out_handed_to_nobody(pebble) as (out, run):
        os.chown(out / ".obtain-cert.lock", 65534, 65534)
        os.chown(out / "privkey.pem", -1, 0)
        (out / "privkey.pem").chmod(0o640)
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        done = run()
        assert done.returncode == 1
        key = out / "privkey.pem"
        _assert_one_line_error(done.stderr, f"{key}: cannot give it group 0", "unchanged")
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary left


def _obtain_cert_process(pebble: Pebble, out: Path) -> subprocess.Popen[str]:
    """scripts/obtain-cert as an operator (or a cron job) runs it: a process of its own."""
    script = Path(__file__).parent.parent / "scripts" / "obtain-cert"
    argv = [sys.executable, str(script), "--directory", pebble.directory_url]
    argv += ["--domain", "server.test", "--out", str(out), "--http-port", str(free_port())]
    argv += ["--ca-bundle", str(pebble.acme_ca_bundle)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _locks_held_by(pid: int, path: Path) -> bool:
    """Whether ``pid`` holds a flock on ``path``, as /proc/locks lists it (no probe of ours
    takes the lock, so the runs meet only each other)."""
    try:
        inode = path.stat().st_ino
    except FileNotFoundError:
        return False
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "FLOCK" in fields and "->" not in fields:  # "->": waiting, not holding
            at = fields.index("FLOCK")
            if fields[at + 3] == str(pid) and fields[at + 4].endswith(f":{inode}"):
                return True
    return False


@contextmanager
def _run_holding_the_lock(pebble: Pebble, out: Path) -> Iterator[subprocess.Popen[str]]:
    """A real obtain-cert run, stopped (SIGSTOP) while it holds --out's lock mid-run."""
    first = _obtain_cert_process(pebble, out)
    try:
        deadline = time.monotonic() + 30
        while not _locks_held_by(first.pid, out / ".obtain-cert.lock"):
            assert first.poll() is None, f"it ended without locking {out}: {first.communicate()[1]}"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)
        yield first
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
        first.communicate(timeout=30)


def _matching_pair(out: Path) -> bool:
    key = serialization.load_pem_private_key((out / "privkey.pem").read_bytes(), password=None)
    leaf = x509.load_pem_x509_certificates((out / "fullchain.pem").read_bytes())[0]
    return key.public_key() == leaf.public_key()


def test_a_second_concurrent_run_fails_at_once_and_changes_nothing(
    pebble: Pebble, tmp_path: Path
) -> None:
    _issue(pebble, tmp_path)
    with _run_holding_the_lock(pebble, tmp_path) as first:
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
        second = _obtain_cert_process(pebble, tmp_path)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 1
        _assert_one_line_error(err, f"another obtain-cert run is using {tmp_path}")
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=60)
        assert first.returncode == 0, err
    assert _matching_pair(tmp_path)
    assert (tmp_path / "fullchain.pem").read_bytes() != before["fullchain.pem"]


def test_a_killed_run_leaves_no_lock_behind(pebble: Pebble, tmp_path: Path) -> None:
    _issue(pebble, tmp_path)
    with _run_holding_the_lock(pebble, tmp_path) as first:
        first.kill()
        first.wait(timeout=30)
    second = _obtain_cert_process(pebble, tmp_path)
    _, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    assert _matching_pair(tmp_path)
