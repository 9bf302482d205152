"""Admin.List a page at a time: the server's pages and tokens, the client's bounds against a
hostile server, and one --json record format for the local and the remote listing.

The guarantee: a certificate in the registry when the listing starts is listed exactly once,
whatever is enrolled, revoked or re-permitted between pages; one enrolled meanwhile at most
once (rows are never deleted, and new ones come last in the registry's order).
"""

from __future__ import annotations

import gc
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from client import admin as client_admin
from pinrpc.channel import secure_channel
from pinrpc.cli import Exit
from pinrpc.identity import KeyPairFiles
from pinrpc.listing import PAGE_SIZE
from pinrpc.v1 import admin_pb2, admin_pb2_grpc
from server import admin as server_admin
from server import cli as server_cli
from server.app import start_server
from server.config import ServerConfig
from server.registry import open_registry
from server.registry_schema import COLUMNS
from tests.conftest import SERVER_NAME, Connect, MakeClient, ServerFiles, code_of
from tests.security import test_hostile_server
from tests.security.test_hostile_server import Serve, cli
from tests.test_lifecycle import ADMIN

hostile = test_hostile_server.hostile  # a fixture: a real grpcio server with the server's cert

HISTORY = 2500  # revoked certificates planted by SQL: three pages


def _plant_history(
    connect: Connect, count: int = HISTORY, source: str = "root", name: str = "'h' || i"
) -> None:
    """``count`` revoked copies of ``source``'s row under new names (``name``: SQL of the row
    number i) and fingerprints."""
    with sqlite3.connect(connect.server_registry) as db:
        db.execute(f"""
            WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {count})
            INSERT INTO clients ({COLUMNS})
            SELECT {name}, printf('%064x', i), cert_pem, spki_sha256, subject, has_key_ids,
                   allowed_methods, enrolled_at, not_after, enrolled_at, NULL
            FROM n, clients WHERE clients.name = ?
        """, (source,))  # noqa: S608  # fmt: skip
    db.close()


@pytest.fixture
def root(connect: Connect, make_client: MakeClient) -> KeyPairFiles:
    files = make_client("root")
    connect.enroll(files, "root", ADMIN)
    return files


@pytest.fixture
def admin(connect: Connect, root: KeyPairFiles) -> Iterator[admin_pb2_grpc.AdminStub]:
    with connect.channel(root.cert_path, root.key_path) as channel:
        yield admin_pb2_grpc.AdminStub(channel)


