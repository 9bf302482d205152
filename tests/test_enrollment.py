"""`pinrpc-server enroll / list / revoke`: every bad input is a one-line error, nothing changes."""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from pinrpc.errors import EnrollmentError
from pinrpc.identity import (
    NO_PERMISSIONS,
    Fingerprint,
    cert_to_pem,
    key_to_pem,
    load_certificate,
    load_private_key,
    spki_sha256,
)
from pinrpc.v1 import echo_pb2
from server import cli
from server.enrollment import Candidate, check_certificate
from server.registry import open_registry
from tests.certs import make_cert, name, p256, rsa_key, write_pair
from tests.conftest import (
    ECHO_ALL,
    Connect,
    MakeClient,
    code_of,
    enroll,
    registry_dump,
    require_tool,
    revoke,
    whoami,
)


def _csr() -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(name("csr"))
    return builder.sign(p256(), hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _der() -> bytes:
    return make_cert(p256(), "der").public_bytes(serialization.Encoding.DER)


def _pem(**kwargs: object) -> Callable[[], bytes]:
    return lambda: cert_to_pem(make_cert(p256(), "bad", **kwargs))  # type: ignore[arg-type]


def _on_curve(curve: ec.EllipticCurve) -> Callable[[], bytes]:
    key = ec.generate_private_key(curve)
    return lambda: cert_to_pem(make_cert(key, "curve", key_cert_sign=False))


LATER = dt.datetime.now(dt.UTC) + dt.timedelta(days=2)
EARLIER = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)

BAD_INPUT: dict[str, tuple[Callable[[], bytes], str]] = {
    "empty": (lambda: b"", "is empty"),
    "garbage": (lambda: b"\x00\xff garbage \x13" * 10, "not a PEM certificate"),
    "der instead of pem": (_der, "not a PEM certificate"),
    "truncated pem": (lambda: cert_to_pem(make_cert(p256(), "t"))[:300], "not a valid PEM"),
    "private key": (lambda: key_to_pem(p256()), "contains a private key"),
    "csr": (_csr, "certificate request"),
    "bundle": (lambda: _pem()() + _pem()(), "holds 2 certificates"),
    "expired": (_pem(not_before=EARLIER, days=5), "expired on"),
    "not yet valid": (_pem(not_before=LATER), "not valid before"),
    "ca true": (_pem(ca=True), "CA certificate"),
    "key cert sign": (_pem(ca=None, key_cert_sign=True), "keyCertSign"),
    "ed25519": (
        lambda: cert_to_pem(make_cert(ed25519.Ed25519PrivateKey.generate(), "ed")),
        "Ed25519",
    ),
    "rsa 1024": (lambda: cert_to_pem(make_cert(rsa_key(1024), "weak")), "1024-bit RSA"),
    # Curves the TLS stack cannot use for client authentication: the client could never connect.
    **{
        f"curve {curve.name}": (_on_curve(curve), f"EC key on {curve.name}")
        for curve in (ec.SECP521R1(), ec.SECP256K1(), ec.BrainpoolP256R1(), ec.SECP224R1())
    },
}


@pytest.fixture
def populated(registry: Path, make_client: MakeClient) -> Path:
    """A registry with alice enrolled and bob revoked: 'unchanged' must mean something."""
    enroll(registry, make_client("alice").cert_path, "alice", "/pinrpc.v1.Echo/*")
    enroll(registry, make_client("bob").cert_path, "bob")
    revoke(registry, "bob")
    return registry


