"""Connecting as a pinrpc client: the shared flags, the call wrapper, and failure explanations."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

from client import keyfiles
from pinrpc.channel import dates_problem, load_pair, pair_credentials
from pinrpc.cli import Exit, add_flag, answer_time, at_least, file_path, host_port, shown, utf8
from pinrpc.errors import ERROR_METADATA, AnswerError, IdentityError
from pinrpc.identity import Fingerprint, load_certificate
from pinrpc.v1 import echo_pb2, echo_pb2_grpc

PROG = "pinrpc"
ROTATE_HINT = "rotate it now: `pinrpc rotate` (same connection flags)"


# Bounded so that a typo is a usage error, not an overflow deep inside datetime or gRPC.
DAYS = at_least(int, 1, 36500)
OWN_CERT_WARNING = "warn when your certificate expires within this many days"


def server_flags(
    p: argparse.ArgumentParser, *, timeout_help: str, warn_help: str = OWN_CERT_WARNING
) -> None:
    """The flags doctor shares with the commands that call: where, how long, which names."""
    add_flag(p, "--server", required=True, type=host_port(), help="server address HOST:PORT")
    add_flag(
        p,
        "--ca",
        type=file_path,
        help="PEM roots to verify the server with (default: system/gRPC roots)",
    )
    add_flag(
        p, "--server-name", type=utf8, help="name to expect in the server certificate (tests/dev)"
    )
    add_flag(p, "--timeout", default="10", type=at_least(float, 0.001, 86400.0), help=timeout_help)
    add_flag(
        p,
        "--warn-days",
        default="30",
        type=at_least(int, 0, 36500),
        help=warn_help,
    )


def connection_flags(p: argparse.ArgumentParser, *, warn_help: str = OWN_CERT_WARNING) -> None:
    server_flags(p, timeout_help="seconds to wait for the call", warn_help=warn_help)
    add_flag(p, "--cert", required=True, type=file_path, help="your certificate (NAME.crt)")
    add_flag(p, "--key", required=True, type=file_path, help="your private key (NAME.key)")
    key_permissions_flag(p)


def key_permissions_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--insecure-key-permissions",
        action="store_true",
        help="use a private key even if its group or other users can read it",
    )


def warn_if_expiring(args: argparse.Namespace, certificate: x509.Certificate, hint: str) -> None:
    """One warning line when ``--cert`` expires within ``--warn-days``."""
    not_after = certificate.not_valid_after_utc
    left = not_after - dt.datetime.now(dt.UTC)
    if left < dt.timedelta(days=args.warn_days):
        say(
            f"{PROG}: warning: your certificate {Path(args.cert).absolute()} expires in "
            f"{left.days} days ({not_after:%Y-%m-%d %H:%M} UTC); {hint}"
        )


def call(
    args: argparse.Namespace,
    rpc: Callable[[grpc.Channel], int],
    options: Sequence[tuple[str, Any]] = (),
) -> int:
    """Run ``rpc`` on a channel made from the connection flags and ``options``; explain
    failures."""
    cert, key = Path(args.cert), Path(args.key)
    if note := keyfiles.recover(cert, key):  # a killed rotate or keygen
        say(f"{PROG}: {note}")
    if keyfiles.unsettled(cert, key):
        # The server may have enrolled it, and retired this pair (overlap 0): ask it.
        try:
            if settled := settle(args, refuse_busy=False):
                say(f"{PROG}: {'' if settled.code == Exit.OK else 'warning: '}{settled.note}")
        except IdentityError as exc:  # the call goes on with the pair in place
            say(f"{PROG}: warning: {exc}")
    certificate, private_key = load_pair(
        args.cert, args.key, insecure_key_permissions=args.insecure_key_permissions
    )
    creds = pair_credentials(certificate, private_key, args.ca)
    fingerprint = Fingerprint.of(certificate)
    if problem := dates_problem(certificate, args.cert):
        what, fix = problem
        say(f"{PROG}: error: your {what}; the server refuses it")
        say(f"  {fix}")
        return Exit.CONNECT
    warn_if_expiring(args, certificate, ROTATE_HINT)
    with _channel(args, creds, options) as channel:
        try:
            return rpc(channel)
        except grpc.RpcError as exc:
            code = explain(exc, args, fingerprint)
            if code == Exit.CONNECT and (hint := proxy_hint()):
                say(f"  {hint}")
            return code


def _channel(
    args: argparse.Namespace,
    creds: grpc.ChannelCredentials,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    if args.server_name:
        options = [*options, ("grpc.ssl_target_name_override", args.server_name)]
    return grpc.secure_channel(args.server, creds, options=options)


# A rotate staged its pair this recently: the server may still be deciding (its registry
# waits up to 5 s per try, 3 tries), so a refusal now does not mean it never happens.
STAGED_GRACE = dt.timedelta(minutes=2)


@dataclasses.dataclass(frozen=True)
class Settled:
    code: Exit  # OK when the files changed, else why nothing did
    note: str  # one line
    rotated: bool = False  # the staged pair is now in place


def settle(args: argparse.Namespace, *, refuse_busy: bool = True) -> Settled | None:
    """An earlier rotation whose outcome is unknown (``keyfiles.unsettled``): ask the server
    with each pair, and swap the staged pair in or drop it. None if nothing is staged, or
    another rotate of the pair runs (``refuse_busy=False``)."""
    cert, key = Path(args.cert), Path(args.key)
    staged_cert, staged_key = keyfiles.new(cert), keyfiles.new(key)
    with keyfiles.rotating(cert, refuse_busy=refuse_busy) as held:
        if not (held and keyfiles.unsettled(cert, key)):
            return None
        staged = load_pair(
            staged_cert, staged_key, insecure_key_permissions=args.insecure_key_permissions
        )[0]
        fingerprint, staged_answer = Fingerprint.of(staged), _whoami(args, staged_cert, staged_key)
        # Asked with the pair in place, which is the retiring one if the rotation happened:
        # WhoAmI tells only the caller's own end, and the staged pair's is its notAfter.
        current_answer = _whoami(args, cert, key)
        unknown = f"the outcome of an earlier rotation ({staged_cert}, {staged_key})"
        if isinstance(staged_answer, echo_pb2.WhoAmIResponse):
            names = staged.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            # The name rotate made it for: the server's name for the current pair then.
            made_for = str(names[0].value) if names else ""
            expected = (
                current_answer.name
                if isinstance(current_answer, echo_pb2.WhoAmIResponse)
                else made_for
            )
            if staged_answer.name != expected:
                return Settled(
                    Exit.ERROR,
                    f"the server admits {staged_cert} as {staged_answer.name!r}, not as "
                    f"{expected!r}; nothing changed: {keyfiles.finish_by_hand(cert, key)}",
                )
            until, old = _old_end(current_answer, load_certificate(cert).not_valid_after_utc)
            keyfiles.settle_forward(cert, key, fingerprint, until)
            return Settled(
                Exit.OK,
                f"settled {unknown}: the server admits the new pair as {staged_answer.name}, now "
                f"in place as {cert} and {key}; the old pair is kept as *.old ({old})",
                rotated=True,
            )
        if isinstance(current_answer, echo_pb2.WhoAmIResponse) and refused_at_handshake(
            staged_answer
        ):
            age = dt.datetime.now(dt.UTC).timestamp() - staged_cert.stat().st_mtime
            if age < STAGED_GRACE.total_seconds():
                return Settled(
                    Exit.ERROR,
                    f"the server refuses {staged_cert}, staged {age:.0f} s ago, and may still "
                    f"be deciding {unknown}; nothing changed: run this again in "
                    f"{STAGED_GRACE.seconds // 60} minutes",
                )
            keyfiles.drop_staged(cert, key, fingerprint)
            return Settled(
                Exit.OK,
                f"settled {unknown}: the server refuses the new pair and admits this one, so the "
                f"rotation never happened; removed {staged_cert} and {staged_key}",
            )
        failed = (
            staged_answer if isinstance(current_answer, echo_pb2.WhoAmIResponse) else current_answer
        )
        return Settled(
            Exit.CONNECT,
            f"cannot tell {unknown} from {args.server}: {failed.code().name}: "
            f"{shown(failed.details() or '')}; nothing changed (the next `{PROG}` call asks again)",
        )


UNKNOWN_OLD_END = "its end unknown here: the next rotate replaces it"


def _old_end(
    answer: echo_pb2.WhoAmIResponse | grpc.RpcError, not_after: dt.datetime
) -> tuple[dt.datetime | None, str]:
    """The end of the old pair after a settled rotation, from the server's answer to it, and
    how to say it. No later than the certificate's ``not_after``: no server admits it past
    that, and a later end (a hostile server's) kept its private key on disk for nothing."""
    if not isinstance(answer, echo_pb2.WhoAmIResponse):
        if refused_at_handshake(answer):  # refused now: it has ended
            return dt.datetime.now(dt.UTC), "no longer admitted"
        return None, UNKNOWN_OLD_END
    try:
        until = admitted_until(answer)
    except AnswerError as exc:  # the new pair is admitted all the same
        return None, f"its end unknown: {exc}"
    if until is None:  # a server that does not say
        return None, UNKNOWN_OLD_END
    until = min(until, not_after)
    return until, f"admitted until {until:%Y-%m-%d %H:%M} UTC"


def admitted_until(reply: echo_pb2.WhoAmIResponse) -> dt.datetime | None:
    """When the server stops admitting the certificate that asked; None if it does not say.
    Raises AnswerError for a date protobuf cannot hold."""
    if not reply.HasField("admitted_until"):
        return None
    return answer_time(reply.admitted_until, "end of admission for your certificate")


def _whoami(
    args: argparse.Namespace, cert: Path, key: Path
) -> echo_pb2.WhoAmIResponse | grpc.RpcError:
    """The server's answer to this pair, or how the call failed."""
    pair = load_pair(cert, key, insecure_key_permissions=args.insecure_key_permissions)
    with _channel(args, pair_credentials(*pair, args.ca)) as channel:
        try:
            stub = echo_pb2_grpc.EchoStub(channel)
            return stub.WhoAmI(echo_pb2.WhoAmIRequest(), timeout=args.timeout)
        except grpc.RpcError as exc:
            return exc


# How a handshake the server refused (a certificate it does not admit) ends for the client.
REFUSED_AT_HANDSHAKE = ("socket closed", "handshake", "connection reset")


def refused_at_handshake(exc: grpc.RpcError) -> bool:
    details = (exc.details() or "").lower()
    return (
        exc.code() == grpc.StatusCode.UNAVAILABLE
        and not from_server(exc)
        and "verif" not in details  # the server's certificate failed, not ours
        and any(sign in details for sign in REFUSED_AT_HANDSHAKE)
    )


def proxy_hint() -> str | None:
    """The HTTP proxy gRPC sends connections through, which its errors never name (it reads
    these lowercase variables only, in this order)."""
    for variable in ("grpc_proxy", "https_proxy", "http_proxy"):
        if value := os.environ.get(variable):
            where = value.rpartition("@")[2]  # not a password in user:password@host
            return (
                f"{variable} is set ({where}): gRPC connects through that proxy unless "
                "no_grpc_proxy or no_proxy names this server"
            )
    return None


def say(line: str) -> None:
    print(line, file=sys.stderr)


# What the server answers to bad input (see server/admin.py): the caller's problem, not the link's.
REFUSED_INPUT = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
)


