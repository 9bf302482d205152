"""Admin.List attacked by enrolled callers with narrow permissions, on a real server.

A caller allowed only `/pinrpc.v1.Admin/List` that sends neither page_size nor page_token (as
clients from before paging do) got every client in one answer: each call read every row and
built the whole answer in memory, whatever the registry's size, though no client from before
paging could receive more than gRPC's default 4 MiB.
"""

from __future__ import annotations

import time

import grpc
import pytest

from pinrpc.channel import secure_channel
from pinrpc.v1 import admin_pb2, admin_pb2_grpc
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
