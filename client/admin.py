"""`pinrpc admin enroll|revoke|permit|list|get`: administer the server remotely as yourself.

Your certificate's permissions must name the Admin service (enrolled with
`--allow '/pinrpc.v1.Admin/*'`); the server applies the same checks as its local CLI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import grpc

from client.connect import OWN_CERT_WARNING, call, connection_flags, from_server
from pinrpc.cli import (
    Exit,
    add_allow_flag,
    add_flag,
    add_permit_flags,
    allow_patterns,
    answer_time,
    file_path,
    permit_patterns,
    utf8,
)
from pinrpc.errors import AnswerError
from pinrpc.identity import cert_to_pem, load_certificate
from pinrpc.listing import (
    MAX_PAGE_BYTES,
    PAGE_SIZE,
    ClientRow,
    client_json,
    client_line,
    status,
)
from pinrpc.v1 import admin_pb2, admin_pb2_grpc

Rpc = Callable[[admin_pb2_grpc.AdminStub, argparse.Namespace], int]
# List comes a page at a time: no answer of a pinrpc server is larger, so a hostile one (or a
# man in the middle with the server's certificate) cannot make this client hold gigabytes.
MAX_REPLY = MAX_PAGE_BYTES
# 10 million clients in full pages: a server whose tokens never end cannot keep us forever.
MAX_PAGES = 10_000
# A pinrpc server's pages always move on and end: what to do when they do not.
INCOMPLETE = "the listing printed is incomplete: check that --server is a pinrpc server"
WARN_HELP = f"{OWN_CERT_WARNING}, and mark the clients listed whose certificates do as expiring"


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
        connection_flags(parser, warn_help=WARN_HELP)
        parser.add_argument("--json", action="store_true", help="print JSON")


class Printer:
    """Prints clients as they come: text lines, or one JSON array opened by the first batch
    and closed by end(). A batch is checked whole before any of it is printed."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._json, self._warn_days = args.json, args.warn_days
        self._opened = False

    def batch(self, clients: Sequence[admin_pb2.Client]) -> None:
        now = dt.datetime.now(dt.UTC)
        rows = [_as_json(c, now, self._warn_days) for c in clients]
        if not self._json:
            # As `pinrpc-server list` prints them; names padded page by page, as they come.
            width = max((len(c.name) for c in clients), default=0)
            lines = [
                client_line(r, _status(c, now), width) for c, r in zip(clients, rows, strict=True)
            ]
            if lines:
                print("\n".join(lines))
            return
        items = [json.dumps(row) for row in rows]
        if items:
            print(",\n" if self._opened else "[\n", ",\n".join(items), sep="", end="")
            self._opened = True

    def end(self) -> None:
        if self._json:
            print("\n]" if self._opened else "[]")


def _show(clients: list[admin_pb2.Client], args: argparse.Namespace) -> None:
    printer = Printer(args)
    printer.batch(clients)
    printer.end()


def _time(c: admin_pb2.Client, field: Literal["revoked_at", "retire_at"]) -> dt.datetime | None:
    return answer_time(getattr(c, field), field) if c.HasField(field) else None


def _as_json(c: admin_pb2.Client, now: dt.datetime, warn_days: int) -> ClientRow:
    """As `pinrpc-server list --json` prints it: every key, times in the same form, and
    ``active``, ``days_left`` and ``expiring`` reckoned from the times the same way."""
    return client_json(
        name=c.name,
        fingerprint=c.fingerprint,
        spki_sha256=c.spki_sha256,
        subject=c.subject,
        allowed_methods=c.allowed_methods,
        enrolled_at=answer_time(c.enrolled_at, "enrolled_at"),
        not_after=answer_time(c.not_after, "not_after"),
        revoked_at=_time(c, "revoked_at"),
        retire_at=_time(c, "retire_at"),
        now=now,
        warn_days=warn_days,
    )


def _status(c: admin_pb2.Client, now: dt.datetime) -> str:
    not_after = answer_time(c.not_after, "not_after")
    return status(_time(c, "revoked_at"), _time(c, "retire_at"), not_after, now)


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
    _show([stub.Enroll(request, timeout=args.timeout)], args)
    return Exit.OK


def _revoke(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    reply = stub.Revoke(admin_pb2.RevokeRequest(client=args.client), timeout=args.timeout)
    # By name, a client in a rotation's overlap loses its retiring certificates too.
    _show([reply, *reply.also_revoked], args)
    return Exit.OK


def _permit(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    patterns = permit_patterns(args)
    request = admin_pb2.PermitRequest(client=args.client, allowed_methods=patterns, none=args.none)
    _show([stub.Permit(request, timeout=args.timeout)], args)
    return Exit.OK


def _list(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    printer, token, seen = Printer(args), "", set[bytes]()
    for _ in range(MAX_PAGES):
        request = admin_pb2.ListRequest(page_size=PAGE_SIZE, page_token=token)
        try:
            reply = stub.List(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not from_server(exc):
                raise AnswerError(
                    f"the server answered with more than {MAX_REPLY} bytes, more than a page "
                    "of clients: not a pinrpc server, or one from before paging (upgrade it)"
                ) from exc
            raise
        printer.batch(reply.clients)
        token = reply.next_page_token
        if not token:
            printer.end()
            return Exit.OK
        digest = hashlib.sha256(token.encode()).digest()
        if not reply.clients or digest in seen:  # a pinrpc server moves on every page
            raise AnswerError(f"the server's pages go round in a loop; {INCOMPLETE}")
        seen.add(digest)
    raise AnswerError(f"the server's listing did not end within {MAX_PAGES} pages; {INCOMPLETE}")


def _get(stub: admin_pb2_grpc.AdminStub, args: argparse.Namespace) -> int:
    _show([stub.Get(admin_pb2.GetRequest(client=args.client), timeout=args.timeout)], args)
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
