"""A review of the client library and CLIs as their users meet them: each test is a defect
found by running the real commands (or the documented library calls) the way a user would."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from client import cli as client_cli
from pinrpc.channel import load_pair
from pinrpc.cli import Exit
from pinrpc.errors import IdentityError
from pinrpc.identity import (
    Fingerprint,
    KeyPairFiles,
    cert_to_pem,
    generate_key,
    key_to_pem,
    self_signed_certificate,
)
from server.app import RunningServer
from tests.conftest import MakeClient, ServerFiles
from tests.test_enrollment_requests import enrolling as enrolling  # the fixture
from tests.test_enrollment_requests import pending, request_flags


def dated_pair(directory: Path, name: str, start: dt.datetime, days: int) -> KeyPairFiles:
    """A pair whose validity starts at ``start`` (keygen always starts it now)."""
    key = generate_key()
    cert = self_signed_certificate(key, name, days=days, now=start)
    directory.mkdir(exist_ok=True)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert_to_pem(cert))
    key_path.write_bytes(key_to_pem(key))
    key_path.chmod(0o600)
    return KeyPairFiles(key_path, cert_path, Fingerprint.of(cert))


@pytest.mark.parametrize(
    ("shift", "said", "fix"),
    [
        (dt.timedelta(days=-3), "EXPIRED on", "pinrpc keygen NAME --force"),
        (dt.timedelta(days=2), "is not valid before", "check this machine's clock"),
    ],
    ids=["expired", "not-yet-valid"],
)
def test_request_enrollment_refuses_a_pair_outside_its_dates_before_asking(
    enrolling: RunningServer,
    devca: ServerFiles,
    registry: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    shift: dt.timedelta,
    said: str,
    fix: str,
) -> None:
    """It warned "expires in -3 days" and asked all the same: the operator was handed a
    fingerprint to approve that no server admits (or, not valid yet, not today). Now it says
    so before connecting, exit 3, as every other command does. The allow twin: a pair within
    its dates asks (tests/test_enrollment_requests.py, and below)."""
    now = dt.datetime.now(dt.UTC)
    dave = dated_pair(tmp_path / "keys", "dave", now + shift, days=1)
    argv = ["request-enrollment", "--name", "dave", *request_flags(enrolling, devca, dave)]
    capsys.readouterr()
    assert client_cli.main(argv) == Exit.CONNECT
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"error: your certificate {said}" in err, err
    assert "expires in -" not in err, err
    assert fix in err, err
    assert pending(registry, capsys) == []
    erin = dated_pair(tmp_path / "keys", "erin", now, days=1)
    argv = ["request-enrollment", "--name", "erin", *request_flags(enrolling, devca, erin)]
    assert client_cli.main(argv) == Exit.OK
    assert [p["name"] for p in pending(registry, capsys)] == ["erin"]


@pytest.fixture
def sealed(make_client: MakeClient) -> KeyPairFiles:
    return make_client("sealed", passphrase=b"s3cret")


def test_library_empty_passphrase_counts_as_none(
    sealed: KeyPairFiles, make_client: MakeClient
) -> None:
    """passphrase=b"" (say, os.environb.get(b"MY_PASS", b"")) on an encrypted key said the
    key "is not encrypted ... unset it", and on a plain key refused it: empty now means none,
    as an empty PINRPC_KEY_PASSPHRASE does. The deny twin: the encrypted key still needs its
    passphrase, and the message says to set it."""
    plain = make_client("plain")
    load_pair(plain.cert_path, plain.key_path, passphrase=b"")
    with pytest.raises(IdentityError, match="is encrypted; set PINRPC_KEY_PASSPHRASE") as caught:
        load_pair(sealed.cert_path, sealed.key_path, passphrase=b"")
    assert "not encrypted" not in str(caught.value)
    load_pair(sealed.cert_path, sealed.key_path, passphrase=b"s3cret")


def test_library_passphrase_as_str_is_a_type_error_that_says_so(sealed: KeyPairFiles) -> None:
    """passphrase="s3cret" (a str, the right passphrase) said the key "is not encrypted, but
    a passphrase was given ... unset it": false, and the advice locks the caller out."""
    with pytest.raises(TypeError, match=r"passphrase must be bytes.*encode\(\)"):
        load_pair(sealed.cert_path, sealed.key_path, passphrase="s3cret")  # type: ignore[arg-type]
