"""Enrollment requests: proof of possession, approval by fingerprint, nothing trusted before."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from client import cli as client_cli
from pinrpc import proof
from pinrpc.cli import Exit
from pinrpc.identity import KeyPairFiles, load_certificate, load_private_key
from pinrpc.v1 import echo_pb2, echo_pb2_grpc, enrollment_pb2, enrollment_pb2_grpc
from server import cli as server_cli
from server.app import RunningServer, start_server
from server.config import ServerConfig
from server.enrollment import check_certificate
from server.lookalike import LookAlikes
from server.registry import open_registry
from tests.conftest import (
    ECHO_ALL,
    SERVER_NAME,
    Connect,
    MakeClient,
    ServerFiles,
    code_of,
    enroll,
    registry_dump,
    revoke,
    whoami,
)

REFUSED_AT_HANDSHAKE = grpc.StatusCode.UNAVAILABLE


def serving_requests(
    devca: ServerFiles, registry: Path, ttl: dt.timedelta, max_pending: int
) -> Iterator[RunningServer]:
    config = ServerConfig(
        "127.0.0.1:0", devca.cert, devca.key, str(registry), enrollment_listen="127.0.0.1:0",
        enrollment_ttl=ttl, max_pending=max_pending,
    )  # fmt: skip
    with start_server(config) as running:
        yield running


@pytest.fixture
def enrolling(devca: ServerFiles, registry: Path) -> Iterator[RunningServer]:
    yield from serving_requests(devca, registry, dt.timedelta(seconds=2), max_pending=2)


def request_flags(running: RunningServer, devca: ServerFiles, files: KeyPairFiles) -> list[str]:
    return ["--server", f"127.0.0.1:{running.enrollment_port}", "--cert", str(files.cert_path),
            "--key", str(files.key_path), "--ca", str(devca.ca_path),
            "--server-name", SERVER_NAME]  # fmt: skip


def pending(registry: Path, capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    capsys.readouterr()
    assert server_cli.main(["pending", "--json", "--registry", str(registry)]) == 0
    result: list[dict[str, object]] = json.loads(capsys.readouterr().out)
    return result


def enrollment_stub(
    running: RunningServer, devca: ServerFiles
) -> enrollment_pb2_grpc.EnrollmentStub:
    creds = grpc.ssl_channel_credentials(root_certificates=devca.ca_path.read_bytes())
    options = [("grpc.ssl_target_name_override", SERVER_NAME)]
    channel = grpc.secure_channel(f"127.0.0.1:{running.enrollment_port}", creds, options=options)
    return enrollment_pb2_grpc.EnrollmentStub(channel)


def test_request_then_approve(
    enrolling: RunningServer,
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    carol = make_client("carol")
    argv = ["request-enrollment", "--name", "carol", *request_flags(enrolling, devca, carol)]
    capsys.readouterr()
    assert client_cli.main(argv) == Exit.OK
    assert f"pinrpc-server approve {carol.fingerprint}" in capsys.readouterr().out
    assert [(p["name"], p["fingerprint"]) for p in pending(registry, capsys)] == [
        ("carol", str(carol.fingerprint))
    ]
    # Not trusted while pending: refused at the handshake.
    connect = Connect(enrolling, devca)
    enrolling.trust.poll()
    stub = connect.stub(carol.cert_path, carol.key_path)
    assert code_of(lambda: whoami(stub)) == REFUSED_AT_HANDSHAKE

    approve = ["approve", str(carol.fingerprint), "--name", "carol-svc", "--allow", ECHO_ALL]
    assert server_cli.main([*approve, "--registry", str(registry)]) == 0
    assert pending(registry, capsys) == []
    enrolling.trust.poll()
    stub = connect.stub(carol.cert_path, carol.key_path)
    me = whoami(stub)
    assert (me.name, list(me.allowed_methods)) == ("carol-svc", [ECHO_ALL])


def test_request_enrollment_warns_of_a_pair_about_to_expire(
    enrolling: RunningServer,
    devca: ServerFiles,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--warn-days applies here too: the operator would admit a pair that soon stops working.
    The allow twin: a pair with more days left than --warn-days asks without a warning."""
    dave = make_client("dave", days=5)
    argv = ["request-enrollment", "--name", "dave", *request_flags(enrolling, devca, dave)]
    capsys.readouterr()
    assert client_cli.main(argv) == Exit.OK
    err = capsys.readouterr().err
    assert "warning: your certificate" in err and "expires in 4 days" in err, err
    assert "pinrpc keygen" in err, err
    erin = make_client("erin", days=5)
    argv = ["request-enrollment", "--name", "erin", *request_flags(enrolling, devca, erin)]
    assert client_cli.main([*argv, "--warn-days", "3"]) == Exit.OK
    assert "warning" not in capsys.readouterr().err


