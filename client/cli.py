"""pinrpc: make a client key pair, show its fingerprint, and call a pinrpc server with it."""

from __future__ import annotations

# Ctrl-C while grpc and cryptography load (0.1 s or more): exit as run() does, not with a
# traceback. The console script imports this module before anything of ours can catch it.
try:
    import argparse
    import json
    import sys
    from pathlib import Path

    import grpc

    from client import admin, doctor, keyfiles, request, rotate
    from client.connect import DAYS, PROG, admitted_until, call, connection_flags, say
    from pinrpc.channel import passphrase_from_env
    from pinrpc.cli import Exit, add_flag, add_version_flag, file_path, run, shown, utf8
    from pinrpc.identity import (
        DEFAULT_DAYS,
        KEY_TYPES,
        NO_PERMISSIONS,
        Fingerprint,
        load_certificate,
    )
    from pinrpc.v1 import echo_pb2, echo_pb2_grpc
except KeyboardInterrupt:
    raise SystemExit(130) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="A pinrpc client: your own key pair, admitted by its fingerprint."
    )
    add_version_flag(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keygen = commands.add_parser(
        "keygen",
        help="make a key pair and self-signed certificate",
        description="Makes NAME.key (mode 0600) and NAME.crt. The key is encrypted with "
        "PINRPC_KEY_PASSPHRASE when that is set.",
    )
    keygen.add_argument("name", help="client name (also the file names NAME.key / NAME.crt)")
    add_flag(keygen, "--dir", default=".", type=file_path, help="directory for the files")
    add_flag(
        keygen,
        "--key-type",
        default="p256",
        choices=[*KEY_TYPES, "ed25519"],
        help="key algorithm (ed25519 is refused: grpcio cannot use it for client auth)",
    )
    add_flag(keygen, "--days", default=str(DEFAULT_DAYS), type=DAYS, help="validity in days")
    keygen.add_argument(
        "--force",
        action="store_true",
        help="replace existing files: the old key is gone at once (renew an enrolled pair with "
        "rotate)",
    )

    fingerprint = commands.add_parser("fingerprint", help="print a certificate's fingerprint")
    fingerprint.add_argument("certificate", type=file_path, help="a PEM certificate file")

    whoami = commands.add_parser("whoami", help="ask the server who it thinks you are")
    connection_flags(whoami)
    whoami.add_argument("--json", action="store_true", help="print JSON")

    echo = commands.add_parser("echo", help="send a message and print the echo")
    echo.add_argument("message", type=utf8, help="the text to send")
    connection_flags(echo)

    rotate.add_parser(commands)
    admin.add_parser(commands)
    request.add_parser(commands)
    doctor.add_arguments(commands.add_parser("doctor", help="diagnose the connection step by step"))
    return parser


def cmd_keygen(args: argparse.Namespace) -> int:
    passphrase = passphrase_from_env()
    files = keyfiles.make_pair(
        args.name,
        Path(args.dir),
        key_type=args.key_type,
        days=args.days,
        force=args.force,
        passphrase=passphrase,
        tell=lambda note: say(f"{PROG}: {note}"),
    )
    # Said either way: an empty PINRPC_KEY_PASSPHRASE counts as unset, as every PINRPC_* does.
    sealed = "encrypted with PINRPC_KEY_PASSPHRASE" if passphrase else "not encrypted"
    print(f"private key  {files.key_path}  (mode 0600, {sealed}; never share it)")
    print(f"certificate  {files.cert_path}  (give this to the server operator)")
    print(f"fingerprint  {files.fingerprint}")
    return Exit.OK


def cmd_fingerprint(args: argparse.Namespace) -> int:
    print(Fingerprint.of(load_certificate(Path(args.certificate))))
    return Exit.OK


def cmd_whoami(args: argparse.Namespace) -> int:
    def rpc(channel: grpc.Channel) -> int:
        reply = echo_pb2_grpc.EchoStub(channel).WhoAmI(
            echo_pb2.WhoAmIRequest(), timeout=args.timeout
        )
        until = admitted_until(reply)  # checked before anything is printed
        if args.json:
            print(
                json.dumps(
                    {
                        "name": reply.name,
                        "fingerprint": reply.fingerprint,
                        "allowed_methods": list(reply.allowed_methods),
                        "admitted_until": until.isoformat() if until else None,
                        "retiring": reply.retiring,
                    }
                )
            )
        else:
            print(f"name         {shown(reply.name)}")
            print(f"fingerprint  {shown(reply.fingerprint)}")
            print(f"allowed      {shown(', '.join(reply.allowed_methods)) or NO_PERMISSIONS}")
            ends = f"{until:%Y-%m-%d %H:%M} UTC" if until else "not said (an older server)"
            retiring = " (retiring: a rotation replaced this pair)" if reply.retiring else ""
            print(f"admitted     until {ends}{retiring}")
        return Exit.OK

    return call(args, rpc)


def cmd_echo(args: argparse.Namespace) -> int:
    def rpc(channel: grpc.Channel) -> int:
        reply = echo_pb2_grpc.EchoStub(channel).Echo(
            echo_pb2.EchoRequest(message=args.message), timeout=args.timeout
        )
        print(reply.message)
        return Exit.OK

    return call(args, rpc)


COMMANDS = {
    "keygen": cmd_keygen,
    "fingerprint": cmd_fingerprint,
    "whoami": cmd_whoami,
    "echo": cmd_echo,
    "doctor": doctor.run,
    "rotate": rotate.run,
    "admin": admin.run,
    "request-enrollment": request.run,
}


def main(argv: list[str] | None = None) -> int:
    return run(PROG, lambda: _command(build_parser().parse_args(argv)))


def _command(args: argparse.Namespace) -> int:
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
