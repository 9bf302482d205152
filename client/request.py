"""`pinrpc request-enrollment`: ask to be admitted, proving you hold the key; then wait.

Talks to the server's optional --enrollment-listen port with server-only TLS (your
certificate is not trusted yet). The operator sees the request in `pinrpc-server pending` and
approves it by fingerprint, which you compare out of band with what this command printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import grpc

from client.connect import (
    PROG,
    REFUSED_INPUT,
    connection_flags,
    from_server,  # one test of "the server answered", the one connect.py uses
    proxy_hint,
    say,
    warn_if_expiring,
)
from pinrpc import proof
from pinrpc.channel import REENROLL_HINT, dates_problem, load_pair, roots_from_env
from pinrpc.cli import Exit, add_flag, answer_time, shown, utf8
from pinrpc.identity import Fingerprint, cert_to_pem, load_ca_bundle
from pinrpc.v1 import enrollment_pb2, enrollment_pb2_grpc


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "request-enrollment",
        help="ask the operator to admit your certificate (the server's enrollment port)",
    )
    connection_flags(p)  # --server is the enrollment port here
    add_flag(p, "--name", required=True, type=utf8, help="the client name you ask for")


def run(args: argparse.Namespace) -> int:
    cert, key = load_pair(
        args.cert, args.key, insecure_key_permissions=args.insecure_key_permissions
    )
    if problem := dates_problem(cert, args.cert):
        # The operator would be handed a fingerprint to approve that no server admits.
        what, fix = problem
        if fix == REENROLL_HINT:  # its words are for an enrolled pair; this one is not, yet
            fix = "make a new key pair (`pinrpc keygen NAME --force`) and ask with it"
        say(f"{PROG}: error: your {what}; the server refuses it")
        say(f"  {fix}")
        return Exit.CONNECT
    # The operator would admit a pair about to expire: say so before asking.
    warn_if_expiring(args, cert, "ask with a new pair from `pinrpc keygen` instead")
    roots = load_ca_bundle(Path(args.ca)) if args.ca else roots_from_env()
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    creds = grpc.ssl_channel_credentials(root_certificates=roots)
    with grpc.secure_channel(args.server, creds, options=options) as channel:
        stub = enrollment_pb2_grpc.EnrollmentStub(channel)
        try:
            challenge = stub.Challenge(enrollment_pb2.ChallengeRequest(), timeout=args.timeout)
            request = enrollment_pb2.EnrollmentRequest(
                certificate_pem=cert_to_pem(cert).decode(),
                name=args.name,
                nonce=challenge.nonce,
                signature=proof.sign(key, challenge.nonce, cert),
            )
            ticket = stub.Request(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            return _explain(exc, args.server)
    # What the operator is told to approve is computed here, never taken from the answer: a
    # server that queued another certificate must not have its fingerprint passed on.
    mine = Fingerprint.of(cert)
    if ticket.fingerprint != str(mine):
        say(
            f"{PROG}: error: the server queued a request for {ticket.fingerprint[:100]!r}, not "
            f"for your certificate {mine}: do not pass that on; tell the operator"
        )
        return Exit.ERROR
    print(f"requested enrollment as {args.name!r}; nothing is trusted until the operator approves")
    print(f"  fingerprint  {mine}")
    print(f"  waits until  {answer_time(ticket.expires_at, 'expiry'):%Y-%m-%d %H:%M} UTC")
    print("Tell the operator this fingerprint through another channel; they run")
    print(f"  pinrpc-server approve {mine}")
    return Exit.OK


def _explain(exc: grpc.RpcError, server: str) -> int:
    code, details = exc.code(), shown(exc.details() or "")
    if code == grpc.StatusCode.UNAVAILABLE and from_server(exc):
        # Its registry failed: the address, --ca and --server-name were right.
        say(f"{PROG}: error: the enrollment port at {server} answered, but the server could not "
            f"take the request: {details}")  # fmt: skip
        return Exit.RPC
    if code in (*REFUSED_INPUT, grpc.StatusCode.RESOURCE_EXHAUSTED):
        say(f"{PROG}: error: the server refused the request: {details}")
        return Exit.ERROR
    if code == grpc.StatusCode.UNIMPLEMENTED:
        say(
            f"{PROG}: error: {server} takes no enrollment requests "
            "(is it the server's --enrollment-listen port?)"
        )
        return Exit.ERROR
    if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        # Any other status is an answer (UNKNOWN: the server's handler failed): no hint
        # about the address, which was right.
        say(f"{PROG}: error: the enrollment port at {server} answered {code.name}: {details}")
        return Exit.RPC
    say(f"{PROG}: error: cannot reach the enrollment port at {server}: {details}")
    say(
        "  check the address, --ca and --server-name, and that the server runs "
        "with --enrollment-listen."
    )
    if hint := proxy_hint():
        say(f"  {hint}")
    return Exit.CONNECT
