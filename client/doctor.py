"""pinrpc doctor: diagnose a connection to a pinrpc server one step at a time.

gRPC reports almost every failure below the call as UNAVAILABLE "Socket closed", so this
command redoes the connection by hand (DNS, TCP, TLS with ALPN h2, an HTTP/2 preface) and says
which step failed, why, and what to do. Facts it relies on (grpcio 1.85 server, measured):

- The server sends no TLS alert when it refuses a client certificate: it closes the TCP
  connection. Under TLS 1.3 the client's handshake has already completed by then, so the
  refusal shows only on the first read (EOF, or a reset because our preface was unread).
  Under TLS 1.2 the handshake itself ends in EOF.
- An accepted client gets the server's HTTP/2 SETTINGS frame in reply to the preface.
"""

from __future__ import annotations

import _ssl  # the DER constant for chain certificates; private before Python 3.13
import argparse
import contextlib
import datetime as dt
import ipaddress
import os
import socket
import ssl
import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509 import verification

from client.connect import key_permissions_flag, proxy_hint, server_flags
from pinrpc.channel import load_pair, pair_credentials
from pinrpc.cli import ALWAYS_ALLOWED_NAMES, Exit, add_flag, file_path, shown
from pinrpc.errors import PinrpcError
from pinrpc.identity import (
    Fingerprint,
    PrivateKey,
    cert_to_pem,
    check_ca_bundle,
    key_to_pem,
    read_file,
)
from pinrpc.v1 import echo_pb2, echo_pb2_grpc

