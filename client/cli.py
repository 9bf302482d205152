"""pinrpc: make a client key pair, show its fingerprint, and call a pinrpc server with it."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable
from pathlib import Path

import grpc

from client import doctor
from pinrpc.channel import client_credentials
from pinrpc.cli import Exit, add_flag, run
from pinrpc.identity import DEFAULT_DAYS, KEY_TYPES, Fingerprint, create_identity, load_certificate
from pinrpc.v1 import echo_pb2, echo_pb2_grpc

PROG = "pinrpc"
ROTATE_HINT = (
    "make a new key pair (`pinrpc keygen NAME --force`) and have the operator enroll it "
    "with `pinrpc-server enroll NAME.crt --name NAME --replace`"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="A pinrpc client: your own key pair, admitted by its fingerprint."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keygen = commands.add_parser("keygen", help="make a key pair and self-signed certificate")
    keygen.add_argument("name", help="client name (also the file names NAME.key / NAME.crt)")
    add_flag(keygen, "--dir", default=".", type=Path, help="directory for the files")
    add_flag(
        keygen,
        "--key-type",
        default="p256",
        choices=[*KEY_TYPES, "ed25519"],
        help="key algorithm (ed25519 is refused: grpcio cannot use it for client auth)",
    )
    add_flag(keygen, "--days", default=str(DEFAULT_DAYS), type=int, help="validity in days")
    keygen.add_argument("--force", action="store_true", help="overwrite existing files")

    fingerprint = commands.add_parser("fingerprint", help="print a certificate's fingerprint")
    fingerprint.add_argument("certificate", type=Path)

    whoami = commands.add_parser("whoami", help="ask the server who it thinks you are")
    connection_flags(whoami)
    whoami.add_argument("--json", action="store_true", help="print JSON")

    echo = commands.add_parser("echo", help="send a message and print the echo")
    echo.add_argument("message")
    connection_flags(echo)

    doctor.add_arguments(commands.add_parser("doctor", help="diagnose the connection step by step"))
    return parser


def connection_flags(p: argparse.ArgumentParser) -> None:
    add_flag(p, "--server", required=True, help="server address HOST:PORT")
    add_flag(p, "--cert", required=True, help="your certificate (NAME.crt)")
    add_flag(p, "--key", required=True, help="your private key (NAME.key)")
    add_flag(p, "--ca", help="PEM roots to verify the server with (default: system/gRPC roots)")
    add_flag(p, "--server-name", help="name to expect in the server certificate (tests/dev)")
    add_flag(p, "--timeout", default="10", type=float, help="seconds to wait for the call")
    add_flag(
        p,
        "--warn-days",
        default="30",
        type=int,
        help="warn when your certificate expires within this many days",
    )
    p.add_argument(
        "--insecure-key-permissions",
        action="store_true",
        help="use a private key even if other users can read it",
    )


def cmd_keygen(args: argparse.Namespace) -> int:
    files = create_identity(
        args.name, args.dir, key_type=args.key_type, days=args.days, force=args.force
    )
    print(f"private key  {files.key_path}  (mode 0600; never share it)")
    print(f"certificate  {files.cert_path}  (give this to the server operator)")
    print(f"fingerprint  {files.fingerprint}")
    return Exit.OK


def cmd_fingerprint(args: argparse.Namespace) -> int:
    print(Fingerprint.of(load_certificate(args.certificate)))
    return Exit.OK


def call(args: argparse.Namespace, rpc: Callable[[echo_pb2_grpc.EchoStub], int]) -> int:
    creds, fingerprint = client_credentials(
        args.cert, args.key, args.ca, insecure_key_permissions=args.insecure_key_permissions
    )
    not_after = load_certificate(Path(args.cert)).not_valid_after_utc
    left = not_after - dt.datetime.now(dt.UTC)
    if dt.timedelta(0) < left < dt.timedelta(days=args.warn_days):
        _say(
            f"{PROG}: warning: your certificate {Path(args.cert).absolute()} expires in "
            f"{left.days} days ({not_after:%Y-%m-%d %H:%M} UTC); {ROTATE_HINT}"
        )
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    with grpc.secure_channel(args.server, creds, options=options) as channel:
        try:
            return rpc(echo_pb2_grpc.EchoStub(channel))
        except grpc.RpcError as exc:
            return explain(exc, args, fingerprint, not_after)


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def explain(
    exc: grpc.RpcError, args: argparse.Namespace, fingerprint: Fingerprint, not_after: dt.datetime
) -> int:
    """Turn a failed call into sentences; rejected handshakes tell the client almost nothing."""
    code = exc.code()
    details = exc.details() or ""
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        _say(f"{PROG}: error: the server refused the call: {details}")
        _say(f"  your certificate's fingerprint: {fingerprint}")
        return Exit.DENIED
    if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        _say(f"{PROG}: error: call failed: {code.name}: {details}")
        return Exit.RPC
    lowered = details.lower()
    if "certificate_verify_failed" in lowered or "peer name" in lowered or "verif" in lowered:
        _say(f"{PROG}: error: could not verify the server at {args.server}: {details}")
        _say("  likely causes: the server certificate is not signed by a root you trust")
        _say("  (pass --ca with its root), or its names do not include the name you dialled")
        _say("  (pass --server-name with the name in the certificate).")
        return Exit.CONNECT
    if "socket closed" in lowered or "handshake" in lowered or "connection reset" in lowered:
        _say(
            f"{PROG}: error: the server at {args.server} closed the connection "
            "during the TLS handshake"
        )
        _say(f"  your certificate's fingerprint: {fingerprint}")
        if not_after <= dt.datetime.now(dt.UTC):
            _say(f"  your certificate EXPIRED on {not_after:%Y-%m-%d %H:%M} UTC: that is why;")
            _say(f"  {ROTATE_HINT}")
            return Exit.CONNECT
        _say("  likely causes: this certificate is not enrolled, or was revoked, or has expired;")
        _say("  or the server is not a pinrpc server. Ask the operator to run")
        _say(f"  `pinrpc-server list` and look for {fingerprint}.")
        _say("  If the server's own certificate is the problem: check --ca and --server-name.")
        return Exit.CONNECT
    _say(f"{PROG}: error: cannot reach {args.server}: {details}")
    _say("  check the address and that the server is running.")
    return Exit.CONNECT


def cmd_whoami(args: argparse.Namespace) -> int:
    def rpc(stub: echo_pb2_grpc.EchoStub) -> int:
        reply = stub.WhoAmI(echo_pb2.WhoAmIRequest(), timeout=args.timeout)
        if args.json:
            print(
                json.dumps(
                    {
                        "name": reply.name,
                        "fingerprint": reply.fingerprint,
                        "allowed_methods": list(reply.allowed_methods),
                    }
                )
            )
        else:
            print(f"name         {reply.name}")
            print(f"fingerprint  {reply.fingerprint}")
            print(f"allowed      {', '.join(reply.allowed_methods) or '(WhoAmI only)'}")
        return Exit.OK

    return call(args, rpc)


def cmd_echo(args: argparse.Namespace) -> int:
    def rpc(stub: echo_pb2_grpc.EchoStub) -> int:
        reply = stub.Echo(echo_pb2.EchoRequest(message=args.message), timeout=args.timeout)
        print(reply.message)
        return Exit.OK

    return call(args, rpc)


COMMANDS = {
    "keygen": cmd_keygen,
    "fingerprint": cmd_fingerprint,
    "whoami": cmd_whoami,
    "echo": cmd_echo,
    "doctor": doctor.run,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(PROG, lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
