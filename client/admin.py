"""`pinrpc admin enroll|revoke|permit|list|get`: administer the server remotely as yourself.

Your certificate's permissions must name the Admin service (enrolled with
`--allow '/pinrpc.v1.Admin/*'`); the server applies the same checks as its local CLI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict, SerializeToJsonError

from client.connect import call, connection_flags
from pinrpc.cli import (
    Exit,
    add_allow_flag,
    add_flag,
    add_permit_flags,
    allow_patterns,
    answer_time,
    file_path,
    permit_patterns,
    shown,
    utf8,
)
from pinrpc.errors import AnswerError
from pinrpc.identity import cert_to_pem, load_certificate
from pinrpc.v1 import admin_pb2, admin_pb2_grpc

Rpc = Callable[[admin_pb2_grpc.AdminStub, argparse.Namespace], int]
# List answers with every client ever enrolled, revoked ones too, about 210 bytes each: gRPC's
# default limit on a received message (4 MiB) refused it from about 20,000 of them.
MAX_REPLY = 256 * 1024 * 1024


def add_parser(commands: Any) -> None:
    admin = commands.add_parser(
        "admin",
        help="enroll, revoke, permit and list clients remotely (needs Admin permission)",
    )
    actions = admin.add_subparsers(dest="action", required=True, metavar="ACTION")

    enroll = actions.add_parser("enroll", help="admit a client certificate")
    enroll.add_argument("certificate", type=file_path, help="the new client's certificate (PEM)")
    add_flag(enroll, "--name", required=True, type=utf8, help="unique client name")
    add_allow_flag(enroll)
    enroll.add_argument("--replace", action="store_true", help="re-key an existing client")

    revoke = actions.add_parser("revoke", help="revoke a client by name or fingerprint")
    revoke.add_argument("client", type=utf8, help="the client's name or fingerprint")
    permit = actions.add_parser(
        "permit", help="replace a client's permissions, by name or fingerprint"
    )
    permit.add_argument("client", type=utf8, help="the client's name or fingerprint")
    add_permit_flags(permit)
    listing = actions.add_parser("list", help="all clients, revoked ones included")
    get = actions.add_parser("get", help="one client by name or fingerprint")
    get.add_argument("client", type=utf8, help="the client's name or fingerprint")
    for parser in (enroll, revoke, permit, listing, get):
        connection_flags(parser)
        parser.add_argument("--json", action="store_true", help="print JSON")


# Every field in --json, set or not, so scripts can rely on the keys.
UNSET_TIMES = ("revoked_at", "retire_at")


def _show(clients: list[admin_pb2.Client], as_json: bool) -> None:
    if as_json:
        print(json.dumps([_as_json(c) for c in clients]))
        return
    for c in clients:
        # Server text, and another admin's input: one line per client, whatever it holds.
        methods = shown(",".join(c.allowed_methods)) or "-"
        print(f"{shown(c.name)}  {shown(c.fingerprint)}  {_status(c)}  {methods}")


def _as_json(client: admin_pb2.Client) -> dict[str, Any]:
    try:
        fields = MessageToDict(
            client, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    except SerializeToJsonError as exc:  # a timestamp outside years 1-9999
        raise AnswerError(f"the server answered with an invalid client record: {exc}") from exc
    fields.pop("also_revoked", None)  # `revoke` lists them as clients of their own
    return {**dict.fromkeys(UNSET_TIMES), **fields}


def _status(c: admin_pb2.Client) -> str:
    """As `pinrpc-server list` says it, from the times: ``active`` is false for all of these."""
    now = dt.datetime.now(dt.UTC)
    if c.HasField("revoked_at"):
        return f"revoked {answer_time(c.revoked_at, 'revoked_at'):%Y-%m-%d}"
    if c.HasField("retire_at"):
        retire = answer_time(c.retire_at, "retire_at")
        return f"{'retiring' if retire > now else 'retired'} {retire:%Y-%m-%d %H:%M}"
    if (not_after := answer_time(c.not_after, "not_after")) <= now:
        return f"expired {not_after:%Y-%m-%d}"
    return "active"


def _enroll(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    # Parsed here and sent re-encoded: a key file named by mistake, or a PEM that holds the
    # key too, is refused before anything of it leaves this machine.
    certificate = load_certificate(Path(args.certificate))
    request = admin_pb2.EnrollRequest(
        certificate_pem=cert_to_pem(certificate).decode(),
        name=args.name,
        allowed_methods=allow_patterns(args),
        replace=args.replace,
    )
    _show([stub.Enroll(request, timeout=args.timeout)], args.json)
    return Exit.OK


def _revoke(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    reply = stub.Revoke(admin_pb2.RevokeRequest(client=args.client), timeout=args.timeout)
    # By name, a client in a rotation's overlap loses its retiring certificates too.
    _show([reply, *reply.also_revoked], args.json)
    return Exit.OK


def _permit(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    patterns = permit_patterns(args)
    request = admin_pb2.PermitRequest(client=args.client, allowed_methods=patterns, none=args.none)
    _show([stub.Permit(request, timeout=args.timeout)], args.json)
    return Exit.OK


def _list(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    reply = stub.List(admin_pb2.ListRequest(), timeout=args.timeout)
    _show(list(reply.clients), args.json)
    return Exit.OK


def _get(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    _show([stub.Get(admin_pb2.GetRequest(client=args.client), timeout=args.timeout)], args.json)
    return Exit.OK


ACTIONS: dict[str, Rpc] = {
    "enroll": _enroll,
    "revoke": _revoke,
    "permit": _permit,
    "list": _list,
    "get": _get,
}


def run(args: argparse.Namespace) -> int:
    action = ACTIONS[args.action]
    options = [("grpc.max_receive_message_length", MAX_REPLY)]
    return call(args, lambda channel: action(admin_pb2_grpc.AdminStub(channel), args), options)