def test_approve_reads_the_name_from_pinrpc_name(
    enrolling: RunningServer,
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    carol, dave = make_client("carol"), make_client("dave")
    for files in (carol, dave):
        argv = ["request-enrollment", "--name", files.cert_path.stem,
                *request_flags(enrolling, devca, files)]  # fmt: skip
        assert client_cli.main(argv) == Exit.OK
    monkeypatch.setenv("PINRPC_NAME", "carol-env")
    assert server_cli.main(["approve", str(carol.fingerprint), "--registry", str(registry)]) == 0
    monkeypatch.delenv("PINRPC_NAME")  # unset: the requested name
    assert server_cli.main(["approve", str(dave.fingerprint), "--registry", str(registry)]) == 0
    capsys.readouterr()
    assert server_cli.main(["list", "--json", "--registry", str(registry)]) == 0
    names = {c["fingerprint"]: c["name"] for c in json.loads(capsys.readouterr().out)}
    assert names == {str(carol.fingerprint): "carol-env", str(dave.fingerprint): "dave"}


def test_rejected_request_is_never_admitted(
    enrolling: RunningServer,
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    dave = make_client("dave")
    argv = ["request-enrollment", "--name", "dave", *request_flags(enrolling, devca, dave)]
    assert client_cli.main(argv) == Exit.OK
    fp = str(dave.fingerprint)
    assert server_cli.main(["reject", fp, "--registry", str(registry)]) == 0
    assert pending(registry, capsys) == []
    assert server_cli.main(["approve", fp, "--registry", str(registry)]) == 1
    assert "no pending enrollment request" in capsys.readouterr().err
    enrolling.trust.poll()
    stub = Connect(enrolling, devca).stub(dave.cert_path, dave.key_path)
    assert code_of(lambda: whoami(stub)) == REFUSED_AT_HANDSHAKE


def test_proof_of_possession_is_required(
    enrolling: RunningServer,
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    alice, thief = make_client("alice"), make_client("thief")
    stub = enrollment_stub(enrolling, devca)
    cert = load_certificate(alice.cert_path)
    nonce = stub.Challenge(enrollment_pb2.ChallengeRequest(), timeout=5).nonce

    def submit(signature: bytes, used_nonce: bytes = nonce) -> enrollment_pb2.EnrollmentTicket:
        request = enrollment_pb2.EnrollmentRequest(
            certificate_pem=alice.cert_path.read_text(), name="alice", nonce=used_nonce,
            signature=signature,
        )  # fmt: skip
        return stub.Request(request, timeout=5)

    # alice's certificate signed with the thief's key: refused, and the nonce is spent.
    forged = proof.sign(load_private_key(thief.key_path), nonce, cert)
    with pytest.raises(grpc.RpcError) as info:
        submit(forged)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "proof of possession failed" in (info.value.details() or "")
    genuine = proof.sign(load_private_key(alice.key_path), nonce, cert)
    assert code_of(lambda: submit(genuine)) == grpc.StatusCode.INVALID_ARGUMENT  # nonce used
    # A nonce the server never issued.
    made_up = b"\x00" * 32
    fake = proof.sign(load_private_key(alice.key_path), made_up, cert)
    assert code_of(lambda: submit(fake, made_up)) == grpc.StatusCode.INVALID_ARGUMENT
    assert pending(registry, capsys) == []


def test_a_name_that_reads_as_a_fingerprint_is_refused_at_request(
    enrolling: RunningServer,
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Approve refuses such a name (revoke and permit would match the victim's fingerprint
    first); the stranger is told at once instead of after waiting for an operator."""
    victim, stranger = make_client("victim"), make_client("stranger")
    stub = enrollment_stub(enrolling, devca)
    cert, key = load_certificate(stranger.cert_path), load_private_key(stranger.key_path)

    def submit(name: str) -> enrollment_pb2.EnrollmentTicket:
        nonce = stub.Challenge(enrollment_pb2.ChallengeRequest(), timeout=5).nonce
        request = enrollment_pb2.EnrollmentRequest(
            certificate_pem=stranger.cert_path.read_text(), name=name, nonce=nonce,
            signature=proof.sign(key, nonce, cert),
        )  # fmt: skip
        return stub.Request(request, timeout=5)

    for shaped in (victim.fingerprint.hex, victim.fingerprint.hex.upper()):
        with pytest.raises(grpc.RpcError) as info:
            submit(shaped)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "reads as a certificate fingerprint" in (info.value.details() or "")
    assert pending(registry, capsys) == []
    assert submit("stranger").fingerprint == str(stranger.fingerprint)
    assert [p["name"] for p in pending(registry, capsys)] == ["stranger"]


def test_requests_are_bounded_and_expire(
    enrolling: RunningServer,
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    clients = [make_client(f"c{i}") for i in range(3)]
    codes = []
    for files in clients:
        argv = ["request-enrollment", "--name", files.cert_path.stem,
                *request_flags(enrolling, devca, files)]  # fmt: skip
        codes.append(client_cli.main(argv))
    assert codes == [Exit.OK, Exit.OK, Exit.ERROR]
    assert "already waiting" in capsys.readouterr().err
    assert len(pending(registry, capsys)) == 2
    time.sleep(2.2)  # the fixture's requests live 2 s
    assert pending(registry, capsys) == []
    fp = str(clients[0].fingerprint)
    assert server_cli.main(["approve", fp, "--registry", str(registry)]) == 1


def test_enrollment_port_serves_nothing_else(
    enrolling: RunningServer, devca: ServerFiles, make_client: MakeClient, connect: Connect
) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=devca.ca_path.read_bytes())
    options = [("grpc.ssl_target_name_override", SERVER_NAME)]
    target = f"127.0.0.1:{enrolling.enrollment_port}"
    with grpc.secure_channel(target, creds, options=options) as channel:
        echo = echo_pb2_grpc.EchoStub(channel)
        code = code_of(lambda: echo.WhoAmI(echo_pb2.WhoAmIRequest(), timeout=5))
        assert code == grpc.StatusCode.UNIMPLEMENTED
    assert connect.server.enrollment_port is None  # off by default


def _ask(running: RunningServer, devca: ServerFiles, files: KeyPairFiles, name: str) -> str:
    argv = ["request-enrollment", "--name", name, *request_flags(running, devca, files)]
    assert client_cli.main(argv) == Exit.OK
    return str(files.fingerprint)


def test_a_stranger_asking_for_an_enrolled_name_is_flagged_and_refused(
    enrolling: RunningServer,
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`pending` did not say that a request's name was an enrolled client's, and `approve`
    refused it with "pass --replace to re-key it": advice that hands alice's name and
    permissions to a stranger's key."""
    alice, bob, mallory, carol = (make_client(n) for n in ("alice", "bob", "mallory", "carol"))
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    enroll(registry, bob.cert_path, "bob")
    revoke(registry, "bob")  # a revoked client's name is free again
    stranger = _ask(enrolling, devca, mallory, "alice")
    newcomer = _ask(enrolling, devca, carol, "bob")
    assert {p["fingerprint"]: p["name_taken"] for p in pending(registry, capsys)} == {
        stranger: True,
        newcomer: False,
    }
    assert set(pending(registry, capsys)[0]) == {
        "fingerprint", "name", "peer", "requested_at", "expires_at", "name_taken", "name_like"
    }  # fmt: skip
    assert server_cli.main(["pending", "--registry", str(registry)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines[stranger].endswith("<- taken: an enrolled client's name (--replace would "
                                    "retire its certificate)")  # fmt: skip
    assert "taken" not in lines[newcomer]
    before = registry_dump(registry, capsys)
    said = (
        f"asks for the name 'alice', which is someone else's: enrolled client 'alice' "
        f"({alice.fingerprint}); --replace would retire that client's certificate"
    )
    for extra in ([], ["--name", "alice"]):
        argv = ["approve", stranger, *extra, "--allow", ECHO_ALL, "--registry", str(registry)]
        assert server_cli.main(argv) == Exit.ERROR
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and said in err, err
        assert "pass --replace to re-key" not in err
    assert registry_dump(registry, capsys) == before
    assert [p["fingerprint"] for p in pending(registry, capsys)] == [stranger, newcomer]
    # Allowed: under another name, and a revoked client's name without --replace.
    argv = ["approve", stranger, "--name", "mallory", "--registry", str(registry)]
    assert server_cli.main(argv) == Exit.OK
    assert server_cli.main(["approve", newcomer, "--registry", str(registry)]) == Exit.OK
    capsys.readouterr()
    assert server_cli.main(["list", "--json", "--registry", str(registry)]) == Exit.OK
    listed = json.loads(capsys.readouterr().out)
    assert {(c["name"], c["fingerprint"]) for c in listed if c["revoked_at"] is None} == {
        ("alice", str(alice.fingerprint)), ("mallory", stranger), ("bob", newcomer)
    }  # fmt: skip


def test_approving_a_request_under_an_enrolled_clients_name_is_refused_likewise(
    enrolling: RunningServer,
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A request for "alice-laptop" approved with `--name alice` got the registry's "pass
    --replace to re-key it", the advice that hands alice's name and permissions to the
    requester's key; `--name` picks the name the request would get, so it is checked too."""
    alice, laptop = make_client("alice"), make_client("alice-laptop")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    request = _ask(enrolling, devca, laptop, "alice-laptop")
    before = registry_dump(registry, capsys)
    argv = ["approve", request, "--name", "alice", "--registry", str(registry)]
    assert server_cli.main(argv) == Exit.ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "which is someone else's: enrolled client 'alice'" in err, err
    assert "pass --replace to re-key" not in err
    assert registry_dump(registry, capsys) == before
    # Allowed: the name it asked for.
    argv = ["approve", request, "--registry", str(registry)]
    assert server_cli.main(argv) == Exit.OK


def test_a_re_key_request_for_an_enrolled_name_is_approved_with_replace(
    enrolling: RunningServer,
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    old, new = make_client("alice"), make_client("alice-new")
    enroll(registry, old.cert_path, "alice", ECHO_ALL)
    fingerprint = _ask(enrolling, devca, new, "alice")
    argv = ["approve", fingerprint, "--replace", "--registry", str(registry)]
    assert server_cli.main(argv) == Exit.OK
    assert (
        f"allowed      {ECHO_ALL}  (kept from the replaced certificate)" in capsys.readouterr().out
    )
    enrolling.trust.poll()
    connect = Connect(enrolling, devca)
    assert whoami(connect.stub(new.cert_path, new.key_path)).name == "alice"
    stub = connect.stub(old.cert_path, old.key_path)
    assert code_of(lambda: whoami(stub)) == REFUSED_AT_HANDSHAKE


@pytest.fixture
def asking(devca: ServerFiles, registry: Path) -> Iterator[RunningServer]:
    """An enrollment port whose requests outlive a slow test (`enrolling`'s live 2 s)."""
    yield from serving_requests(devca, registry, dt.timedelta(minutes=5), max_pending=10)


# (requested name, the enrolled name it reads like or None): one deny per entry of
# server/lookalike.py's table, each next to distinct names that must stay unmarked.
LOOK_ALIKES = [
    ("Alice", "alice"),  # case alone
    ("a1ice", "alice"),  # 1 for l
    ("aIice", "alice"),  # capital I for l
    ("allce", "alice"),  # l for i
    ("b0b", "bob"),  # 0 for o
    ("rnike", "mike"),  # rn for m
    ("vvendy", "wendy"),  # vv for w
    ("node_1", "node-1"),  # the separators
    ("node.1", "node-1"),
    ("N0de_l", "node-1"),  # several at once
    ("alicia", None),
    ("rob", None),
    ("node-2", None),
    ("bobby", None),
    ("caro1", None),  # carol is revoked: her name is free, and so are its look-alikes
    ("alice", None),  # alice's own name: name_taken, not a look-alike of itself
]


def test_a_request_for_a_name_that_reads_like_an_enrolled_one_is_marked(
    registry: Path, make_client: MakeClient, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pending` marked only a request for an enrolled client's very name: one for `a1ice`,
    `rnike` or `Alice` looked clean, and an operator skimming the list took it for a re-key."""
    for name in ("alice", "bob", "mike", "wendy", "node-1", "carol"):
        enroll(registry, make_client(name).cert_path, name)
    revoke(registry, "carol")
    files = [make_client(f"asker-{i}") for i in range(len(LOOK_ALIKES))]
    # Filed as the enrollment port files them; 16 requests are past its per-host bound.
    store = open_registry(str(registry))
    try:
        for (name, _), asker in zip(LOOK_ALIKES, files, strict=True):
            candidate = check_certificate(asker.cert_path.read_bytes(), str(asker.cert_path))
            store.request_enrollment(candidate, name, "ipv4:192.0.2.1:1", dt.timedelta(hours=1), 99)
    finally:
        store.close()
    rows = {p["name"]: p for p in pending(registry, capsys)}
    assert {name: rows[name]["name_like"] for name, _ in LOOK_ALIKES} == dict(LOOK_ALIKES)
    assert [n for n, p in rows.items() if p["name_taken"]] == ["alice"]
    assert server_cli.main(["pending", "--registry", str(registry)]) == 0
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["Alice"].endswith(
        "<- differs from enrolled client 'alice' only in case: approve would refuse this name"
    )
    assert "--replace" not in lines["Alice"]
    for name, like in LOOK_ALIKES[1:10]:
        assert lines[name].endswith(
            f"<- looks like enrolled client {like!r}: another name, so not a re-key of it"
        ), lines[name]
    for name in ("alicia", "rob", "node-2", "bobby", "caro1"):
        assert lines[name].endswith(" UTC"), lines[name]
    assert lines["alice"].endswith("<- taken: an enrolled client's name (--replace would "
                                   "retire its certificate)")  # fmt: skip


def test_a_case_variant_is_named_before_another_look_alike() -> None:
    """With `aIice` and `alice` enrolled, `Alice` is refused for `alice` (case alone): the
    mark must name that one, not the first in sorted order."""
    assert LookAlikes(["aIice", "alice"]).of("Alice") == "alice"
    assert LookAlikes(["aIice", "alice"]).of("a1ice") == "aIice"
    assert LookAlikes(["alice"]).of("alice") is None


def test_approving_a_look_alike_warns_and_a_case_variant_is_refused(
    asking: RunningServer,
    devca: ServerFiles,
    registry: Path,
    make_client: MakeClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`approve` of a request for `a1ice` enrolled it without a word that alice is someone
    else; it still does (node-1 beside node-l may be meant), with one warning line."""
    alice = make_client("alice")
    enroll(registry, alice.cert_path, "alice", ECHO_ALL)
    cased, digit, other = (make_client(n) for n in ("m1", "m2", "m3"))
    cased_fp, digit_fp = _ask(asking, devca, cased, "Alice"), _ask(asking, devca, digit, "a1ice")
    other_fp = _ask(asking, devca, other, "aIice")
    # Denied: the case variant, by the registry, as its mark in `pending` says; no warning.
    before = registry_dump(registry, capsys)
    argv = ["approve", cased_fp, "--registry", str(registry)]
    assert server_cli.main(argv) == Exit.ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "differs from it only in case" in err, err
    assert "warning" not in err
    assert registry_dump(registry, capsys) == before
    # Approved with a warning on stderr: exit code and stdout as for any approval.
    assert server_cli.main(["approve", digit_fp, "--registry", str(registry)]) == Exit.OK
    out, err = capsys.readouterr()
    assert out.startswith("approved: enrolled a1ice\n")
    assert err == (
        f"pinrpc-server: warning: 'a1ice' only looks like enrolled client 'alice' "
        f"({alice.fingerprint}): it is a new client, not a re-key of 'alice'; "
        f"`pinrpc-server revoke {digit_fp}` if that is not what you meant\n"
    )
    # Allowed without a warning: a look-alike request approved under a distinct --name.
    argv = ["approve", other_fp, "--name", "mallory", "--registry", str(registry)]
    assert server_cli.main(argv) == Exit.OK
    assert capsys.readouterr().err == ""
    # Allowed without a warning: alice's re-key, though 'a1ice' now reads like her name.
    rekey = make_client("alice-new")
    argv = [
        "approve",
        _ask(asking, devca, rekey, "alice"),
        "--replace",
        "--registry",
        str(registry),
    ]
    assert server_cli.main(argv) == Exit.OK
    assert capsys.readouterr().err == ""
    asking.trust.poll()
    connect = Connect(asking, devca)
    assert whoami(connect.stub(digit.cert_path, digit.key_path)).name == "a1ice"
    assert whoami(connect.stub(rekey.cert_path, rekey.key_path)).name == "alice"
