"""Enrollment input fuzzing: whatever the file holds, one line of error and an unchanged registry.

The registry already holds the valid certificate the mutations start from, so a mutation that
decodes back to the same certificate is refused as a duplicate too.
"""

from __future__ import annotations

import base64
import io
import json
import textwrap
import warnings
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pinrpc.identity import create_identity
from server import cli


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run pinrpc-server in-process; a warning would be one more stderr line, so it fails."""
    out, err = io.StringIO(), io.StringIO()
    with (
        redirect_stdout(out),
        redirect_stderr(err),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        # Not the CLI's: the collector may finalise an earlier test's socket or file here.
        warnings.simplefilter("ignore", ResourceWarning)
        code = cli.main(list(argv))
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]
    return code, out.getvalue(), err.getvalue()


def dump(registry: Path) -> object:
    code, out, _ = run_cli("list", "--json", "--registry", str(registry))
    assert code == 0
    return json.loads(out)


def to_pem(der: bytes) -> bytes:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n".encode()


def defect_of(data: bytes) -> str | None:
    """Which of the two once-missed defects ``data`` carries, if any (the tests below)."""
    try:
        with warnings.catch_warnings():  # e.g. a serial number made negative
            warnings.simplefilter("ignore")
            cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        return None
    try:  # these fields are parsed lazily, on first use
        cert.subject.rfc4514_string()
        cert.issuer.rfc4514_string()
        cert.public_key()
        _ = cert.signature_hash_algorithm
    except (ValueError, UnsupportedAlgorithm):
        return "traceback"
    try:
        cert.verify_directly_issued_by(cert)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return "no proof of possession"
    return None


def mutate(data: bytes, position: int, kind: str, noise: bytes) -> bytes:
    position %= max(len(data), 1)
    if kind == "truncate":
        return data[:position]
    if kind == "flip":
        return data[:position] + bytes([data[position] ^ (noise[0] | 1)]) + data[position + 1 :]
    if kind == "insert":
        return data[:position] + noise + data[position:]
    return data[:position] + data[position + len(noise) :]  # delete


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, bytes]:
    """A registry holding one valid certificate, and that certificate as PEM and DER."""
    directory = tmp_path_factory.mktemp("fuzz")
    files = create_identity("original", directory / "keys")
    registry = directory / "registry.db"
    code, _, err = run_cli("enroll", str(files.cert_path), "--name", "original",
                           "--registry", str(registry))  # fmt: skip
    assert code == 0, err
    pem = files.cert_path.read_bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return registry, pem, der


mutations = st.tuples(
    st.integers(min_value=0, max_value=4096),
    st.sampled_from(["truncate", "flip", "insert", "delete"]),
    st.binary(min_size=1, max_size=64),
)


@st.composite
def bad_inputs(draw: st.DrawFn, pem: bytes, der: bytes) -> bytes:
    source = draw(st.sampled_from(["random", "pem", "der", "der-in-pem", "huge"]))
    if source == "random":
        return draw(st.binary(max_size=4096))
    if source == "huge":
        return pem + b"A" * draw(st.sampled_from([64 * 1024, 1 << 20, 3 << 20]))
    position, kind, noise = draw(mutations)
    if source == "pem":
        return mutate(pem, position, kind, noise)
    mutated = mutate(der, position, kind, noise)
    return mutated if source == "der" else to_pem(mutated)


def test_enrollment_refuses_every_mangled_input(
    original: tuple[Path, bytes, bytes], tmp_path_factory: pytest.TempPathFactory
) -> None:
    registry, pem, der = original
    before = dump(registry)
    path = tmp_path_factory.mktemp("inputs") / "input.crt"
    refused: list[int] = []

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=bad_inputs(pem, der))
    def check(data: bytes) -> None:
        path.write_bytes(data)
        code, out, err = run_cli("enroll", str(path), "--name", "x", "--registry", str(registry))
        assert code == 1, (data[:200], out)
        assert "Traceback" not in err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pinrpc-server: error: "), err
        assert dump(registry) == before
        refused.append(len(data))

    check()
    assert len(refused) >= 100, f"only {len(refused)} inputs were tried"


def der_of(cert_path: Path) -> bytearray:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return bytearray(cert.public_bytes(serialization.Encoding.DER))


def corrupt_signature(der: bytearray) -> None:
    der[-5] ^= 0x01  # a bit inside the signature value


def corrupt_subject(der: bytearray) -> None:
    """The common name, re-signed with another key: a valid certificate nobody self-signed."""
    at = der.index(b"alice")
    der[at] = ord("A")


@pytest.mark.parametrize("corrupt", [corrupt_signature, corrupt_subject])
def test_certificate_whose_self_signature_fails_is_refused(
    tmp_path: Path, corrupt: Callable[[bytearray], None]
) -> None:
    files = create_identity("alice", tmp_path / "keys")
    registry = tmp_path / "registry.db"
    assert run_cli("enroll", str(files.cert_path), "--name", "alice",
                   "--registry", str(registry))[0] == 0  # fmt: skip
    before = dump(registry)
    der = der_of(files.cert_path)
    corrupt(der)
    path = tmp_path / "corrupted.crt"
    path.write_bytes(to_pem(bytes(der)))
    assert defect_of(path.read_bytes()) == "no proof of possession"
    code, _, _ = run_cli("enroll", str(path), "--name", "x", "--registry", str(registry))
    assert code == 1, "a certificate whose self-signature fails was enrolled"
    assert dump(registry) == before


def corrupt_point(der: bytearray) -> None:
    at = der.index(b"\x03\x42\x00\x04")  # BIT STRING holding the uncompressed P-256 point
    der[at + 3] = 0x05  # not a point encoding


def corrupt_key_algorithm(der: bytearray) -> None:
    at = der.index(bytes.fromhex("2a8648ce3d0201"))  # id-ecPublicKey
    der[at + 1] ^= 0x40  # an unknown OID


def corrupt_name_encoding(der: bytearray) -> None:
    at = der.rindex(b"pinrpc client")  # the subject (the issuer comes first)
    der[at + 1] = 0x96  # not UTF-8


@pytest.mark.parametrize("corrupt", [corrupt_point, corrupt_key_algorithm, corrupt_name_encoding])
def test_malformed_fields_are_a_one_line_error(
    tmp_path: Path, corrupt: Callable[[bytearray], None]
) -> None:
    files = create_identity("alice", tmp_path / "keys")
    der = der_of(files.cert_path)
    corrupt(der)
    path = tmp_path / "malformed.crt"
    path.write_bytes(to_pem(bytes(der)))
    assert defect_of(path.read_bytes()) == "traceback"
    registry = tmp_path / "registry.db"
    code, _, err = run_cli("enroll", str(path), "--name", "x", "--registry", str(registry))
    assert code == 1 and len(err.strip().splitlines()) == 1, err
