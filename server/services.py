"""Thin servicers: they read the caller's identity and answer; nothing else lives here."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from pinrpc.v1 import echo_pb2, echo_pb2_grpc
from server.auth import caller


class EchoService(echo_pb2_grpc.EchoServicer):
    def WhoAmI(
        self, request: echo_pb2.WhoAmIRequest, context: grpc.ServicerContext
    ) -> echo_pb2.WhoAmIResponse:
        who = caller()
        return echo_pb2.WhoAmIResponse(
            name=who.name, fingerprint=str(who.fingerprint), allowed_methods=who.allowed_methods
        )

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