WARN_DAYS = 30  # for the server's certificate; the client's own uses --warn-days
# The client connection preface and an empty SETTINGS frame (RFC 9113 section 3.4).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
ENROLL_FIX = (
    "ask the server operator to run `pinrpc-server list` and look for {fp}; if it is missing "
    "or revoked, enroll it: `pinrpc-server enroll YOUR.crt --name NAME` (--replace to re-key)"
)
# The server's --enrollment-listen port speaks TLS and HTTP/2 too, and serves nothing else.
NOT_PINRPC_FIX = (
    "this port serves gRPC but not pinrpc's API: dial the server's --listen port (the "
    "--enrollment-listen port serves `pinrpc request-enrollment` only)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    server_flags(p, timeout_help="seconds to wait at each step")
    add_flag(
        p,
        "--cert",
        type=file_path,
        help="your certificate (NAME.crt); without it only the server is checked",
    )
    add_flag(p, "--key", type=file_path, help="your private key (NAME.key)")
    key_permissions_flag(p)


class Failed(Exception):
    def __init__(self, reason: str, fix: str, code: Exit = Exit.CONNECT) -> None:
        super().__init__(reason)
        self.reason, self.fix, self.code = reason, fix, code


class Skipped(Exception):
    """A step that does not apply (e.g. no client certificate given); not a failure."""


def split_target(target: str) -> tuple[str, int]:
    """HOST and PORT of a --server value that pinrpc.cli.host_port() has already checked."""
    host, _, port = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def days_left(when: dt.datetime) -> int:
    return (when - dt.datetime.now(dt.UTC)).days


def describe_expiry(when: dt.datetime) -> str:
    return f"expires {when:%Y-%m-%d} ({days_left(when)} days)"


def default_roots() -> tuple[Path | None, str]:
    """The roots grpcio itself would use for the server, so doctor agrees with the call."""
    env = os.environ.get("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")
    if env:
        return Path(env), f"GRPC_DEFAULT_SSL_ROOTS_FILE_PATH={env}"
    bundled = Path(grpc.__file__).parent / "_cython" / "_credentials" / "roots.pem"
    if bundled.exists():
        return bundled, f"gRPC's bundled roots {bundled}"
    cafile = ssl.get_default_verify_paths().cafile
    return (Path(cafile), f"system roots {cafile}") if cafile else (None, "no roots found")


def dn(name: x509.Name) -> str:
    """A distinguished name as one printable line: RFC 4514 leaves control characters as
    they are, and the server's certificate is shown before anything about it is trusted."""
    return shown(name.rfc4514_string())


def cert_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        common = cert.subject.get_attributes_for_oid(x509.OID_COMMON_NAME)
        # gRPC falls back to the CN without a SAN. Any server's text, before it is verified.
        return [f"CN:{shown(str(a.value))}" for a in common]
    return [f"DNS:{shown(n)}" for n in san.get_values_for_type(x509.DNSName)] + [
        f"IP:{ip}" for ip in san.get_values_for_type(x509.IPAddress)
    ]


def name_matches(expected: str, names: list[str]) -> bool:
    """RFC 6125 matching as gRPC does it: exact, or a wildcard for the leftmost label only."""
    try:
        ip = ipaddress.ip_address(expected)
        return any(n.startswith("IP:") and ipaddress.ip_address(n[3:]) == ip for n in names)
    except ValueError:
        pass
    want = expected.lower().rstrip(".")
    for entry in names:
        kind, _, pattern = entry.partition(":")
        pattern = pattern.lower().rstrip(".")
        if kind not in ("DNS", "CN"):
            continue
        if pattern == want:
            return True
        if pattern.startswith("*.") and "." in want and want.split(".", 1)[1] == pattern[2:]:
            return True
    return False


def peer_chain(tls: ssl.SSLSocket) -> list[x509.Certificate]:
    """The chain exactly as the server sent it (leaf first), unverified."""
    getter = getattr(tls, "get_unverified_chain", None)  # public from Python 3.13
    if getter is None:
        getter = getattr(getattr(tls, "_sslobj", None), "get_unverified_chain", None)
    raw: list[Any] = getter() if getter else []
    ders = [c.public_bytes(_ssl.ENCODING_DER) if not isinstance(c, bytes) else c for c in raw]
    if not ders:
        leaf = tls.getpeercert(binary_form=True)
        ders = [leaf] if leaf else []
    return [x509.load_der_x509_certificate(d) for d in ders]


@dataclass
class Doctor:
    args: argparse.Namespace
    stack: ExitStack
    passed: set[str] = field(default_factory=set)
    exit: Exit = Exit.OK
    host: str = ""
    port: int = 0
    fingerprint: Fingerprint | None = None
    pair: tuple[x509.Certificate, PrivateKey] | None = None  # read once: --cert <(cmd) works
    roots: list[x509.Certificate] = field(default_factory=list)
    roots_from: str = ""
    addresses: list[Any] = field(default_factory=list)  # getaddrinfo() results
    skipped: int = 0
    sock: socket.socket | None = None
    tls: ssl.SSLSocket | None = None

    @property
    def server_name(self) -> str:
        name = str(self.args.server_name or self.host)
        # gRPC takes --server-name [::1] as the address ::1 (but not [127.0.0.1]): so does this.
        with contextlib.suppress(ValueError):
            if name.startswith("[") and name.endswith("]"):
                return str(ipaddress.IPv6Address(name[1:-1]))
        return name

    def step(self, name: str, needs: tuple[str, ...], body: Callable[[], str]) -> None:
        missing = [n for n in needs if n not in self.passed]
        if missing:
            print(f"skipped  {name:<19} needs: {', '.join(missing)}")
            self.skipped += 1
            return
        try:
            detail = body()
        except Skipped as skip:
            print(f"skipped  {name:<19} {skip}")
            self.skipped += 1
            return
        except Failed as failure:
            print(f"FAILED   {name:<19} {failure.reason}")
            print(f"         {'fix:':<19} {failure.fix}")
            if self.exit == Exit.OK:
                self.exit = failure.code
            return
        self.passed.add(name)
        first, *rest = detail.split("\n")
        print(f"ok       {name:<19} {first}")
        for line in rest:
            print(f"         {'':<19} {line}")

    # Local files.

    def client_certificate(self) -> str:
        cert, key = self.args.cert, self.args.key
        if not cert and not key:
            raise Skipped("no --cert/--key given: checking the server side only")
        if not cert or not key:
            raise Failed("only one of --cert and --key given", "pass both", Exit.ERROR)
        try:
            certificate, private_key = load_pair(
                cert, key, insecure_key_permissions=self.args.insecure_key_permissions
            )
        except PinrpcError as exc:
            raise Failed(
                str(exc),
                "check the --cert and --key files (an encrypted key: PINRPC_KEY_PASSPHRASE)",
                Exit.ERROR,
            ) from exc
        now = dt.datetime.now(dt.UTC)
        renew = "make a new key pair (pinrpc keygen) and have it enrolled with --replace"
        # The server refuses these at the handshake: exit 3, as `pinrpc whoami` does.
        if certificate.not_valid_after_utc <= now:
            raise Failed(
                f"{Path(cert).absolute()} expired on {certificate.not_valid_after_utc:%Y-%m-%d}",
                renew,
                Exit.CONNECT,
            )
        if certificate.not_valid_before_utc > now:
            raise Failed(
                f"{Path(cert).absolute()} is not valid before "
                f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                "check this machine's clock",
                Exit.CONNECT,
            )
        # Only now: later steps present this pair.
        self.fingerprint, self.pair = Fingerprint.of(certificate), (certificate, private_key)
        expiry = certificate.not_valid_after_utc
        detail = f"fingerprint {self.fingerprint}, {describe_expiry(expiry)}"
        if days_left(expiry) < self.args.warn_days:
            detail += f"\nwarning: expires in less than {self.args.warn_days} days: {renew}"
        return detail

    def trust_roots(self) -> str:
        path, self.roots_from = (
            (Path(self.args.ca), f"--ca {Path(self.args.ca).absolute()}")
            if self.args.ca
            else default_roots()
        )
        if path is None:
            raise Failed("no root certificates found", "pass --ca with a PEM bundle", Exit.ERROR)
        try:
            data = read_file(path, "CA bundle", limit=16 << 20)
            self.roots = check_ca_bundle(data, str(path.absolute()))
        except PinrpcError as exc:
            fix = f"check {self.roots_from}: it must name a PEM bundle of root certificates"
            raise Failed(str(exc), fix, Exit.ERROR) from exc
        return f"{len(self.roots)} certificate(s) from {self.roots_from}"

    # The network, by hand.

    def resolve(self) -> str:
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise Failed(
                f"cannot resolve {self.host}: {exc}",
                "check the host name in --server and this machine's DNS",
            ) from exc
        self.addresses = infos
        addresses = ", ".join(dict.fromkeys(str(info[4][0]) for info in infos))
        return f"{self.host} -> {addresses}"

    def tcp_connect(self) -> str:
        errors = []
        for family, kind, proto, _, address in self.addresses:
            sock = socket.socket(family, kind, proto)
            sock.settimeout(self.args.timeout)
            try:
                sock.connect(address)
            except OSError as exc:
                sock.close()
                errors.append(f"{address[0]}: {exc.strerror or exc}")
                continue
            self.sock = self.stack.enter_context(sock)
            detail = f"connected to {address[0]} port {self.port}"
            if hint := proxy_hint():  # these steps connect directly; the whoami step may not
                detail += f"\nwarning: {hint}"
            return detail
        raise Failed(
            f"cannot connect to port {self.port}: {'; '.join(errors)}",
            "is the server running and listening on this address and port? "
            "(pinrpc-server serve --listen; its default 127.0.0.1:8443 is local only) "
            "Is a firewall in between?",
        )

    def tls_handshake(self) -> str:
        assert self.sock is not None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # Verified below with cryptography, so that a bad chain can be shown, not just refused.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["h2"])
        presented = self.pair is not None
        if self.pair is not None:
            # ssl reads only files: hand it the pair in files that live in memory, so the key
            # stays off disk. (Pipes, written whole before ssl read them, hung doctor on a
            # certificate over their 64 KiB.)
            certificate, private_key = self.pair
            with ExitStack() as files:
                paths = []
                for pem in (cert_to_pem(certificate), key_to_pem(private_key)):
                    fd = os.memfd_create("pinrpc-doctor", os.MFD_CLOEXEC)
                    files.callback(os.close, fd)
                    with open(fd, "wb", closefd=False) as sink:
                        sink.write(pem)
                    paths.append(f"/dev/fd/{fd}")  # opened anew: read from the start
                context.load_cert_chain(*paths)
        try:
            self.tls = self.stack.enter_context(
                context.wrap_socket(
                    self.sock, server_hostname=self.server_name, suppress_ragged_eofs=False
                )
            )
        except (ssl.SSLEOFError, ConnectionResetError) as exc:
            fix = "check that this port serves pinrpc over TLS"
            if presented:
                fix = (
                    "a server limited to TLS 1.2 refuses a client certificate this way: "
                    + ENROLL_FIX.format(fp=self.fingerprint)
                )
            reason = f"the server closed the connection during the handshake ({exc})"
            raise Failed(reason, fix) from exc
        except ssl.SSLError as exc:
            fix = "check that this port serves pinrpc over TLS"
            if exc.reason == "WRONG_VERSION_NUMBER":
                fix = "this port does not speak TLS: plaintext, or the --health-listen probe port?"
            raise Failed(f"TLS handshake failed: {exc.reason or exc}", fix) from exc
        except (TimeoutError, OSError) as exc:
            raise Failed(
                f"no TLS handshake within {self.args.timeout:g} s ({exc})",
                "check that this port serves pinrpc, and that nothing in between holds the "
                "connection open",
            ) from exc
        alpn = self.tls.selected_alpn_protocol()
        if alpn != "h2":
            raise Failed(
                f"{self.tls.version()} but ALPN {alpn or 'none'} instead of h2",
                "gRPC needs HTTP/2: is a proxy terminating TLS in front of the server? Pass "
                "TLS through to pinrpc (an L4/TCP load balancer)",
            )
        cipher = self.tls.cipher()
        return f"{self.tls.version()}, ALPN h2, {cipher[0] if cipher else '?'}"

    def server_chain(self) -> str:
        assert self.tls is not None
        chain = peer_chain(self.tls)
        if not chain:
            raise Failed("the server sent no certificate", "check the server's --cert")
        leaf, intermediates = chain[0], chain[1:]
        names = cert_names(leaf)
        detail = (
            f"{dn(leaf.subject)}, issued by {dn(leaf.issuer)}, "
            f"{describe_expiry(leaf.not_valid_after_utc)}, {len(chain)} certificate(s) sent"
        )
        subject: verification.Subject
        first = names[0].partition(":")[2] if names else ""
        try:  # a CN without a SAN may be any text ("My Server"), which no client can verify
            if names and names[0].startswith("IP:"):
                subject = x509.IPAddress(ipaddress.ip_address(first))
            else:
                subject = x509.DNSName(first)
            verifier = (
                verification.PolicyBuilder()
                .store(verification.Store(self.roots))
                .time(dt.datetime.now(dt.UTC))
                .build_server_verifier(subject)
            )
        except ValueError as exc:
            raise Failed(
                f"{detail}: names no host a client can verify ({', '.join(names) or 'none'})",
                "the operator must serve a certificate whose subjectAltName holds the server's "
                "DNS name or IP address",
            ) from exc
        try:
            verifier.verify(leaf, intermediates)
        except (verification.VerificationError, ValueError) as exc:
            fix = (
                "pass --ca with the root that issued the server's certificate "
                f"({self.roots_from} does not hold it)"
            )
            if not intermediates and leaf.issuer != leaf.subject:
                fix = "the server sends its leaf alone: serve fullchain.pem (leaf + intermediate)"
            why = str(exc)
            if "candidates exhausted" in why:
                why = f"no path from {dn(leaf.issuer)} to a trusted root ({why})"
            raise Failed(f"{detail}: not trusted: {why}", fix) from exc
        days = days_left(leaf.not_valid_after_utc)
        if days < WARN_DAYS:
            detail += f"\nwarning: the server certificate expires in {days} days: renew it"
        return f"{detail}\nverified against {self.roots_from}"

    def server_name_check(self) -> str:
        assert self.tls is not None
        names = cert_names(peer_chain(self.tls)[0])
        if not name_matches(self.server_name, names):
            raise Failed(
                f"{self.server_name} is not among the certificate's names: {', '.join(names)}",
                "dial one of those names, or pass --server-name NAME when the address "
                "differs from it (tests, port forwarding)",
            )
        return f"{self.server_name} matches ({', '.join(names)})"

    def client_accepted(self) -> str:
        assert self.tls is not None
        try:
            self.tls.sendall(H2_PREFACE)
            reply = self.tls.recv(64)
        except TimeoutError as exc:
            raise Failed(
                f"no HTTP/2 reply within {self.args.timeout:g} s",
                "this is not a gRPC server, or a proxy in between does not speak HTTP/2",
            ) from exc
        except ssl.SSLEOFError:
            reply, closed = b"", "TCP closed, no TLS alert"
        except (ConnectionResetError, BrokenPipeError):
            reply, closed = b"", "TCP reset, no TLS alert"
        except ssl.SSLError as exc:  # other TLS stacks send an alert, e.g. certificate_required
            reply, closed = b"", f"TLS alert: {exc.reason or exc}"
        else:
            closed = "TLS close_notify"
        # A SETTINGS frame (type 4) is the server's first HTTP/2 frame.
        answered = len(reply) >= 9 and reply[3] == 4
        if answered:
            if self.fingerprint is None:
                return "warning: the server accepted a connection WITHOUT a client certificate"
            return f"the server answered HTTP/2 after seeing {self.fingerprint}"
        if reply:
            raise Failed(
                f"the server answered with something other than HTTP/2: {reply[:16]!r}",
                "this port does not serve gRPC",
            )
        if self.fingerprint is None:
            raise Skipped(
                f"the server closes connections without a client certificate ({closed}), as a "
                "pinrpc server does: "
                + (
                    "yours could not be presented (see above)"
                    if self.args.cert or self.args.key
                    else "pass --cert/--key to check yours"
                )
            )
        raise Failed(
            f"the server closed the connection right after the TLS handshake ({closed}): it "
            f"refused our certificate {self.fingerprint}: not enrolled, revoked or expired "
            "as the server sees it",
            ENROLL_FIX.format(fp=self.fingerprint),
            Exit.CONNECT,  # a refused handshake, as `pinrpc whoami` reports it
        )

    def whoami(self) -> str:
        assert self.pair is not None
        options = []
        if self.args.server_name:
            options.append(("grpc.ssl_target_name_override", str(self.args.server_name)))
        creds = pair_credentials(*self.pair, self.args.ca)
        with grpc.secure_channel(self.args.server, creds, options=options) as channel:
            try:
                reply = echo_pb2_grpc.EchoStub(channel).WhoAmI(
                    echo_pb2.WhoAmIRequest(), timeout=self.args.timeout
                )
            except grpc.RpcError as exc:
                code: grpc.StatusCode = exc.code()
                reason = f"{code.name}: {shown(exc.details() or '')}"
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    # Answered, so not a connection failure: exit 5, as `pinrpc whoami`.
                    raise Failed(reason, NOT_PINRPC_FIX, Exit.RPC) from exc
                denied = code in (
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.UNAUTHENTICATED,
                )
                raise Failed(
                    reason,
                    ENROLL_FIX.format(fp=self.fingerprint)
                    if denied
                    else f"{proxy_hint() or 'see the steps above'}; run again with "
                    "GRPC_VERBOSITY=debug GRPC_TRACE=handshaker,secure_endpoint for gRPC's own "
                    "account",
                    Exit.DENIED if denied else Exit.CONNECT,
                ) from exc
        allowed = shown(", ".join(reply.allowed_methods)) or f"({ALWAYS_ALLOWED_NAMES} only)"
        return f"enrolled as {reply.name!r}; allowed: {allowed}"


def run(args: argparse.Namespace) -> int:
    host, port = split_target(args.server)
    with ExitStack() as stack:
        doc = Doctor(args, stack, host=host, port=port)
        print(f"pinrpc doctor: {args.server}, expecting the name {doc.server_name}")
        doc.step("client certificate", (), doc.client_certificate)
        doc.step("trust roots", (), doc.trust_roots)
        doc.step("resolve", (), doc.resolve)
        doc.step("tcp connect", ("resolve",), doc.tcp_connect)
        doc.step("tls handshake", ("tcp connect",), doc.tls_handshake)
        doc.step("server chain", ("tls handshake", "trust roots"), doc.server_chain)
        doc.step("server name", ("tls handshake",), doc.server_name_check)
        doc.step("client accepted", ("tls handshake",), doc.client_accepted)
        doc.step(
            "whoami",
            ("client certificate", "server chain", "server name", "client accepted"),
            doc.whoami,
        )
    if doc.exit != Exit.OK:
        print(f"failed: exit code {int(doc.exit)} (the first failure)")
    elif doc.skipped:
        print(f"no failures; {doc.skipped} step(s) skipped")
    else:
        print("all checks passed")
    sys.stdout.flush()
    return doc.exit
