"""pinrpc-server: serve, and enroll / list / permit / revoke clients in the registry."""

from __future__ import annotations

# Ctrl-C while cryptography loads: exit as run() does, not with a traceback (client/cli.py).
try:
    import argparse
    import datetime as dt
    import json
    import logging
    import signal
    import sqlite3
    import stat
    import sys
    import threading
    from collections import Counter
    from collections.abc import Callable, Iterator
    from contextlib import closing, contextmanager
    from pathlib import Path

    from pinrpc.cli import (
        Exit,
        add_allow_flag,
        add_flag,
        add_permit_flags,
        add_version_flag,
        allow_patterns,
        at_least,
        file_path,
        host_port,
        missing_extra,
        path_text,
        permit_patterns,
        run,
        utf8,
    )
    from pinrpc.errors import (
        ConflictError,
        EnrollmentError,
        IdentityError,
        PinrpcError,
        RegistryError,
    )
    from pinrpc.identity import NO_PERMISSIONS, Fingerprint, check_name, read_file
    from pinrpc.listing import client_line, status
    from server.config import TLS_RELOAD_MODES, ServeError, ServerConfig
    from server.enrollment import check_certificate, check_patterns, new_permissions
    from server.gc_tuning import settle
    from server.logs import configure_logging
    from server.lookalike import LookAlikes
    from server.registry import (
        Client,
        Pending,
        Registry,
        is_postgres,
        migrate_registry,
        open_registry,
    )
    from server.stderr_pump import drained, grpc_line_rate
    from server.stop_signals import StopSignals, cut_short
except KeyboardInterrupt:
    raise SystemExit(130) from None