def _refused(
    argv: list[str], registry: Path, capsys: pytest.CaptureFixture[str], expected: str
) -> None:
    before = registry_dump(registry, capsys)
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("pinrpc-server: error: ")
    assert expected in lines[0]
    assert "Traceback" not in captured.err
    assert registry_dump(registry, capsys) == before


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_certificate_is_refused(
    case: str, populated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, expected = BAD_INPUT[case]
    path = tmp_path / "input.crt"
    path.write_bytes(make())
    argv = ["enroll", str(path), "--name", "newcomer", "--registry", str(populated)]
    _refused(argv, populated, capsys, expected)


def test_error_names_the_absolute_path(
    populated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "empty.crt"
    path.write_bytes(b"")
    assert cli.main(["enroll", str(path), "--name", "x", "--registry", str(populated)]) == 1
    assert str(path.absolute()) in capsys.readouterr().err


def test_missing_and_huge_files(
    populated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = ["enroll", str(tmp_path / "nope.crt"), "--name", "x", "--registry", str(populated)]
    _refused(missing, populated, capsys, "No such file")
    huge = tmp_path / "huge.crt"
    huge.write_bytes(b"A" * (2 << 20))
    argv = ["enroll", str(huge), "--name", "x", "--registry", str(populated)]
    _refused(argv, populated, capsys, "larger than")


def test_duplicate_name_needs_replace(
    populated: Path, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    rekeyed = make_client("alice2")
    argv = ["enroll", str(rekeyed.cert_path), "--name", "alice", "--registry", str(populated)]
    _refused(argv, populated, capsys, "--replace")
    assert cli.main([*argv, "--replace"]) == 0
    capsys.readouterr()
    clients = registry_dump(populated, capsys)
    assert isinstance(clients, list)
    alices = [c for c in clients if c["name"] == "alice"]
    assert len(alices) == 2  # history stays
    assert [c["revoked_at"] is None for c in alices] == [False, True]
    assert alices[1]["fingerprint"] == str(rekeyed.fingerprint)


def test_duplicate_and_revoked_fingerprints_are_refused(
    populated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alice_crt = tmp_path / "keys" / "alice.crt"
    argv = ["enroll", str(alice_crt), "--name", "other", "--registry", str(populated)]
    _refused(argv, populated, capsys, "already enrolled as 'alice'")
    bob_crt = tmp_path / "keys" / "bob.crt"
    argv = ["enroll", str(bob_crt), "--name", "bob", "--registry", str(populated)]
    _refused(argv, populated, capsys, "was revoked")


# Subjects the TLS stack takes for the same name (OpenSSL's canonical form).
LOOK_ALIKES = [("twin", "twin"), ("Twin", "tWIN"), ("twin  x", "twin x"), ("twin", " twin\t")]


@pytest.mark.parametrize(("first_cn", "second_cn"), LOOK_ALIKES)
def test_same_subject_without_key_ids_is_refused(
    first_cn: str,
    second_cn: str,
    registry: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first, second = tmp_path / "a.crt", tmp_path / "b.crt"
    first.write_bytes(cert_to_pem(make_cert(p256(), first_cn, key_ids=False, key_cert_sign=False)))
    second.write_bytes(cert_to_pem(make_cert(p256(), second_cn, key_cert_sign=False)))
    assert cli.main(["enroll", str(first), "--name", "a", "--registry", str(registry)]) == 0
    argv = ["enroll", str(second), "--name", "b", "--registry", str(registry)]
    _refused(argv, registry, capsys, "could not tell them apart")


def test_same_subject_with_key_ids_or_another_name_is_accepted(
    registry: Path, tmp_path: Path
) -> None:
    twins = [make_cert(p256(), "twin", key_cert_sign=False) for _ in range(2)]
    others = [make_cert(p256(), cn, key_ids=False, key_cert_sign=False) for cn in ("tw in", "x")]
    for i, cert in enumerate([*twins, *others]):
        path = tmp_path / f"{i}.crt"
        path.write_bytes(cert_to_pem(cert))
        assert cli.main(["enroll", str(path), "--name", f"c{i}", "--registry", str(registry)]) == 0


def test_bad_method_pattern_and_bad_name(
    populated: Path, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    crt = str(make_client("carol").cert_path)
    argv = ["enroll", crt, "--name", "carol", "--allow", "Echo", "--registry", str(populated)]
    _refused(argv, populated, capsys, "must start with '/'")
    argv = ["enroll", crt, "--name", "../carol", "--registry", str(populated)]
    _refused(argv, populated, capsys, "invalid client name")


@pytest.mark.parametrize("key_type", ["rsa2048", "p384"])
def test_enroll_prints_fingerprint_and_rsa_and_p384_are_accepted(
    key_type: str, registry: Path, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    files = make_client("other", key_type=key_type)
    enroll(registry, files.cert_path, "other")
    assert str(files.fingerprint) in capsys.readouterr().out


def test_list_and_revoke(
    populated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert cli.main(["list", "--registry", str(populated)]) == 0
    out = capsys.readouterr().out
    assert "alice" in out and "active" in out and "revoked" in out
    clients = registry_dump(populated, capsys)
    assert isinstance(clients, list)
    alice = clients[0]
    assert alice["allowed_methods"] == ["/pinrpc.v1.Echo/*"]
    # Revoke by fingerprint, in another accepted spelling.
    spelling = "sha256:" + alice["fingerprint"].replace(":", "").lower()
    assert cli.main(["revoke", spelling, "--registry", str(populated)]) == 0
    assert "revoked alice" in capsys.readouterr().out
    after = registry_dump(populated, capsys)
    assert isinstance(after, list)
    assert after[0]["revoked_at"] is not None
    for ref, says in (("alice", "already revoked"), ("nobody", "no enrolled")):
        _refused(["revoke", ref, "--registry", str(populated)], populated, capsys, says)
    fp = alice["fingerprint"]
    _refused(["revoke", fp, "--registry", str(populated)], populated, capsys, "already revoked")


# Runs the command in a fresh interpreter and prints which heavy modules it had imported.
_IMPORTED_AFTER = """
import sys
{setup}
from server import cli
rc = cli.main(sys.argv[1:])
print(sorted(m for m in ("grpc", "prometheus_client") if m in sys.modules))
sys.exit(rc)
"""


@pytest.mark.parametrize(
    ("setup", "heavy"),
    [("", "[]"), ("import server.app", "['grpc', 'prometheus_client']")],
    ids=["admin-command", "control-with-server-app"],
)
def test_admin_commands_start_without_grpc(populated: Path, setup: str, heavy: str) -> None:
    # Revocation is timed from the command's launch (docs/PERFORMANCE.md), and importing grpc
    # and the services was about 0.13 s of a 0.23 s start-up.
    for argv in (["list"], ["revoke", "alice"]):
        done = subprocess.run(
            [sys.executable, "-c", _IMPORTED_AFTER.format(setup=setup), *argv,
             "--registry", str(populated)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1] == heavy


def test_list_and_revoke_need_an_existing_registry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "typo.db"
    assert cli.main(["list", "--registry", str(missing)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["revoke", "alice", "--registry", str(missing)]) == 1
    assert not missing.exists()


def test_registry_from_environment(
    registry: Path,
    make_client: MakeClient,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PINRPC_REGISTRY", str(registry))
    crt = make_client("dave").cert_path
    assert cli.main(["enroll", str(crt), "--name", "dave"]) == 0
    capsys.readouterr()
    assert cli.main(["list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["name"] == "dave"


def test_missing_registry_flag_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PINRPC_REGISTRY", raising=False)
    with pytest.raises(SystemExit) as info:
        cli.main(["list"])
    assert info.value.code == 2
    assert "--registry" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["list", "pending", "migrate"])
def test_an_empty_registry_flag_is_a_usage_error(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It named the current directory: "cannot open registry /cwd: disk I/O error"."""
    monkeypatch.delenv("PINRPC_REGISTRY", raising=False)
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--registry", ""])
    assert info.value.code == 2
    assert "--registry: must not be empty" in capsys.readouterr().err


def test_allow_from_environment_unless_flags_are_given(
    registry: Path,
    make_client: MakeClient,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PINRPC_ALLOW", "/pinrpc.v1.Echo/Echo,/pinrpc.v1.Echo/EchoStream")
    enroll(registry, make_client("env").cert_path, "env")
    enroll(registry, make_client("flag").cert_path, "flag", "/pinrpc.v1.Echo/*")
    clients = registry_dump(registry, capsys)
    assert isinstance(clients, list)
    assert [c["allowed_methods"] for c in clients] == [
        ["/pinrpc.v1.Echo/Echo", "/pinrpc.v1.Echo/EchoStream"],
        ["/pinrpc.v1.Echo/*"],  # flags replace the environment, they do not add to it
    ]


SERVE = ["serve", "--cert", "c.pem", "--key", "k.pem", "--registry", "r.db"]


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--max-pending", "0", "must be at least 1, got 0"),
        ("--audit-rate", "-5", "must be at least 0.1, got -5"),
        ("--rotation-overlap", "-1", "must be at least 0, got -1"),
        ("--max-connection-age", "soon", "not a number: 'soon'"),
        # Accepted by float(), and a traceback at start-up before the check.
        ("--audit-rate", "nan", "not a finite number: 'nan'"),
        ("--audit-rate", "inf", "not a finite number: 'inf'"),
        ("--rotation-overlap", "Infinity", "not a finite number: 'Infinity'"),
        # Tracebacks at start (timedelta) or at each Rotate (the date past year 9999).
        ("--rotation-overlap", "1e18", "must be at most 3.1536e+08, got 1e18"),
        ("--enrollment-ttl", "3e11", "must be at most 3.1536e+08, got 3e11"),
        ("--max-connection-age", "3e6", "must be at most 2.0736e+06, got 3e6"),  # gRPC's int
        ("--tls-reload", "sideways", "invalid choice: 'sideways'"),
    ],
)
def test_bad_serve_values_are_usage_errors_from_flag_or_environment(
    flag: str,
    value: str,
    says: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv in ([*SERVE, flag, value], SERVE):
        if argv is SERVE:
            monkeypatch.setenv("PINRPC_" + flag[2:].replace("-", "_").upper(), value)
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: {says}" in err
        assert "Traceback" not in err


def test_good_serve_values_from_the_environment_are_taken(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PINRPC_TLS_RELOAD", "handover")
    monkeypatch.setenv("PINRPC_MAX_CONNECTION_AGE", "30")
    args = cli.build_parser().parse_args(SERVE)
    assert (args.tls_reload, args.max_connection_age) == ("handover", 30.0)
    assert cli.build_parser().parse_args([*SERVE, "--tls-reload", "inline"]).tls_reload == "inline"


def test_warm_start_needs_handover(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = [*SERVE, "--warm-start", str(tmp_path / "warm")]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err == (
        "pinrpc-server: error: --warm-start needs --tls-reload handover\n"
    )
    assert not (tmp_path / "warm").exists()


# Certificates as openssl makes them (`openssl x509 -req -signkey`), with these extensions.
OPENSSL_MADE = {
    "v1": (None, "is an X.509 v1 certificate"),
    "no keyUsage": ("basicConstraints = critical, CA:FALSE", "has no keyUsage extension"),
    "keyUsage not critical": ("keyUsage = digitalSignature", None),  # measured: enough
    "critical keyUsage": ("keyUsage = critical, digitalSignature", None),
}


def openssl_self_signed(directory: Path, kind: str) -> tuple[Path, Path]:
    """(certificate, key) made by the openssl command line, EC P-256."""
    tool = shutil.which("openssl")
    require_tool(tool is not None, "openssl", "apt-get install -y openssl")
    key, csr, crt = (directory / f"ossl.{ext}" for ext in ("key", "csr", "crt"))
    key.write_bytes(key_to_pem(p256()))
    key.chmod(0o600)
    extensions, _ = OPENSSL_MADE[kind]
    steps = [
        ["req", "-new", "-key", key, "-subj", f"/CN={kind}", "-out", csr],
        ["x509", "-req", "-in", csr, "-signkey", key, "-days", "30", "-out", crt],
    ]
    if extensions is not None:
        (directory / "ext.cnf").write_text(extensions + "\n")
        steps[1] += ["-extfile", directory / "ext.cnf"]
    for step in steps:
        subprocess.run([str(tool), *map(str, step)], check=True, capture_output=True, timeout=30)
    return crt, key


@pytest.mark.parametrize("kind", sorted(OPENSSL_MADE))
def test_certificate_without_key_usage_is_refused(
    kind: str, populated: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    crt, _ = openssl_self_signed(tmp_path, kind)
    argv = ["enroll", str(crt), "--name", "newcomer", "--registry", str(populated)]
    _, expected = OPENSSL_MADE[kind]
    if expected is None:
        assert cli.main(argv) == 0
        return
    _refused(argv, populated, capsys, expected)


def _unchecked(cert: x509.Certificate) -> Candidate:
    """A candidate that skipped check_certificate, as a registry edited by hand holds it."""
    return Candidate(
        cert=cert,
        fingerprint=Fingerprint.of(cert),
        pem=cert_to_pem(cert).decode(),
        spki_sha256=spki_sha256(cert),
        subject=cert.subject.rfc4514_string(),
        has_key_ids=True,
        not_after=cert.not_valid_after_utc,
    )


@pytest.mark.parametrize("kind", sorted(OPENSSL_MADE))
def test_only_enrollable_keys_cannot_mint_leaves_the_handshake_accepts(
    kind: str, connect: Connect, tmp_path: Path
) -> None:
    crt, key = openssl_self_signed(tmp_path, kind)
    enrolled = load_certificate(crt)
    connect.plant(_unchecked(enrolled), "holder")
    assert whoami(connect.stub(crt, key)).name == "holder"
    leaf_key = p256()
    minted = make_cert(leaf_key, "admin", issuer=enrolled.subject, signer=load_private_key(key))
    stub = connect.stub(*write_pair(tmp_path, "minted", leaf_key, minted))
    try:
        check_certificate(crt.read_bytes(), str(crt))
        enrollable = True
    except EnrollmentError:
        enrollable = False
    # UNAVAILABLE: refused at the handshake; PERMISSION_DENIED: only the per-call check held.
    expected = grpc.StatusCode.UNAVAILABLE if enrollable else grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: whoami(stub)) == expected


def _foreign(path: Path) -> Path:
    """Another application's SQLite database, in the default (rollback journal) mode."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        db.execute("INSERT INTO invoices (total) VALUES (9.5)")
    db.close()
    return path


@pytest.mark.parametrize("kind", ["foreign", "empty"])
def test_commands_leave_a_file_that_is_not_a_registry_unchanged(
    kind: str, tmp_path: Path, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "other.db"
    _foreign(path) if kind == "foreign" else path.write_bytes(b"")
    before = path.read_bytes()
    crt = str(make_client("alice").cert_path)
    for argv in (["list"], ["pending"], ["revoke", "alice"]):
        assert cli.main([*argv, "--registry", str(path)]) == 1
    if kind == "foreign":  # an empty file is a new registry: enrolling may create it
        assert cli.main(["enroll", crt, "--name", "alice", "--registry", str(path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    says = "not a pinrpc registry" if kind == "foreign" else "holds no clients yet"
    assert all(line.startswith("pinrpc-server: error: ") and says in line for line in err), err
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys", "other.db"]


def test_reading_commands_need_no_write_access(
    registry: Path, make_client: MakeClient, tmp_path: Path
) -> None:
    enroll(registry, make_client("alice").cert_path, "alice")
    # A directory and file nobody may write to, read by a user who is not root.
    shared = Path(tempfile.mkdtemp(prefix="pinrpc-ro-"))
    try:
        copy = shared / "registry.db"
        shutil.copyfile(registry, copy)
        copy.chmod(0o444)
        shared.chmod(0o555)
        before = copy.read_bytes()
        as_user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        out = {}
        for command in ("list", "pending"):
            done = subprocess.run(
                [*(as_user if os.geteuid() == 0 else []), sys.executable, "-m", "server.cli",
                 command, "--registry", str(copy)],
                capture_output=True, text=True, timeout=60, check=False,
                env={**os.environ, "PYTHONPATH": str(Path(cli.__file__).parent.parent)},
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            out[command] = done.stdout
        assert "alice" in out["list"]
        assert "no pending enrollment requests" in out["pending"]
        assert copy.read_bytes() == before
        assert sorted(p.name for p in shared.iterdir()) == ["registry.db"]
    finally:
        shared.chmod(0o755)
        shutil.rmtree(shared)


def test_replace_without_allow_keeps_the_permissions(
    connect: Connect,
    make_client: MakeClient,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A re-key (keygen + enroll --replace, as for an expired certificate) must not cut the
    client off; a first enrollment without --allow still gets nothing beyond WhoAmI."""
    monkeypatch.delenv("PINRPC_ALLOW", raising=False)
    connect.enroll(make_client("carol"), "carol", ECHO_ALL)
    rekeyed, dave = make_client("carol2"), make_client("dave")
    capsys.readouterr()
    enroll(connect.server_registry, rekeyed.cert_path, "carol", replace=True)
    connect.enroll(dave, "dave")  # and polls, so the server has carol's new pair too
    request = echo_pb2.EchoRequest(message="hi")
    assert connect.stub(rekeyed.cert_path, rekeyed.key_path).Echo(request).caller == "carol"
    denied = code_of(lambda: connect.stub(dave.cert_path, dave.key_path).Echo(request))
    assert denied == grpc.StatusCode.PERMISSION_DENIED
    carol_out, dave_out = capsys.readouterr().out.split("enrolled dave")
    assert f"allowed      {ECHO_ALL}  (kept from the replaced certificate)" in carol_out
    assert f"allowed      {NO_PERMISSIONS}\n" in dave_out


@pytest.mark.parametrize("source", ["flag", "environment"])
def test_replace_with_allow_takes_the_new_permissions(
    registry: Path,
    make_client: MakeClient,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    source: str,
) -> None:
    monkeypatch.delenv("PINRPC_ALLOW", raising=False)
    enroll(registry, make_client("carol").cert_path, "carol", ECHO_ALL)
    narrower = "/pinrpc.v1.Echo/Echo"
    if source == "environment":
        monkeypatch.setenv("PINRPC_ALLOW", narrower)
    allow = [narrower] if source == "flag" else []
    enroll(registry, make_client("carol2").cert_path, "carol", *allow, replace=True)
    assert "kept from" not in capsys.readouterr().out
    clients = registry_dump(registry, capsys)
    assert isinstance(clients, list)
    assert [(c["allowed_methods"], c["revoked_at"] is None) for c in clients] == [
        ([ECHO_ALL], False),
        ([narrower], True),
    ]


def test_replace_during_a_rotation_overlap_revokes_the_retiring_certificate_too(
    connect: Connect, make_client: MakeClient
) -> None:
    """A re-key, e.g. after a stolen key was used to rotate: the key rotated away from stayed
    trusted until the overlap ended (24 h by default)."""
    first, rotated, rekeyed = make_client("c1"), make_client("c2"), make_client("c3")
    connect.enroll(first, "carol", ECHO_ALL)
    successor = check_certificate(rotated.cert_path.read_bytes(), "c2")
    registry = open_registry(str(connect.server_registry))
    try:
        registry.rotate(first.fingerprint, successor, dt.timedelta(hours=1))
    finally:
        registry.close()
    connect.server.trust.poll()
    assert whoami(connect.stub(first.cert_path, first.key_path)).name == "carol"  # overlap
    enroll(connect.server_registry, rekeyed.cert_path, "carol", replace=True)
    connect.server.trust.poll()
    assert whoami(connect.stub(rekeyed.cert_path, rekeyed.key_path)).name == "carol"
    stubs = [connect.stub(old.cert_path, old.key_path) for old in (first, rotated)]
    refused = [code_of(functools.partial(whoami, stub)) for stub in stubs]
    assert refused == [grpc.StatusCode.UNAVAILABLE] * 2  # at the handshake


@pytest.mark.parametrize("command", ["revoke", "approve", "reject"])
def test_a_reference_that_is_not_utf8_is_a_usage_error(
    command: str, populated: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`revoke $'\\xff'` was a traceback from the SQLite driver."""
    before = registry_dump(populated, capsys)
    with pytest.raises(SystemExit) as info:
        cli.main([command, "\udcff", "--registry", str(populated)])
    assert info.value.code == 2
    assert "not valid UTF-8" in capsys.readouterr().err
    assert registry_dump(populated, capsys) == before
