"""`pinrpc rotate`: a new key pair, admitted by the server over the old one's channel."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

import grpc

from client import keyfiles
from client.connect import DAYS, PROG, call, connection_flags, say, settle
from pinrpc import proof
from pinrpc.channel import passphrase_from_env
from pinrpc.cli import Exit, add_flag, answer_time, at_least, shown
from pinrpc.errors import AnswerError, IdentityError
from pinrpc.identity import (
    DEFAULT_DAYS,
    KEY_TYPES,
    Fingerprint,
    cert_to_pem,
    generate_key,
    key_to_pem,
    load_certificate,
    self_signed_certificate,
)
from pinrpc.v1 import echo_pb2, echo_pb2_grpc, identity_pb2, identity_pb2_grpc


def add_parser(commands: Any) -> None:
    rotate = commands.add_parser(
        "rotate",
        help="replace your key pair: the server enrolls the new one under your name",
        description="Makes a new key pair, has the server enroll it over your current "
        "(authenticated) channel, then swaps the files. The old pair stays valid until the "
        "server's overlap ends, and on disk as *.old until the next rotate.",
    )
    connection_flags(rotate)
    add_flag(rotate, "--key-type", default="p256", choices=KEY_TYPES, help="new key algorithm")
    add_flag(rotate, "--days", default=str(DEFAULT_DAYS), type=DAYS, help="new validity in days")
    add_flag(
        rotate,
        "--overlap",
        type=at_least(int, 0, 2**32 - 1),  # the proto field is a uint32
        help="seconds the old pair keeps working (default: the server's, 24 h unless set; "
        "0 retires it at once)",
    )


# The server answered no: nothing was enrolled, so the staged pair can go.
REFUSED = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
)


def run(args: argparse.Namespace) -> int:
    cert_path, key_path = Path(args.cert), Path(args.key)
    # First, before the lock on the certificate (a killed swap may have moved it away).
    if note := keyfiles.recover(cert_path, key_path, tidy=True):
        say(f"{PROG}: {note}")
    # An earlier rotation whose outcome is unknown: the server's answer settles it first.
    if keyfiles.unsettled(cert_path, key_path) and (settled := settle(args)):
        if settled.code != Exit.OK:
            say(f"{PROG}: error: {settled.note}")
            return settled.code
        say(f"{PROG}: {settled.note}")
        if settled.rotated:  # that rotation happened: this one's work is done
            return Exit.OK
    with keyfiles.rotating(cert_path):
        return _rotate(args, cert_path, key_path)


def _rotate(args: argparse.Namespace, cert_path: Path, key_path: Path) -> int:
    keyfiles.check_targets(cert_path, key_path)
    keyfiles.remove_expired_old_pair(cert_path, key_path)
    key = generate_key(args.key_type)
    unknown: list[str] = []  # set when the server may have enrolled the staged pair

    def rpc(channel: grpc.Channel) -> int:
        # Nothing is sent or written until the current pair is known to get in.
        me = echo_pb2_grpc.EchoStub(channel).WhoAmI(echo_pb2.WhoAmIRequest(), timeout=args.timeout)
        # The server's name for us, not the current certificate's CN: enrollment accepts
        # certificates made by any tool, whose CN need not be a valid client name.
        successor = self_signed_certificate(key, me.name, days=args.days)
        successor_pem = cert_to_pem(successor)
        # Bound to the certificate this channel presents: the server checks it against the TLS
        # peer, so the proof admits this successor for this caller only (pinrpc/proof.py).
        current_cert = load_certificate(cert_path)
        current = Fingerprint.of(current_cert)
        signature = proof.sign(key, proof.rotation_binding(current), successor, proof.ROTATION)
        request = identity_pb2.RotateRequest(
            certificate_pem=successor_pem.decode(), proof=signature
        )
        if args.overlap is not None:
            request.overlap_seconds = args.overlap
        # Staged before the server retires anything: a full disk shows up now.
        keyfiles.stage_pair(
            cert_path, key_path, successor_pem, key_to_pem(key, passphrase_from_env())
        )
        new_cert, new_key = keyfiles.new(cert_path), keyfiles.new(key_path)
        try:
            reply = identity_pb2_grpc.IdentityStub(channel).Rotate(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            if exc.code() in REFUSED:  # the certificate first: a lone key.new is known junk
                new_cert.unlink(missing_ok=True)
                new_key.unlink(missing_ok=True)
            else:
                unknown.append(str(Fingerprint.of(successor)))
            raise
        except KeyboardInterrupt:  # Ctrl-C while the server decides: as unknown as a timeout
            unknown.append(str(Fingerprint.of(successor)))
            raise
        previous = reply.previous
        ends = previous.retire_at if previous.HasField("retire_at") else previous.revoked_at
        until: dt.datetime | None = None
        odd = ""
        try:
            until = answer_time(ends, "end for the old certificate")
        except AnswerError as exc:
            odd = str(exc)  # the server trusts the staged pair all the same: swap it in
        if until is not None:  # no server admits it later; a hostile one's 9999 kept the key
            until = min(until, current_cert.not_valid_after_utc)
        # The server already trusts the staged pair: keep it whatever happens here, and swap
        # it in before printing, which fails on a closed stdout (BrokenPipeError, exit 0).
        # Fingerprints printed are computed here: the server's answer is only its word.
        staged = Fingerprint.of(successor)
        kept = (
            f"it is {new_cert} and {new_key} (fingerprint {staged}); "
            f"{keyfiles.finish_by_hand(cert_path, key_path)}"
        )
        try:
            keyfiles.swap_in(cert_path, key_path, new_cert, new_key, until)
        except IdentityError as exc:
            say(f"{PROG}: error: the server enrolled the new pair, but {exc}")
            say(f"  {kept}")
            return Exit.ERROR
        except KeyboardInterrupt:
            if keyfiles.journal(cert_path).exists():  # moves undone, the journal kept
                say(
                    f"{PROG}: interrupted after the server enrolled the new pair; the next "
                    f"`{PROG}` call with {cert_path} swaps it in"
                )
            elif new_key.exists():  # swap_in put everything back
                say(f"{PROG}: interrupted after the server enrolled the new pair; {kept}")
            raise
        works = f"works until {until:%Y-%m-%d %H:%M} UTC" if until else f"until unknown: {odd}"
        print(f"rotated {shown(reply.client.name)}")
        print(f"  new fingerprint  {staged}")
        print(f"  old fingerprint  {current} ({works})")
        print(f"  files            {cert_path}, {key_path} (old pair kept as *.old until then)")
        return Exit.OK

    try:
        return call(args, rpc)
    finally:
        if unknown:
            say(
                f"  the outcome is unknown: the server may have enrolled the new pair "
                f"(fingerprint {unknown[0]}), kept as {keyfiles.new(cert_path)} and "
                f"{keyfiles.new(key_path)}; the next `{PROG}` call with {cert_path} asks the "
                f"server and swaps it in or removes it"
            )