PROG = "pinrpc-server"
OBTAIN_CERT = "obtain-cert"
COPY = "copy-registry"
REGISTRY_HELP = "registry: a SQLite file path or a postgresql://USER@HOST:PORT/DB URL"
MAX_CERT_BYTES = 64 * 1024
# Bounds the durations below: far larger ones overflowed the date arithmetic (a traceback at
# start, or every Rotate and enrollment request failing).
TEN_YEARS = 10 * 365 * 86400
# A century, as for the client's --warn-days: a horizon past year 9999 stopped the trust
# watcher's thread (OverflowError), and with it every later revocation.
WARN_DAYS = at_least(int, 0, 36500)
NAME_TAKEN = "  <- taken: an enrolled client's name (--replace would retire its certificate)"
# Not "--replace would ...": the registry refuses a case variant of an active name either way.
NAME_CASE = "  <- differs from enrolled client {!r} only in case: approve would refuse this name"
NAME_LIKE = "  <- looks like enrolled client {!r}: another name, so not a re-key of it"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve pinrpc over mutual TLS and manage the enrolled client certificates.",
    )
    add_version_flag(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def registry_flag(p: argparse.ArgumentParser) -> None:
        add_flag(
            p,
            "--registry",
            required=True,
            type=path_text,
            help=REGISTRY_HELP,
        )

    serve = commands.add_parser("serve", help="run the server")
    address = host_port(port_zero=True)  # argparse checks the environment's value too
    add_flag(
        serve,
        "--listen",
        default="127.0.0.1:8443",
        type=address,
        metavar="HOST:PORT",
        help="mTLS address to listen on (0.0.0.0:8443 or [::]:8443 for every interface; "
        "port 0: any free one)",
    )
    add_flag(
        serve,
        "--cert",
        required=True,
        type=file_path,
        metavar="FILE",
        help="server certificate chain, leaf first (fullchain.pem)",
    )
    add_flag(
        serve,
        "--key",
        required=True,
        type=file_path,
        metavar="FILE",
        help="server private key (privkey.pem)",
    )
    registry_flag(serve)
    add_flag(
        serve,
        "--cert-warn-days",
        metavar="DAYS",
        default="14",
        type=WARN_DAYS,
        help="warn when the server certificate expires within this many days",
    )
    serve.add_argument(
        "--unhealthy-without-registry",
        action="store_true",
        help="report NOT_SERVING while the registry is unreachable (default: keep SERVING with "
        "the last known clients, so all replicas do not drop out together)",
    )
    add_flag(
        serve,
        "--rotation-overlap",
        metavar="SECONDS",
        default="86400",
        type=at_least(float, 0.0, float(TEN_YEARS)),
        help="seconds a client's old certificate keeps working after it rotates (0: at once)",
    )
    add_flag(
        serve,
        "--enrollment-listen",
        metavar="HOST:PORT",
        type=address,
        help="accept enrollment requests here (server-only TLS); off if unset",
    )
    add_flag(
        serve,
        "--enrollment-ttl",
        metavar="SECONDS",
        default="86400",
        type=at_least(float, 1.0, float(TEN_YEARS)),
        help="seconds an enrollment request waits for approval",
    )
    add_flag(
        serve,
        "--max-pending",
        metavar="N",
        default="100",
        type=at_least(int, 1),
        help="enrollment requests that may wait for approval at once; more are refused",
    )
    add_flag(
        serve,
        "--max-workers",
        metavar="N",
        default="32",
        type=at_least(int, 4, 1024),
        help="threads serving calls; one client may hold a quarter of them in open streams",
    )
    add_flag(
        serve,
        "--client-warn-days",
        metavar="DAYS",
        default="14",
        type=WARN_DAYS,
        help="log (daily) clients whose certificate expires within this many days",
    )
    add_flag(
        serve,
        "--health-listen",
        metavar="HOST:PORT",
        type=address,
        help="also serve plaintext gRPC health (and nothing else) here, for probes; off if unset",
    )
    add_flag(
        serve,
        "--metrics-listen",
        metavar="HOST:PORT",
        type=address,
        help="serve Prometheus metrics here, plain HTTP at /metrics; off if unset",
    )
    add_flag(
        serve,
        "--tls-reload",
        default="inline",
        choices=list(TLS_RELOAD_MODES),
        help="how new clients and server certificates reach TLS: inline (gRPC rebuilds inside "
        "the next handshake, which new connections wait for: fine up to about a thousand "
        "clients) or handover (a new listener is built in the background and takes over the "
        "port; for large fleets, see docs/OPERATIONS.md)",
    )
    add_flag(
        serve,
        "--max-connection-age",
        metavar="SECONDS",
        default="120",
        # gRPC takes milliseconds as a C int: 24 days is the largest whole number of days.
        type=at_least(float, 1.0, 24 * 86400),
        help="with --tls-reload handover: seconds after which a connection is rotated "
        "gracefully, so an old listener empties without failing calls (at most 24 days)",
    )
    add_flag(
        serve,
        "--warm-start",
        metavar="FILE",
        type=file_path,
        help="with --tls-reload handover: file where the server records which clients "
        "connected; after a restart it trusts those first and the rest by handover",
    )
    add_flag(
        serve,
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="log lines as text or as one JSON object per line",
    )
    add_flag(
        serve,
        "--audit-rate",
        metavar="LINES",
        default="50",
        type=at_least(float, 0.1, 1e6),
        help="audit lines per second, for calls and again for changes, before the rest are "
        "counted and dropped (bursts of 4x)",
    )
    add_flag(
        serve,
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level",
    )

    enroll = commands.add_parser("enroll", help="admit a client certificate")
    enroll.add_argument("certificate", type=file_path, help="the client's certificate (PEM)")
    add_flag(enroll, "--name", required=True, help="unique client name")
    add_allow_flag(enroll)
    enroll.add_argument(
        "--replace",
        action="store_true",
        help="re-key: revoke the client's certificates (a rotation's retiring one too) and "
        "enroll this one, with the same permissions unless --allow is given",
    )
    registry_flag(enroll)

    listing = commands.add_parser("list", help="show enrolled and revoked clients")
    listing.add_argument("--json", action="store_true", help="print JSON")
    add_flag(
        listing,
        "--warn-days",
        metavar="DAYS",
        default="30",
        type=WARN_DAYS,
        help="flag active clients whose certificate expires within this many days",
    )
    registry_flag(listing)

    pending = commands.add_parser("pending", help="show enrollment requests waiting for you")
    pending.add_argument("--json", action="store_true", help="print JSON")
    registry_flag(pending)

    approve = commands.add_parser("approve", help="enroll a pending request, by fingerprint")
    approve.add_argument("fingerprint", type=utf8, help="as `pinrpc-server pending` shows it")
    add_flag(approve, "--name", help="enroll under this name instead of the requested one")
    add_allow_flag(approve)
    approve.add_argument(
        "--replace",
        action="store_true",
        help="re-key: revoke the client's certificates (a rotation's retiring one too) and "
        "enroll the requested one, with the same permissions unless --allow is given",
    )
    registry_flag(approve)

    reject = commands.add_parser("reject", help="drop a pending request, by fingerprint")
    reject.add_argument("fingerprint", type=utf8, help="as `pinrpc-server pending` shows it")
    registry_flag(reject)

    migrate = commands.add_parser(
        "migrate", help="bring the registry's schema to this version (back it up first)"
    )
    registry_flag(migrate)

    copy = commands.add_parser(
        COPY,
        help="copy a registry into a new or empty one, SQLite or PostgreSQL either way",
        description="Copy every client certificate (active, retiring, revoked) with its "
        "permissions, and every enrollment request, from SOURCE into DEST in one transaction. "
        "DEST must be a new file, an empty database or an empty registry; SOURCE is only read "
        "and must be at this version's schema. Stop changes to SOURCE first: later ones are not "
        "copied.",
    )
    copy.add_argument("source", metavar="SOURCE", type=path_text, help=REGISTRY_HELP)
    copy.add_argument("dest", metavar="DEST", type=path_text, help=REGISTRY_HELP)

    permit = commands.add_parser(
        "permit", help="replace a client's permissions, by name or fingerprint (no new key pair)"
    )
    permit.add_argument("client", type=utf8, help="client name or certificate fingerprint")
    add_permit_flags(permit)
    registry_flag(permit)

    revoke = commands.add_parser("revoke", help="revoke a client, by name or fingerprint")
    # utf8: the registry cannot be asked about argv bytes that are not UTF-8 (a traceback).
    revoke.add_argument("client", type=utf8, help="client name or certificate fingerprint")
    registry_flag(revoke)

    # Listed for --help only: main() hands its arguments to server.acme's own parser.
    commands.add_parser(
        OBTAIN_CERT,
        add_help=False,
        help="get the server certificate from an ACME CA such as Let's Encrypt (needs the acme "
        "extra; see its --help)",
    )
    return parser


@contextmanager
def registry_of(
    args: argparse.Namespace, *, create: bool = False, readonly: bool = False
) -> Iterator[Registry]:
    """The registry named by --registry, closed afterwards; must exist unless ``create``."""
    registry = open_registry(args.registry, create=create, readonly=readonly)
    try:
        yield registry
    finally:
        registry.close()


def cmd_enroll(args: argparse.Namespace) -> int:
    certificate = Path(args.certificate)
    where = str(certificate.absolute())
    try:
        data = read_file(certificate, "certificate", limit=MAX_CERT_BYTES)
    except IdentityError as exc:
        raise EnrollmentError(str(exc)) from exc
    check_name(args.name)
    candidate = check_certificate(data, where)
    allowed = check_patterns(allow_patterns(args))
    with registry_of(args, create=True) as registry:
        # With --replace and no --allow the registry keeps the replaced certificate's.
        client = registry.enroll(candidate, args.name, allowed, replace=args.replace)
    _show_enrolled(f"enrolled {client.name}", client, kept=args.replace and not allowed)
    print("Compare the fingerprint with the one `pinrpc keygen` showed the client.")
    return Exit.OK


def _show_enrolled(headline: str, client: Client, kept: bool) -> None:
    """What enroll and approve print; ``kept``: a re-key without --allow kept the permissions."""
    print(headline)
    print(f"  fingerprint  {client.fingerprint}")
    note = "  (kept from the replaced certificate)" if kept and client.allowed_methods else ""
    print(f"  allowed      {_allowed(client)}{note}")
    print(f"  expires      {client.not_after:%Y-%m-%d %H:%M} UTC")


def _allowed(client: Client) -> str:
    return ", ".join(client.allowed_methods) or NO_PERMISSIONS


def cmd_list(args: argparse.Namespace) -> int:
    with registry_of(args, readonly=True) as registry:
        clients = registry.clients()
    now = dt.datetime.now(dt.UTC)
    rows = [c.listed(now, args.warn_days) for c in clients]
    if args.json:
        print(json.dumps(rows, indent=2))
        return Exit.OK
    if not clients:
        print("no clients enrolled")
        return Exit.OK
    width = max(len(c.name) for c in clients)
    for c, row in zip(clients, rows, strict=True):
        print(client_line(row, status(c.revoked_at, c.retire_at, c.not_after, now), width))
    return Exit.OK


def cmd_revoke(args: argparse.Namespace) -> int:
    with registry_of(args) as registry:
        # By name, revoke ends every usable certificate: during a rotation's overlap the
        # retiring ones too, which the operator must see were cut off as well.
        client, *others = registry.revoke(args.client)
    print(f"revoked {client.name} ({client.fingerprint})")
    for other in others:
        print(f"revoked {other.name} ({other.fingerprint}), the certificate it rotated from")
    return Exit.OK


def cmd_permit(args: argparse.Namespace) -> int:
    patterns = permit_patterns(args)
    allowed = new_permissions(patterns, args.none)
    with registry_of(args) as registry:
        client = registry.permit(args.client, allowed)
    print(f"permitted {client.name} ({client.fingerprint})")
    print(f"  allowed      {_allowed(client)}")
    return Exit.OK


def cmd_pending(args: argparse.Namespace) -> int:
    with registry_of(args, readonly=True) as registry:
        waiting = registry.pending()
        holders = _name_holders(registry) if waiting else {}
    like = _looks_like(holders)
    if args.json:
        rows = [
            {**p.as_json(), "name_taken": p.name in holders, "name_like": like(p.name)}
            for p in waiting
        ]
        print(json.dumps(rows, indent=2))
    elif not waiting:
        print("no pending enrollment requests")
    for p in [] if args.json else waiting:
        print(
            f"{p.fingerprint}  {p.name}  from {p.peer}  "
            f"until {p.expires_at:%Y-%m-%d %H:%M} UTC{_name_mark(p.name, holders, like(p.name))}"
        )
    return Exit.OK


def _name_mark(name: str, holders: dict[str, Client], like: str | None) -> str:
    if name in holders:
        return NAME_TAKEN
    if like is None:
        return ""
    return (NAME_CASE if like.casefold() == name.casefold() else NAME_LIKE).format(like)


def _name_holders(registry: Registry) -> dict[str, Client]:
    """The certificate holding each name: an active one, the current one where there are two
    (a rotation's overlap). A request for such a name is a re-key, or a stranger's bid."""
    active = sorted((c for c in registry.clients() if c.active), key=lambda c: c.current)
    return {c.name: c for c in active}


def _looks_like(holders: dict[str, Client]) -> Callable[[str], str | None]:
    """For a name no active client holds: the active client's name it reads like, or None
    (server/lookalike.py). Indexed once, for registries of 10,000+ clients."""
    alike = LookAlikes(holders)
    return lambda name: None if name in holders else alike.of(name)


def _wanted_name(registry: Registry, ref: str, name: str | None) -> tuple[Pending, str] | None:
    """The request ``ref`` names and the name approving it would give it (``--name`` or the
    one it asked for); None when there is no such request: approve() says why."""
    try:
        fingerprint = Fingerprint.parse(ref)
    except ValueError:
        return None
    request = next((p for p in registry.pending() if p.fingerprint == fingerprint), None)
    return None if request is None else (request, request.name if name is None else name)


def _refuse_taken_name(request: Pending, wanted: str, holders: dict[str, Client]) -> None:
    """Approving a request under an enrolled client's name (the one it asked for, or
    ``--name``) without --replace: the registry's answer ("pass --replace to re-key it")
    reads as advice, and following it would hand that client's name and permissions to
    whoever sent the request. Say so instead."""
    holder = holders.get(wanted)
    if holder is not None:
        gets = "asks for" if wanted == request.name else "would get"
        raise ConflictError(
            f"the request {request.fingerprint} {gets} the name {wanted!r}, which is someone "
            f"else's: enrolled client {wanted!r} ({holder.fingerprint}); --replace would "
            "retire that client's certificate and give its name and permissions to this key: "
            "pass it only if that client's owner sent you this fingerprint, else `reject` the "
            "request or approve it under another --name"
        )


def cmd_approve(args: argparse.Namespace) -> int:
    allowed = check_patterns(allow_patterns(args))
    # `--name ""` (an unset shell variable) is checked, not taken for "the requested name";
    # an empty PINRPC_NAME is unset, as every empty variable is (add_flag gives None).
    name = check_name(args.name) if args.name is not None else None
    like: Client | None = None
    with registry_of(args) as registry:
        wanted = _wanted_name(registry, args.fingerprint, name)
        if wanted is not None:
            holders = _name_holders(registry)
            if not args.replace:
                _refuse_taken_name(*wanted, holders)
            alike = _looks_like(holders)(wanted[1])
            like = None if alike is None else holders[alike]
        client = registry.approve(args.fingerprint, name, allowed, replace=args.replace)
    _show_enrolled(f"approved: enrolled {client.name}", client, kept=args.replace and not allowed)
    if like is not None:  # approved all the same: `node-1` beside `node-l` may be meant
        print(
            f"{PROG}: warning: {client.name!r} only looks like enrolled client {like.name!r} "
            f"({like.fingerprint}): it is a new client, not a re-key of {like.name!r}; "
            f"`pinrpc-server revoke {client.fingerprint}` if that is not what you meant",
            file=sys.stderr,
        )
    return Exit.OK


def cmd_reject(args: argparse.Namespace) -> int:
    with registry_of(args) as registry:
        request = registry.take_pending(args.fingerprint)
    print(f"rejected the request from {request.name!r} ({request.fingerprint})")
    return Exit.OK


def cmd_migrate(args: argparse.Namespace) -> int:
    result = migrate_registry(args.registry)
    for migration in result.applied:
        print(f"applied {migration.version}: {migration.description}")
    print(f"registry {result.where} is at schema version {result.version}")
    return Exit.OK


def cmd_copy(args: argparse.Namespace) -> int:
    # Imported here: only this command needs it.
    from server.registry_copy import copy_registry

    created = not is_postgres(args.dest) and not Path(args.dest).exists()
    try:
        copied = copy_registry(args.source, args.dest)
    except BaseException:
        if created:  # a failed copy leaves no new file behind, as a failed `serve` leaves none
            _remove_unused(Path(args.dest))
        raise
    kinds = Counter(_kind(c) for c in copied.clients)
    expired = copied.requests - len(copied.waiting)
    print(f"copied registry {copied.source} to {copied.dest}")
    print(
        f"  certificates  {len(copied.clients)}: "
        + ", ".join(f"{kinds[k]} {k}" for k in ("active", "retiring", "retired", "revoked"))
    )
    print(f"  requests      {len(copied.waiting)} waiting, {expired} expired")
    # Servers stop before the copy (a SOURCE a running server holds is refused): what they changed
    # after it would be missing from DEST.
    print(
        f"next: start the servers with --registry {copied.dest} (or PINRPC_REGISTRY); keep "
        f"{copied.source} as a backup, unchanged: a change made to it now is not in the copy"
    )
    return Exit.OK


def _kind(client: Client) -> str:
    if client.revoked_at is not None:
        return "revoked"
    if client.retire_at is not None:
        return "retiring" if client.active else "retired"
    return "active"


def cmd_serve(args: argparse.Namespace) -> int:
    if args.warm_start and args.tls_reload != "handover":
        raise ServeError("--warm-start needs --tls-reload handover")
    # A stalled log collector must not stall the server, and what a client can make gRPC
    # write to stderr must not pass for pinrpc's own lines (server/stderr_pump.py).
    with drained(args.log_format, grpc_line_rate(args.audit_rate)) as own_logging:
        configure_logging(args.log_level, args.log_format, own_logging)
        try:
            return serve(args)
        finally:
            configure_logging(args.log_level, args.log_format)  # own_logging closes next


def serve(args: argparse.Namespace) -> int:
    config = ServerConfig(
        listen=args.listen,
        cert=Path(args.cert),
        key=Path(args.key),
        registry=args.registry,
        max_workers=args.max_workers,
        cert_warn_days=args.cert_warn_days,
        client_warn_days=args.client_warn_days,
        registry_outage_unhealthy=args.unhealthy_without_registry,
        rotation_overlap=dt.timedelta(seconds=args.rotation_overlap),
        enrollment_listen=args.enrollment_listen,
        enrollment_ttl=dt.timedelta(seconds=args.enrollment_ttl),
        max_pending=args.max_pending,
        health_listen=args.health_listen,
        metrics_listen=args.metrics_listen,
        audit_rate=args.audit_rate,
        tls_reload=args.tls_reload,
        max_connection_age=args.max_connection_age,
        warm_start=Path(args.warm_start) if args.warm_start else None,
    )
    # Imported here: grpc and the services are most of the admin commands' start-up otherwise.
    from server.app import start_server

    log = logging.getLogger("pinrpc.server")
    # SIGHUP too: a closed terminal's hang-up killed the server with no drain and no last
    # lines; nothing here needs a reload signal (certificates and the registry reload alone).
    signals = StopSignals((signal.SIGTERM, signal.SIGINT, signal.SIGHUP))
    # A mistyped path serves nobody, silently; first-time operators rely on the creation.
    created = not is_postgres(args.registry) and not Path(args.registry).exists()
    cutter: threading.Thread | None = None
    started = False
    try:
        with start_server(config) as running:
            started = True
            if created:
                log.warning(
                    "registry %s did not exist: created it empty, so no client is enrolled; "
                    "if you meant another registry, check --registry",
                    Path(args.registry).absolute(),
                )
            # Here, not in start_server: the tests run servers inside pytest's own process.
            settle()
            signals.stop.wait()
            log.info("stopping: finishing in-flight calls")
            cutter = threading.Thread(
                target=cut_short, args=(signals, running), name="pinrpc-second-signal"
            )
            cutter.start()
    except BaseException:
        if created and not started:  # a failed start (a bad --cert, a busy port) leaves no file
            _remove_unused(Path(args.registry))
        raise
    finally:
        signals.drained.set()
        signals.wake.set()  # a later signal has nothing left to cut short
        if cutter is not None:
            cutter.join()
        signals.close()
    return Exit.OK if signals.forced is None else 128 + signals.forced


def _remove_unused(path: Path) -> None:
    """Remove the registry serve created for a start that then failed, unless another process
    has it open (a server started alongside on the same new path) or enrolled a client."""
    path = path.resolve()  # SQLite follows a symlink: the file is its target; the link stays
    if not path.is_file():
        return  # none was made: its directory is missing or a file (unlink raised ENOTDIR)
    # Our connections are closed, and SQLite removes these with the last one: any left belong
    # to a live user (or a crash whose WAL may hold data).
    if any(path.with_name(f"{path.name}{end}").exists() for end in ("-wal", "-shm")):
        return
    try:
        with closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            if db.execute("SELECT COUNT(*) FROM clients").fetchone()[0]:
                return
    except sqlite3.Error:
        pass  # no clients table yet: nothing in it either
    for name in (path.name, f"{path.name}-wal", f"{path.name}-shm", f"{path.name}-journal"):
        path.with_name(name).unlink(missing_ok=True)


COMMANDS = {
    "serve": cmd_serve,
    "enroll": cmd_enroll,
    "list": cmd_list,
    "revoke": cmd_revoke,
    "permit": cmd_permit,
    "migrate": cmd_migrate,
    COPY: cmd_copy,
    "pending": cmd_pending,
    "approve": cmd_approve,
    "reject": cmd_reject,
}


def _checked(args: argparse.Namespace) -> argparse.Namespace:
    """Refuse a registry path that names a FIFO, a device or a directory: sqlite3 waited
    forever on a FIFO (list, pending) and said only "disk I/O error" about the rest. One that
    cannot even be looked up (a name too long, a symlink loop) is refused with the reason:
    Path.exists() raised the first, and copy-registry's resolve() the second, as tracebacks."""
    named = [("source", "SOURCE"), ("dest", "DEST")] if args.command == COPY else []
    for attr, what in named or [("registry", "--registry")]:
        spec = getattr(args, attr)
        if is_postgres(spec):
            continue
        path = Path(spec)
        try:
            mode = path.stat().st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue  # a new registry: each command says whether it may create one
        except OSError as exc:
            raise RegistryError(
                f"cannot use registry {path.absolute()}: {exc.strerror}; check {what}"
            ) from exc
        if not stat.S_ISREG(mode):
            raise RegistryError(f"registry {path.absolute()} is not a regular file; check {what}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [OBTAIN_CERT]:
        return run(PROG, lambda: obtain_cert(argv[1:]))
    return run(PROG, lambda: _command(build_parser().parse_args(argv)))


def _command(args: argparse.Namespace) -> int:
    return COMMANDS[args.command](_checked(args))


def obtain_cert(argv: list[str]) -> int:
    """server/acme.py's command, with its own parser: scripts/obtain-cert needs a checkout."""
    try:
        from server import acme  # the optional extra: imported only for this command
    except ModuleNotFoundError as exc:
        raise PinrpcError(missing_extra(OBTAIN_CERT, "acme", exc)) from exc
    return acme.main(argv, prog=f"{PROG} {OBTAIN_CERT}")


if __name__ == "__main__":
    sys.exit(main())
