"""Admin.List attacked by enrolled callers with narrow permissions, on a real server.

A caller allowed only `/pinrpc.v1.Admin/List` that sends neither page_size nor page_token (as
clients from before paging do) got every client in one answer: each call read every row and
built the whole answer in memory, whatever the registry's size. Such answers now stop at gRPC's
default 4 MiB receive limit.
"""

from __future__ import annotations

import time

import grpc
import pytest

from pinrpc.channel import secure_channel
from pinrpc.v1 import admin_pb2, admin_pb2_grpc
from server.admin import UNPAGED_BYTES
from tests.conftest import SERVER_NAME, Connect, MakeClient
from tests.test_admin_list_paging import _plant_history

LISTER = "/pinrpc.v1.Admin/List"
BIG = 20_000  # planted rows: about 5.6 MB as one answer
GREEDY = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]  # would take it all


def test_an_unpaged_answer_larger_than_an_old_client_receives_is_refused(
    connect: Connect, make_client: MakeClient
) -> None:
    lister = make_client("lister")
    connect.enroll(lister, "lister", LISTER)
    target, ca = connect.target, connect.devca.ca_path

    def stub() -> tuple[grpc.Channel, admin_pb2_grpc.AdminStub]:
        channel = secure_channel(
            target, lister.cert_path, lister.key_path, ca, SERVER_NAME, options=GREEDY
        )
        return channel, admin_pb2_grpc.AdminStub(channel)

    channel, admin = stub()
    with channel:
        # Allowed: a small registry still comes whole, as clients from before paging expect.
        assert [c.name for c in admin.List(admin_pb2.ListRequest()).clients] == ["lister"]
        _plant_history(connect, BIG, "lister")
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            admin.List(admin_pb2.ListRequest(), timeout=30)
        took = time.monotonic() - start
        # Denied, in one line that says to page, before building more than an old client takes.
        details = refused.value.details() or ""
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "page" in details and "\n" not in details, details
        # Pages still list it all.
        page = admin.List(admin_pb2.ListRequest(page_size=10))
        assert len(page.clients) == 10 and page.next_page_token
    print(f"unpaged List of {BIG + 1} clients refused in {took:.3f} s")


def test_an_unpaged_answer_is_refused_by_its_size_on_the_wire(
    connect: Connect, make_client: MakeClient
) -> None:
    """The cap counted the records' own bytes, not the 3 bytes that frame each in the answer:
    an answer of just under 4 MiB of records, but over 4 MiB as sent, went out, and a client
    with gRPC's default limit failed with its own "larger than max" instead of the server's
    line."""
    lister = make_client("lister")
    connect.enroll(lister, "lister", LISTER)
    target, ca = connect.target, connect.devca.ca_path
    with secure_channel(target, lister.cert_path, lister.key_path, ca, SERVER_NAME) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        (own,) = admin.List(admin_pb2.ListRequest()).clients
        planted = admin_pb2.Client()  # a planted row's record: 6-character name, revoked
        planted.CopyFrom(own)
        planted.name, planted.fingerprint = "h00001", ":".join(["AB"] * 32)
        planted.revoked_at.CopyFrom(own.enrolled_at)
        count = (UNPAGED_BYTES - own.ByteSize()) // planted.ByteSize()
        _plant_history(connect, count, "lister", "printf('h%05d', i)")
        records = own.ByteSize() + count * planted.ByteSize()
        assert records <= UNPAGED_BYTES < records + 3 * (count + 1)  # under, but not as sent
        with pytest.raises(grpc.RpcError) as refused:
            admin.List(admin_pb2.ListRequest(), timeout=30)
    details = refused.value.details() or ""
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "list them a page at a time" in details, details  # the server's, not the client's