def _pinrpc(*argv: str) -> subprocess.CompletedProcess[str]:
    """The real program in its own process (PYTHONPATH passes on to it)."""
    return subprocess.run(
        [sys.executable, "-m", "client.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_pages_lose_and_repeat_nothing_while_the_registry_changes(
    connect: Connect, make_client: MakeClient, admin: admin_pb2_grpc.AdminStub
) -> None:
    for i in range(6):
        connect.enroll(make_client(f"c{i}"), f"c{i}", "/pinrpc.v1.Echo/*")
    before = [c.fingerprint for c in admin.List(admin_pb2.ListRequest()).clients]
    listed: list[str] = []
    token, pages, added = "", 0, []
    while pages < 20:
        reply = admin.List(admin_pb2.ListRequest(page_size=2, page_token=token))
        assert 0 < len(reply.clients) <= 2
        listed += [c.fingerprint for c in reply.clients]
        pages += 1
        if not (token := reply.next_page_token):
            break
        if pages == 1:  # one listed, one not yet; a re-key, a permit and a new client
            admin.Revoke(admin_pb2.RevokeRequest(client="c0"))
            admin.Revoke(admin_pb2.RevokeRequest(client="c4"))
            admin.Permit(admin_pb2.PermitRequest(client="c3", none=True))
            new = make_client("new")
            admin.Enroll(
                admin_pb2.EnrollRequest(certificate_pem=new.cert_path.read_text(), name="new")
            )
            added.append(str(new.fingerprint))
    assert pages == 4 and len(before) == 7, (pages, before)
    assert len(listed) == len(set(listed)), listed  # nothing repeated
    assert listed == before + added  # nothing lost, in the registry's order


def test_a_caller_without_a_page_size_gets_everything_and_large_ones_are_capped(
    connect: Connect, admin: admin_pb2_grpc.AdminStub
) -> None:
    _plant_history(connect)
    old = admin.List(admin_pb2.ListRequest())  # what a client from before paging sends
    assert len(old.clients) == HISTORY + 1 and not old.next_page_token
    # Deny: a page size over the cap gets a page of the cap, not everything.
    first = admin.List(admin_pb2.ListRequest(page_size=10**9))
    assert len(first.clients) == PAGE_SIZE and first.next_page_token
    assert [c.name for c in first.clients] == [c.name for c in old.clients[:PAGE_SIZE]]


def _refusal(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


UNKNOWN = "p1." + "ab" * 32  # well formed, but no certificate of the registry
BASE64 = "MTIzfDE3MDAwMDAwMDB8MHxhYg.c2lnbmF0dXJl"  # a dotted base64 token, as others issue


@pytest.mark.parametrize(
    ("request_of", "says"),
    [
        (lambda token: admin_pb2.ListRequest(page_size=-1), "page_size -1 is negative"),
        (lambda token: admin_pb2.ListRequest(page_size=2, page_token="garbage"), "not a token"),
        (lambda token: admin_pb2.ListRequest(page_token="YWJj.YWJj"), "not a token"),
        (lambda token: admin_pb2.ListRequest(page_token=BASE64), "not a token"),
        (lambda token: admin_pb2.ListRequest(page_token=token.upper()), "not a token"),
        (lambda token: admin_pb2.ListRequest(page_token=token[:-3]), "does not name a cert"),
        (lambda token: admin_pb2.ListRequest(page_token=token + "00"), "does not name a cert"),
        (lambda token: admin_pb2.ListRequest(page_token="p1." + "\u0661" * 64), "not name a"),
        (lambda token: admin_pb2.ListRequest(page_token="p2" + token[2:]), "of version 'p2'"),
        (lambda token: admin_pb2.ListRequest(page_token=UNKNOWN), "registry does not hold"),
        (lambda token: admin_pb2.ListRequest(page_token="x" * 5000), "not a token"),
        (lambda token: admin_pb2.ListRequest(page_token="p1." + "ab" * 600), "not a token"),
        (lambda token: admin_pb2.ListRequest(page_token="\u00e9.\u00e9"), "not a token"),
    ],
)
def test_bad_page_requests_are_one_line_invalid_argument(
    connect: Connect,
    make_client: MakeClient,
    admin: admin_pb2_grpc.AdminStub,
    request_of: Any,
    says: str,
) -> None:
    for i in range(3):
        connect.enroll(make_client(f"c{i}"), f"c{i}", "/pinrpc.v1.Echo/*")
    token = admin.List(admin_pb2.ListRequest(page_size=1)).next_page_token
    assert token.startswith("p1.")  # the version tag the refusals above alter
    refused = _refusal(lambda: admin.List(request_of(token)))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused
    details = refused.details() or ""
    assert says in details and "\n" not in details and "Traceback" not in details, details


def test_a_token_is_a_position_any_list_caller_may_continue_but_not_a_revoked_one(
    connect: Connect, make_client: MakeClient, admin: admin_pb2_grpc.AdminStub
) -> None:
    other = make_client("other")
    connect.enroll(other, "other", "/pinrpc.v1.Admin/List")
    first = admin.List(admin_pb2.ListRequest(page_size=1))
    # Allowed: the next page for another List caller, which could list it all anyway.
    with connect.channel(other.cert_path, other.key_path) as channel:
        theirs = admin_pb2_grpc.AdminStub(channel)
        page = theirs.List(admin_pb2.ListRequest(page_size=1, page_token=first.next_page_token))
    assert [c.name for c in (*first.clients, *page.clients)] == ["root", "other"]
    # Denied: a caller revoked between pages gets no further page (the method's check).
    admin.Revoke(admin_pb2.RevokeRequest(client="other"))
    connect.server.trust.poll()
    with connect.channel(other.cert_path, other.key_path) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        call = admin_pb2.ListRequest(page_size=1, page_token=first.next_page_token)
        assert code_of(lambda: stub.List(call)) in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.PERMISSION_DENIED,
        )


@contextmanager
def _serving(devca: ServerFiles, registry: str) -> Iterator[int]:
    """One more server on ``registry``, as another replica or a restart would be."""
    config = ServerConfig(
        listen="127.0.0.1:0", cert=devca.cert, key=devca.key, registry=registry,
        poll_interval=0.1, grace=1.0,
    )  # fmt: skip
    with start_server(config) as running:
        yield running.port


def _page(devca: ServerFiles, port: int, files: KeyPairFiles, token: str) -> admin_pb2.ListResponse:
    target = f"127.0.0.1:{port}"
    with secure_channel(
        target, files.cert_path, files.key_path, devca.ca_path, SERVER_NAME
    ) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        return stub.List(admin_pb2.ListRequest(page_size=2, page_token=token))


def test_another_server_and_a_restarted_one_continue_a_listing(
    spec: str, devca: ServerFiles, make_client: MakeClient
) -> None:
    """Both backends: SQLite's file shared by two servers (the CLI shares it with a server
    too; docs/SCALING.md keeps one server a file for revocation memory, not for this), and
    PostgreSQL's replicas."""
    root = make_client("root")
    assert server_cli.main(["enroll", str(root.cert_path), "--name", "root",
                            f"--allow={ADMIN}", "--registry", spec]) == 0  # fmt: skip
    for i in range(5):
        files = make_client(f"c{i}")
        assert server_cli.main(["enroll", str(files.cert_path), "--name", f"c{i}",
                                "--registry", spec]) == 0  # fmt: skip
    registry = open_registry(spec)
    try:
        order = [str(c.fingerprint) for c in registry.clients()]
    finally:
        registry.close()
    listed: list[str] = []
    with _serving(devca, spec) as a:
        first = _page(devca, a, root, "")
        with _serving(devca, spec) as b:  # a second replica: the balancer sent the next call
            second = _page(devca, b, root, first.next_page_token)
    with _serving(devca, spec) as restarted:  # both stopped; one starts again
        third = _page(devca, restarted, root, second.next_page_token)
        # Denied still: a token naming no certificate of this registry.
        refused = _refusal(lambda: _page(devca, restarted, root, UNKNOWN))
        assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused
    for page in (first, second, third):
        listed += [c.fingerprint for c in page.clients]
    assert listed == order and len(order) == 6 and not third.next_page_token


def test_an_abandoned_listing_leaves_nothing_in_the_server(
    connect: Connect, admin: admin_pb2_grpc.AdminStub
) -> None:
    """Pages keep no state: the service's own attributes are the same objects after a listing
    abandoned half way (state kept per listing would sit there until it expired)."""
    _plant_history(connect, 1500)
    (service,) = [
        o for o in gc.get_objects()
        if isinstance(o, server_admin.AdminService)
        and o._registry.where == str(connect.server_registry)
    ]  # fmt: skip
    before = dict(vars(service))
    first = admin.List(admin_pb2.ListRequest(page_size=1000))
    assert len(first.clients) == 1000 and first.next_page_token  # and never asked for again
    assert vars(service) == before and all(vars(service)[k] is v for k, v in before.items())


def test_the_program_lists_every_page_as_text_and_as_one_json_array(
    connect: Connect, root: KeyPairFiles
) -> None:
    _plant_history(connect)
    flags = connect.cli_flags(root)
    done = _pinrpc("admin", "list", "--json", *flags)
    assert done.returncode == 0, done.stderr
    names = [row["name"] for row in json.loads(done.stdout)]
    assert names == ["root", *(f"h{i}" for i in range(1, HISTORY + 1))]
    done = _pinrpc("admin", "list", *flags)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == HISTORY + 1, done.stdout[-300:]


def test_remote_json_is_the_local_json(connect: Connect, root: KeyPairFiles) -> None:
    """Same keys, same time format, same values for the same client."""
    local = subprocess.run(
        [sys.executable, "-m", "server.cli", "list", "--json", "--registry",
         str(connect.server_registry)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    (expected,) = json.loads(local)
    flags = connect.cli_flags(root)
    for argv in (["list"], ["get", "root"]):
        done = _pinrpc("admin", *argv, "--json", *flags)
        assert done.returncode == 0, done.stderr
        (row,) = json.loads(done.stdout)
        assert sorted(row) == sorted(expected), (row, expected)
        assert row == expected
        assert row["not_after"].endswith("+00:00") and row["days_left"] > 0


# -- a hostile server ------------------------------------------------------------------------


def _listing(req: Any) -> admin_pb2.ListRequest:
    return admin_pb2.ListRequest.FromString(req) if isinstance(req, bytes) else req


# The program, with its peak memory written to a file: VmHWM is this process image's own (a
# child's ru_maxrss counts the forking test process's size too).
MEASURED = (
    "import os, re, sys\n"
    "from client import cli\n"
    "try:\n"
    "    code = cli.main(sys.argv[1:])\n"
    "finally:\n"
    "    status = open('/proc/self/status').read()\n"
    "    open(os.environ['PEAK_FILE'], 'w').write(re.search(r'VmHWM:\\s+(\\d+)', status)[1])\n"
    "sys.exit(code)\n"
)


def test_an_oversized_answer_is_refused_in_one_line_and_bounded_memory(
    hostile: Serve, tmp_path: Path
) -> None:
    # 64 MiB in one client record: far more than a page may hold, far less than 256 MiB.
    huge = admin_pb2.ListResponse(clients=[admin_pb2.Client(name="x", subject="s" * (64 << 20))])
    argv = hostile({"Admin": {"List": lambda req, ctx: huge}})
    peak = tmp_path / "peak"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", MEASURED, "admin", "list", "--json", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PEAK_FILE": str(peak)},
    )
    took = time.monotonic() - started
    peak_mb = int(peak.read_text()) / 1024
    assert done.returncode == Exit.RPC, done.stderr
    assert done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    assert "more than 2097152 bytes" in done.stderr and "Traceback" not in done.stderr
    # Refused at its length, never held: the peak of any short call (about 56 MB here).
    assert took < 30 and peak_mb < 100, (took, peak_mb)


@pytest.mark.parametrize("kind", ["repeat", "empty"])
def test_a_looping_token_chain_ends_the_listing_in_one_line(
    hostile: Serve, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    calls: list[str] = []

    def answer(req: Any, ctx: grpc.ServicerContext) -> admin_pb2.ListResponse:
        calls.append(_listing(req).page_token)
        clients = [] if kind == "empty" else [admin_pb2.Client(name=f"c{len(calls)}")]
        return admin_pb2.ListResponse(clients=clients, next_page_token="again")

    code, _, err = cli(["admin", "list", *hostile({"Admin": {"List": answer}})], capsys)
    assert code == Exit.RPC and err.count("\n") == 1, err
    assert "go round in a loop" in err, err
    assert len(calls) <= 2, calls


def test_an_endless_token_chain_ends_after_the_page_bound(
    hostile: Serve, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def answer(req: Any, ctx: grpc.ServicerContext) -> admin_pb2.ListResponse:
        calls.append(_listing(req).page_token)
        n = len(calls)
        return admin_pb2.ListResponse(
            clients=[admin_pb2.Client(name=f"c{n}")], next_page_token=f"t{n}"
        )

    monkeypatch.setattr(client_admin, "MAX_PAGES", 25)
    argv = hostile({"Admin": {"List": answer}})
    code, out, err = cli(["admin", "list", "--json", *argv], capsys)
    assert code == Exit.RPC and err.count("\n") == 1, err
    assert "did not end within 25 pages" in err, err
    assert len(calls) == 25 and calls[:3] == ["", "t1", "t2"], calls
    assert out.startswith("[\n") and not out.rstrip().endswith("]")  # visibly cut short


@pytest.mark.slow
def test_the_real_bound_on_pages_is_reached_in_bounded_time(hostile: Serve) -> None:
    """MAX_PAGES as shipped, one client a page: how long a server can keep the client."""
    count = [0]

    def answer(req: Any, ctx: grpc.ServicerContext) -> admin_pb2.ListResponse:
        count[0] += 1
        return admin_pb2.ListResponse(
            clients=[admin_pb2.Client(name="c")], next_page_token=f"t{count[0]}"
        )

    started = time.monotonic()
    done = _pinrpc("admin", "list", *hostile({"Admin": {"List": answer}}))
    took = time.monotonic() - started
    assert done.returncode == Exit.RPC and "within 10000 pages" in done.stderr, done.stderr
    print(f"{count[0]} pages in {took:.1f} s")
