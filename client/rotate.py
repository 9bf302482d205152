"""`pinrpc rotate`: a new key pair, admitted by the server over the old one's channel."""

from __future__ import annotations

import argparse
import datetime as dt
import os
from pathlib import Path
from typing import Any

import grpc
from cryptography.x509.oid import NameOID

from client import keyfiles
from client.connect import call, connection_flags
from pinrpc.channel import PASSPHRASE_ENV
from pinrpc.cli import Exit, add_flag
from pinrpc.identity import (
    DEFAULT_DAYS,
    KEY_TYPES,
    cert_to_pem,
    generate_key,
    key_to_pem,
    load_certificate,
    self_signed_certificate,
)
from pinrpc.v1 import identity_pb2, identity_pb2_grpc


def add_parser(commands: Any) -> None:
    rotate = commands.add_parser(
        "rotate",
        help="replace your key pair: the server enrolls the new one under your name",
        description="Makes a new key pair, has the server enroll it over your current "
        "(authenticated) channel, then swaps the files. The old pair stays valid, and on "
        "disk as *.old, until the server's overlap ends.",
    )
    connection_flags(rotate)
    add_flag(rotate, "--key-type", default="p256", choices=KEY_TYPES, help="new key algorithm")
    add_flag(rotate, "--days", default=str(DEFAULT_DAYS), type=int, help="new validity in days")
    add_flag(
        rotate,
        "--overlap",
        type=int,
        help="seconds the old pair keeps working (default: the server's, 24 h unless set; "
        "0 retires it at once)",
    )


def run(args: argparse.Namespace) -> int:
    cert_path, key_path = Path(args.cert), Path(args.key)
    keyfiles.remove_expired_old_pair(cert_path, key_path)
    current = load_certificate(cert_path)
    names = current.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(names[0].value) if names else "client"
    key = generate_key(args.key_type)
    successor = self_signed_certificate(key, name, days=args.days)
    passphrase = os.environ.get(PASSPHRASE_ENV, "").encode() or None
    # Stage first: if the disk is full we find out before the server retires anything.
    new_key = keyfiles.stage(key_path, key_to_pem(key, passphrase), 0o600)
    new_cert = keyfiles.stage(cert_path, cert_to_pem(successor), 0o644)
    request = identity_pb2.RotateRequest(certificate_pem=cert_to_pem(successor).decode())
    if args.overlap is not None:
        request.overlap_seconds = args.overlap

    def rpc(channel: grpc.Channel) -> int:
        reply = identity_pb2_grpc.IdentityStub(channel).Rotate(request, timeout=args.timeout)
        previous = reply.previous
        ends = previous.retire_at if previous.HasField("retire_at") else previous.revoked_at
        until = ends.ToDatetime(dt.UTC)
        keyfiles.swap_in(cert_path, key_path, new_cert, new_key, until)
        print(f"rotated {reply.client.name}")
        print(f"  new fingerprint  {reply.client.fingerprint}")
        print(f"  old fingerprint  {previous.fingerprint} (works until {until:%Y-%m-%d %H:%M} UTC)")
        print(f"  files            {cert_path}, {key_path} (old pair kept as *.old until then)")
        return Exit.OK

    try:
        code = call(args, rpc)
    finally:
        for staged in (new_key, new_cert):
            staged.unlink(missing_ok=True)  # only left over when the rotation failed
    return code
