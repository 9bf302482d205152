"""A client revoked while its channel is open, on a real server: it gets no further page of a
listing and no further reflection answer on the channel it already has (no new handshake)."""

from __future__ import annotations

import queue

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pinrpc.v1 import admin_pb2, admin_pb2_grpc
from tests.conftest import Connect, MakeClient, code_of, revoke


def test_a_revoked_client_continues_neither_a_listing_nor_a_reflection_stream(
    connect: Connect, make_client: MakeClient
) -> None:
    lister = make_client("lister")
    connect.enroll(lister, "lister", "/pinrpc.v1.Admin/List")
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    with connect.channel(lister.cert_path, lister.key_path) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        asks: queue.Queue[reflection_pb2.ServerReflectionRequest | None] = queue.Queue()
        stream = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stream.ServerReflectionInfo(iter(asks.get, None), timeout=10)
        # Allowed while enrolled: a first page, and the reflection stream answers.
        first = admin.List(admin_pb2.ListRequest(page_size=1))
        asks.put(ask)
        assert "pinrpc.v1.Admin" in {s.name for s in next(replies).list_services_response.service}
        revoke(connect.server_registry, "lister")
        connect.server.trust.poll()
        # Denied on the same connection: the next page, and the open stream.
        token = first.next_page_token
        page = admin_pb2.ListRequest(page_size=1, page_token=token)
        assert code_of(lambda: admin.List(page)) == grpc.StatusCode.PERMISSION_DENIED
        asks.put(ask)
        with pytest.raises(grpc.RpcError) as ended:
            next(replies)
        assert ended.value.code() == grpc.StatusCode.PERMISSION_DENIED
        asks.put(None)