def explain(exc: grpc.RpcError, args: argparse.Namespace, fingerprint: Fingerprint) -> int:
    """Turn a failed call into sentences; rejected handshakes tell the client almost nothing."""
    code = exc.code()
    details = shown(exc.details() or "")  # the server's text: it may not forge a line
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        say(f"{PROG}: error: the server refused the call: {details}")
        say(f"  your certificate's fingerprint: {fingerprint}")
        return Exit.DENIED
    if code in REFUSED_INPUT:
        say(f"{PROG}: error: the server refused: {details}")
        return Exit.ERROR
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        say(
            f"{PROG}: error: no answer from {args.server} within {args.timeout:g} s (--timeout); "
            "the server may be slow or unreachable, and the call may or may not have been "
            "processed"
        )
        return Exit.CONNECT
    if code != grpc.StatusCode.UNAVAILABLE:
        say(f"{PROG}: error: call failed: {code.name}: {details}")
        if code == grpc.StatusCode.UNIMPLEMENTED:
            # A gRPC server that is not pinrpc's API, most often its --enrollment-listen port.
            say(f"  {args.server} does not serve this call: dial the server's --listen port")
        return Exit.RPC
    if from_server(exc):  # the server answered: its registry failed, the connection did not
        say(f"{PROG}: error: the server answered, but could not use its registry: {details}")
        return Exit.RPC
    lowered = details.lower()
    # Checked first: gRPC appends "certificate verification context" to every TLS failure.
    if "wrong_version_number" in lowered or "missing selected alpn" in lowered:
        say(f"{PROG}: error: {args.server} does not serve gRPC over TLS: {details}")
        say("  is it the right port (not a plaintext or --health-listen port), and does no")
        say("  proxy in front terminate TLS? `pinrpc doctor` (same flags) checks step by step.")
        return Exit.CONNECT
    if "certificate_verify_failed" in lowered or "peer name" in lowered or "verif" in lowered:
        say(f"{PROG}: error: could not verify the server at {args.server}: {details}")
        if "has expired" in lowered or "not yet valid" in lowered:  # BoringSSL's wording
            say("  the server's certificate is outside its validity period: the operator must")
            say("  renew it (or a clock is wrong); `pinrpc doctor` (same flags) shows its dates.")
            return Exit.CONNECT
        say("  likely causes: the server certificate is not signed by a root you trust")
        say("  (pass --ca with its root), or its names do not include the name you dialled")
        say("  (pass --server-name with the name in the certificate).")
        return Exit.CONNECT
    if "endpoint closing" in lowered:
        # gRPC shut its own end when the server had not finished the handshake in time (its
        # 20 s connect timeout): nothing was refused, so the certificate is not to blame.
        say(
            f"{PROG}: error: {args.server} accepted the connection but never completed the "
            f"TLS handshake: {details}"
        )
        say("  is it the right port, and does nothing in between (a firewall, a proxy) hold")
        say("  the connection open? `pinrpc doctor` (same flags) checks step by step.")
        return Exit.CONNECT
    if any(sign in lowered for sign in REFUSED_AT_HANDSHAKE):
        say(
            f"{PROG}: error: the server at {args.server} closed the connection "
            "during the TLS handshake"
        )
        say(f"  your certificate's fingerprint: {fingerprint}")
        say("  likely causes: this certificate is not enrolled, or was revoked, or has expired;")
        say("  or the server is not a pinrpc server. Ask the operator to run")
        say(f"  `pinrpc-server list` and look for {fingerprint}.")
        say("  If the server's own certificate is the problem: check --ca and --server-name.")
        return Exit.CONNECT
    say(f"{PROG}: error: cannot reach {args.server}: {details}")
    say("  check the address and that the server is running.")
    return Exit.CONNECT


def from_server(exc: grpc.RpcError) -> bool:
    """The server tagged this status itself (server/admin.py's abort_with)."""
    trailing: Sequence[tuple[str, str | bytes]] = (
        (exc.trailing_metadata() or ()) if isinstance(exc, grpc.Call) else ()
    )
    return any(key == ERROR_METADATA for key, _ in trailing)
