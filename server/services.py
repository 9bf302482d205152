"""Thin servicers: they read the caller's identity and answer; nothing else lives here."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc

from pinrpc.v1 import echo_pb2, echo_pb2_grpc
from server.auth import caller
from server.trust import EnrolledSet


class EchoService(echo_pb2_grpc.EchoServicer):
    def __init__(self, enrolled: Callable[[], EnrolledSet] | None = None) -> None:
        # The snapshot the per-call check admits by (None: WhoAmI gives no dates): its row for
        # the caller holds them, read here rather than carried by every call's identity.
        self._enrolled = enrolled

    def WhoAmI(
        self, request: echo_pb2.WhoAmIRequest, context: grpc.ServicerContext
    ) -> echo_pb2.WhoAmIResponse:
        who = caller()
        reply = echo_pb2.WhoAmIResponse(
            name=who.name, fingerprint=str(who.fingerprint), allowed_methods=who.allowed_methods
        )
        row = self._enrolled().lookup(who.fingerprint) if self._enrolled else None
        # No row only if a change since the check dropped the caller: then no end is promised.
        if row is not None:
            ends = [row.not_after, *([row.retire_at] if row.retire_at else [])]
            reply.admitted_until.FromDatetime(min(ends))
            reply.retiring = row.retire_at is not None
        return reply

    def Echo(
        self, request: echo_pb2.EchoRequest, context: grpc.ServicerContext
    ) -> echo_pb2.EchoResponse:
        return echo_pb2.EchoResponse(message=request.message, caller=caller().name)

    def EchoStream(
        self, request_iterator: Iterator[echo_pb2.EchoRequest], context: grpc.ServicerContext
    ) -> Iterator[echo_pb2.EchoResponse]:
        name = caller().name
        for request in request_iterator:
            yield echo_pb2.EchoResponse(message=request.message, caller=name)
