"""Obtain the server's certificate from an ACME CA (Let's Encrypt, or pebble in tests).

HTTP-01 only: the ACME client flow (account, order, validation, checks on what the CA returns,
the files written under --out's lock, the run's deadline) and the obtain-cert command. The
tiny HTTP server that answers the CA's challenge is server/acme_responder.py. Output uses
certbot's file names so operators can point pinrpc-server at either tool's output.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import fcntl
import ipaddress
import os
import signal
import socket
import stat
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import NoReturn, cast

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pinrpc.cli import add_version_flag, missing_extra
from pinrpc.errors import AcmeError, IdentityError
from pinrpc.identity import (
    PrivateKey,
    generate_key,
    key_to_pem,
    read_file,
    same_public_key,
    write_all,
    write_atomic,
)
from server.acme_responder import http01_responder
from server.server_cert import signed_by

try:
    import idna
    import requests
    import urllib3
    from acme import challenges, client, errors, messages
    from acme.crypto_util import make_csr
    from josepy.errors import DeserializationError
    from josepy.jwa import ES256
    from josepy.jwk import JWKEC
except ModuleNotFoundError as exc:  # the optional extra
    if __name__ != "__main__":
        raise  # importers (pinrpc-server obtain-cert, scripts/obtain-cert) say it themselves
    sys.exit(f"obtain-cert: error: {missing_extra('obtain-cert', 'acme', exc)}")

# What an RFC 8555 directory must name for obtain-cert to work.
_DIRECTORY_KEYS = ("newNonce", "newAccount", "newOrder")
# The CA validates HTTP-01 from outside, and the responder serves nothing but challenge tokens.
ALL_INTERFACES = "0.0.0.0"  # noqa: S104

KEY_TYPES = ("ec256", "ec384", "rsa2048", "rsa3072", "rsa4096")
# Polling budget for validation + issuance; Let's Encrypt normally needs a few seconds.
_ORDER_TIMEOUT = datetime.timedelta(seconds=90)
LOCK_NAME = ".obtain-cert.lock"  # in --out, held while a run uses it
_NETWORK_TIMEOUT_S = 30  # per socket operation: a CA that trickles bytes never hits it
DEFAULT_DEADLINE_S = 300.0  # the whole run; see _Deadline
_MAX_DEADLINE_S = 86400.0


@dataclass(frozen=True)
class ObtainResult:
    privkey: Path
    cert: Path
    chain: Path
    fullchain: Path
    serial: int
    not_after: datetime.datetime  # timezone-aware (UTC)
    contact_updated: tuple[str, ...] | None = None  # an existing account's new contact


# What signal.signal returns: None for a handler not installed from Python.
_Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None


class _OutOfTime(BaseException):
    """Raised by SIGALRM wherever the main thread is, a blocked socket read included. Not an
    Exception, so no ``except Exception`` in requests, urllib3, acme or josepy retries it."""


class _Deadline:
    """Bound a run's talk with the CA, whose 30 s timeouts apply per socket operation: a CA or
    proxy that trickles bytes would keep the run, and --out's lock, forever. SIGALRM is the
    only way to interrupt a blocked read in the main thread. Off it (no signals there), a
    timer shuts down the sockets ``watch`` saw opened and refuses new ones, which ends a
    blocked read too. With ``seconds`` None it does nothing. On leaving, the caller's SIGALRM
    handler and timer are put back (a timer that came due meanwhile fires at once), so
    in-process callers keep theirs.
    """

    def __init__(self, seconds: float | None, directory_url: str) -> None:
        self._seconds = seconds
        self._url = directory_url
        self._saved: tuple[_Handler, float, float, float] | None = None
        self._held = self._late = False
        self._timer: threading.Timer | None = None
        self._sockets: list[socket.socket] = []
        self._expired = False

    def __enter__(self) -> _Deadline:
        if self._seconds is None:
            return self
        if threading.current_thread() is threading.main_thread():
            handler = signal.signal(signal.SIGALRM, self._fire)
            delay, interval = signal.setitimer(signal.ITIMER_REAL, self._seconds)
            self._saved = (handler, delay, interval, time.monotonic())
        else:
            self._timer = threading.Timer(self._seconds, self._cut)
            self._timer.daemon = True
            self._timer.start()
        return self

    def _cut(self) -> None:
        self._expired = True
        for sock in self._sockets:
            with suppress(OSError):  # closed already
                # socket's own shutdown: SSLSocket's would drop its TLS state under the reader.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def watch(self, session: requests.Session) -> None:
        """Let the timer reach the sockets ``session`` opens (proxied ones too). http:// as
        well: only the directory's own URL must be https://, the URLs it names are the CA's."""
        deadline = self

        class Watched(urllib3.connection.HTTPConnection):
            def connect(self) -> None:
                if deadline._expired:
                    raise _OutOfTime
                super().connect()
                deadline._sockets.append(self.sock)

        class Secure(Watched, urllib3.connection.HTTPSConnection):
            pass

        class Adapter(requests.adapters.HTTPAdapter):
            def get_connection_with_tls_context(
                self, *args: object, **kwargs: object
            ) -> urllib3.connectionpool.ConnectionPool:
                pool = super().get_connection_with_tls_context(*args, **kwargs)  # type: ignore[arg-type]
                if isinstance(pool, urllib3.HTTPSConnectionPool):
                    pool.ConnectionCls = Secure
                elif isinstance(pool, urllib3.HTTPConnectionPool):
                    pool.ConnectionCls = Watched
                return pool

        if self._seconds is not None:
            for scheme in ("https://", "http://"):
                session.mount(scheme, Adapter())

    def _fire(self, signum: int, frame: FrameType | None) -> None:
        if self._held:
            self._late = True  # raised when the held section ends
        else:
            raise _OutOfTime

    @contextmanager
    def hold(self) -> Iterator[None]:
        """A section the deadline may not cut in two (a file being written)."""
        self._held = True
        try:
            yield
        finally:
            self._held = False
        if self._late:
            raise _OutOfTime

    def stop(self) -> None:
        """From here on nothing interrupts the run (the certificate is in hand)."""
        if self._timer is not None:
            self._timer.cancel()
        if self._saved is None:
            return
        handler, delay, interval, started = self._saved
        self._saved = None
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL if handler is None else handler)
        if delay:
            signal.setitimer(
                signal.ITIMER_REAL, max(delay - (time.monotonic() - started), 1e-6), interval
            )

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        # Off the main thread, a socket cut short surfaces as whatever the libraries make of it.
        if isinstance(exc, _OutOfTime) or (exc is not None and self._expired):
            raise AcmeError(
                f"no certificate from {self._url} within the deadline of {self._seconds:g} s "
                f"(--deadline); the previous files are unchanged, run again later"
            ) from None


def _one_line(text: object) -> str:
    # Server problem documents and library errors may span lines; the CLI promises one.
    return " ".join(str(text).split())


def _new_key(key_type: str) -> PrivateKey:
    # Same algorithms as client keys, under certbot's names.
    try:
        return generate_key({"ec256": "p256", "ec384": "p384"}.get(key_type, key_type))
    except IdentityError:
        raise AcmeError(
            f"unknown key type {key_type!r}; use one of {', '.join(KEY_TYPES)}"
        ) from None


def _normalize_domains(domains: list[str]) -> list[str]:
    names: list[str] = []
    for raw in domains:
        name = raw.strip().rstrip(".").lower()
        if not name or any(c in name for c in "/: "):
            raise AcmeError(f"invalid domain {raw!r}; pass a bare DNS name like api.example.com")
        if _is_ip(name):  # the CA would refuse it only after an account and an order
            raise AcmeError(f"{raw!r} is an IP address; obtain-cert orders DNS names only")
        if name.startswith("*."):
            raise AcmeError(
                f"wildcard {raw!r} needs a DNS-01 challenge; obtain-cert only does HTTP-01"
            )
        try:
            # UTS 46 (IDNA 2008, as browsers and CAs use it): faß stays faß, not fass.
            name = idna.encode(name, uts46=True).decode("ascii")
        except UnicodeError as exc:
            raise AcmeError(f"invalid domain {raw!r}: {_one_line(exc)}") from exc
        if name not in names:
            names.append(name)
    if not names:
        raise AcmeError("no domain given; pass at least one --domain")
    return names


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def _step(what: str, directory_url: str) -> Iterator[None]:
    """Turn the many exception types of requests/acme/josepy into one-line AcmeErrors."""
    try:
        yield
    except AcmeError:
        raise
    except requests.exceptions.SSLError as exc:
        raise AcmeError(
            f"TLS verification of {directory_url} failed while {what}; if the CA uses a private "
            f"certificate (e.g. pebble), pass --ca-bundle with the CA that signed it"
        ) from exc
    except requests.exceptions.ConnectionError as exc:
        raise AcmeError(
            f"cannot reach the ACME server at {directory_url} while {what}; "
            f"check the URL and that the server is running"
        ) from exc
    except requests.exceptions.Timeout as exc:
        raise AcmeError(
            f"ACME server at {directory_url} timed out while {what}; retry later"
        ) from exc
    except requests.exceptions.RequestException as exc:
        raise AcmeError(f"HTTP request failed while {what}: {_one_line(exc)}") from exc
    except messages.Error as exc:
        raise AcmeError(f"ACME server refused {what}: {_one_line(exc)}") from exc
    except errors.TimeoutError as exc:
        raise AcmeError(f"ACME server did not finish {what} in time; retry later") from exc
    # KeyError, TypeError, AttributeError: JSON that is not a directory ({}, [], "x").
    except (
        errors.Error,
        DeserializationError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
    ) as exc:
        arg = exc.args[0] if exc.args else None
        if isinstance(arg, tuple) and arg:  # acme passes (response, error) on bad JSON
            arg = arg[0]
        # acme wraps non-JSON HTTP answers as ClientError(response), printed as "<Response [404]>".
        status = arg.status_code if isinstance(arg, requests.Response) else None
        if status is not None and status >= 500:  # a CDN's error page while the CA is down
            raise AcmeError(
                f"the ACME server at {directory_url} is unavailable (HTTP {status}) while "
                f"{what}; the previous files are unchanged, retry later"
            ) from exc
        detail = f"HTTP {status}" if status is not None else _one_line(exc)
        detail = detail or type(exc).__name__
        raise AcmeError(
            f"unexpected answer from {directory_url} while {what}: {detail}; "
            f"check that the URL is an ACME directory"
        ) from exc


def _register(
    acme: client.ClientV2, net: client.ClientNetwork, email: str | None, stored: Path | None
) -> tuple[str, ...] | None:
    """Register, or reuse the account of the stored key (``stored``: its file, None for a key
    made by this run); returns the contact it set on an existing account (None: unchanged),
    so a new --email reaches the CA's expiry mails."""
    registration = messages.NewRegistration.from_data(email=email, terms_of_service_agreed=True)
    try:
        acme.new_account(registration)
    except messages.Error as exc:
        # A deactivated account stays so (RFC 8555 7.3.6): only a new key makes a new one.
        if stored is None or exc.code != "unauthorized":
            raise
        raise AcmeError(
            f"the CA refuses the account of {stored.resolve()} ({_one_line(exc.detail or exc)}); "
            f"if it was deactivated, move that file away to register a new account"
        ) from exc
    except errors.ConflictError as exc:
        # The stored account key is already registered: reuse that account.
        account = messages.RegistrationResource(body=messages.Registration(), uri=exc.location)
        net.account = account
        if email is None:  # no --email: keep whatever contact the account has
            return None
        wanted = messages.Registration.from_data(email=email)
        if acme.query_registration(account).body.contact == wanted.contact:
            return None
        return tuple(acme.update_registration(net.account, wanted).body.contact)
    return None


def _account_key(path: Path) -> tuple[ec.EllipticCurvePrivateKey, bool]:
    """Load path (reusing one account avoids CAs' account rate limits) or make a key; the
    bool says it is new. A new key is written only once the CA has answered (_save_account)."""
    if not path.exists():
        return ec.generate_private_key(ec.SECP256R1()), True
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:  # TypeError: encrypted
        reason = exc.strerror if isinstance(exc, OSError) else _one_line(exc)
        raise AcmeError(
            f"cannot read ACME account key {path.resolve()}: {reason}; "
            f"delete it to register a new account"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise AcmeError(
            f"ACME account key {path.resolve()} is not an EC P-256 key; delete it "
            f"to register a new account"
        )
    return key, False


def _check_out_dir(out_dir: Path) -> None:
    """Fail before talking to the CA, so a bad --out does not waste an issuance (rate limits),
    but create nothing yet: a CA that cannot be reached leaves no trace."""
    existing = out_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise AcmeError(
            f"cannot create output directory {out_dir.absolute()}: {existing} is not a directory"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AcmeError(f"output directory {existing} is not writable; choose another --out")


def _save_account(out_dir: Path, key: ec.EllipticCurvePrivateKey, lock: ExitStack | None) -> None:
    """Make --out if need be and write the new account key; ``lock``: take the lock first."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if lock is not None:
            lock.enter_context(_lock(out_dir))
        # Never over a key another run saved while this one was not yet locked.
        write_all([(out_dir / "account.key", key_to_pem(key), 0o600)], overwrite=False)
    except FileExistsError as exc:
        raise AcmeError(
            f"{(out_dir / 'account.key').resolve()} appeared meanwhile (another obtain-cert "
            f"run?); run again to use it"
        ) from exc
    except OSError as exc:
        where = Path(exc.filename).resolve() if exc.filename else out_dir.resolve()
        raise AcmeError(f"cannot write {where}: {exc.strerror or exc}") from exc


@contextmanager
def _lock(out_dir: Path) -> Iterator[None]:
    """One run per --out at a time: two would interleave their renames (one run's key beside
    the other's certificate) and spend two issuances of the CA's weekly limit, so the second
    fails at once instead of waiting. The kernel drops the lock when its holder exits, so a
    killed run leaves nothing to clean up; the empty lock file stays (removing it would let
    two runs lock two different files)."""
    path = out_dir / LOCK_NAME
    try:
        # Read-only: flock needs no write access, so a lock file of ours made read-only works.
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        # EACCES: another user's run made it; `chown USER OUT/*` skips dot files.
        hint = "; chown it to the user that runs obtain-cert" if exc.errno == errno.EACCES else ""
        raise AcmeError(
            f"cannot open the lock file {path.resolve()}: {exc.strerror}{hint}"
        ) from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AcmeError(
                f"another obtain-cert run is using {out_dir.resolve()} (it holds {path.name}); "
                f"let it finish, then run again if its certificate is not what you need"
            ) from None
        yield
    finally:
        os.close(fd)


def obtain_certificate(
    directory_url: str,
    domains: list[str],
    out_dir: Path,
    *,
    http_port: int = 80,
    http_host: str = ALL_INTERFACES,
    acme_ca_bundle: Path | None = None,
    email: str | None = None,
    key_type: str = "ec256",
    deadline_s: float | None = None,
) -> ObtainResult:
    """Order a certificate for `domains` over HTTP-01 and write certbot-named files to out_dir.

    Registering means agreeing to the CA's terms of service. A fresh server key is made on
    every call. Raises AcmeError on any expected failure, and once ``deadline_s`` has passed
    before the certificate is in hand.
    """
    names = _normalize_domains(domains)
    try:
        url = urllib.parse.urlsplit(directory_url)
        hostname = url.hostname
    except ValueError as exc:
        raise AcmeError(f"ACME directory URL {directory_url!r} is malformed: {exc}") from exc
    if url.scheme != "https" or not hostname:
        raise AcmeError(f"ACME directory URL {directory_url!r} must start with https:// (RFC 8555)")
    if acme_ca_bundle is not None:
        _check_ca_bundle(acme_ca_bundle)
    _check_out_dir(out_dir)

    with ExitStack() as held:
        # Locked from the start when --out exists; otherwise once it is made (_save_account).
        locked = out_dir.is_dir()
        if locked:
            held.enter_context(_lock(out_dir))
            _complete_killed_run(out_dir)
        budget = held.enter_context(_Deadline(deadline_s, directory_url))
        server_key = _new_key(key_type)
        csr = make_csr(key_to_pem(server_key), names)
        account_private, new_account = _account_key(out_dir / "account.key")
        account_key = JWKEC(key=account_private)
        # acme types verify_ssl as bool but hands it to requests' verify=, which also takes a CA
        # bundle path. Passing the path explicitly also beats REQUESTS_CA_BUNDLE, which requests
        # otherwise prefers over verify=True.
        verify = cast(bool, str(acme_ca_bundle)) if acme_ca_bundle is not None else True
        net = client.ClientNetwork(
            account_key,
            alg=ES256,
            verify_ssl=verify,
            user_agent="pinrpc-obtain-cert",
            timeout=_NETWORK_TIMEOUT_S,
        )
        budget.watch(net.session)
        if _is_loopback(hostname):
            # A local CA (pebble) must never go through an *_proxy from the environment.
            net.session.trust_env = False
        try:
            with _step("fetching the ACME directory", directory_url):
                directory = client.ClientV2.get_directory(directory_url, net)
                missing = [k for k in _DIRECTORY_KEYS if k not in directory.to_partial_json()]
                if missing:
                    raise ValueError(f"no {', '.join(missing)} in it")
                acme = client.ClientV2(directory, net)
                eab = acme.external_account_required()
            if eab:
                raise AcmeError(
                    f"the CA at {directory_url} requires external account binding, "
                    f"which obtain-cert does not support; use certbot for this CA"
                )
            # Before registering: an account the CA may have made must have its key on disk.
            if new_account:
                with budget.hold():
                    _save_account(out_dir, account_private, None if locked else held)
            with _step("registering the ACME account or updating its contact", directory_url):
                stored = None if new_account else out_dir / "account.key"
                contact = _register(acme, net, email, stored)
            with _step("creating the order", directory_url):
                order = acme.new_order(csr)

            answers: dict[str, bytes] = {}
            to_answer: list[tuple[messages.ChallengeBody, challenges.ChallengeResponse]] = []
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue  # the CA reused an earlier validation of this name
                name = authz.body.identifier.value
                challb = next(
                    (c for c in authz.body.challenges if isinstance(c.chall, challenges.HTTP01)),
                    None,
                )
                if challb is None:
                    raise AcmeError(f"the CA offers no HTTP-01 challenge for {name}; use certbot")
                response, validation = challb.response_and_validation(account_key)
                answers[challb.chall.path] = validation.encode("ascii")
                to_answer.append((challb, response))

            # acme's polling compares against naive datetime.now(), so the deadline must be naive.
            deadline = datetime.datetime.now() + _ORDER_TIMEOUT
            if to_answer:
                with http01_responder(http_host, http_port, answers):
                    with _step("answering the HTTP-01 challenges", directory_url):
                        for challb, response in to_answer:
                            acme.answer_challenge(challb, response)
                    with _step("validating the domains", directory_url):
                        try:
                            order = acme.poll_authorizations(order, deadline)
                        except errors.ValidationError as exc:
                            raise AcmeError(
                                f"HTTP-01 validation failed ({_one_line(exc)}); make http://<domain>"
                                f"/.well-known/acme-challenge/ reach {http_host}:{http_port}"
                            ) from exc
            with _step("finalizing the order", directory_url):
                order = acme.finalize_order(order, deadline)
        finally:
            # Close now rather than in ClientNetwork.__del__, so no ResourceWarning escapes.
            net.session.close()
        budget.stop()  # the certificate is in hand: never cut the writes below short

        try:
            certs = x509.load_pem_x509_certificates(order.fullchain_pem.encode("ascii"))
        except ValueError as exc:
            raise AcmeError(
                f"the CA at {directory_url} returned an unreadable certificate chain"
            ) from exc
        leaf, intermediates = certs[0], certs[1:]
        _check_leaf(leaf, intermediates, server_key, names, directory_url)

        def pem(cs: list[x509.Certificate]) -> bytes:
            return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in cs)

        result = ObtainResult(
            privkey=out_dir / "privkey.pem",
            cert=out_dir / "cert.pem",
            chain=out_dir / "chain.pem",
            fullchain=out_dir / "fullchain.pem",
            serial=leaf.serial_number,
            not_after=leaf.not_valid_after_utc,
            contact_updated=contact,
        )
        key_mode, key_owner = _key_access(result.privkey)
        _remove_leftovers((result.privkey, result.cert, result.chain, result.fullchain,
                           out_dir / "account.key"))  # fmt: skip
        try:
            # The server's pair, privkey.pem and fullchain.pem, last and one right after the
            # other: a run killed between two renames leaves them mismatched only between
            # these two, with cert.pem and chain.pem already renewed for the next run to
            # complete fullchain.pem from (_complete_killed_run).
            write_all(
                [
                    (result.cert, pem([leaf]), 0o644),
                    (result.chain, pem(intermediates), 0o644),
                    (result.privkey, key_to_pem(server_key), key_mode),
                    (result.fullchain, pem(certs), 0o644),
                ],
                overwrite=True,
                owners={result.privkey: key_owner},
            )
        except OSError as exc:
            where = Path(exc.filename).resolve() if exc.filename else out_dir.resolve()
            raise AcmeError(
                f"cannot write {where}: {exc.strerror or exc}; the previous files are unchanged"
            ) from exc
        return result


def _check_leaf(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    key: PrivateKey,
    names: list[str],
    directory_url: str,
) -> None:
    """Refuse a leaf the server must not serve, before anything is written: written, it would
    replace a good certificate with one every client refuses (another name, an expired one),
    or one the server refuses (no issuer in the chain: it would not restart) or will not
    reload over a full chain (no intermediate: clients with ordinary roots would fail)."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        held = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    except x509.ExtensionNotFound:
        held = set()
    missing = [n for n in names if n not in held]
    now = datetime.datetime.now(datetime.UTC)
    if leaf.public_key() != key.public_key():
        problem = "for a different key"
    elif missing:
        # ascii(): the names are the CA's, and may hold escape sequences meant for a terminal.
        shown = ", ".join(map(ascii, sorted(held))) or "none"
        problem = f"not for {', '.join(missing)} (it names {shown})"
    elif not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
        # Issued just now, so not yet valid means this clock is behind the CA's.
        clock = "; check this machine's clock" if now < leaf.not_valid_before_utc else ""
        problem = (
            f"not valid now (from {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC{clock})"
        )
    elif not intermediates:
        problem = "without the intermediate that issued it"
    elif not any(signed_by(leaf, c) for c in intermediates):
        issuer = ascii(leaf.issuer.rfc4514_string())
        problem = f"whose chain holds no certificate that issued it (issuer {issuer})"
    else:
        return
    raise AcmeError(
        f"the CA at {directory_url} returned a certificate {problem}; the previous files are "
        f"unchanged, run again later or ask the CA"
    )


def _complete_killed_run(out_dir: Path) -> None:
    """A run killed between its last two renames left privkey.pem, cert.pem and chain.pem
    renewed beside the previous fullchain.pem, a pair the server would not start with. Put
    fullchain.pem together from the other two first: this run may not reach the CA."""
    names = ("privkey.pem", "cert.pem", "chain.pem", "fullchain.pem")
    try:
        key_pem, cert_pem, chain_pem, full_pem = (read_file(out_dir / n, n) for n in names)
        key = serialization.load_pem_private_key(key_pem, password=None)
        leaf = x509.load_pem_x509_certificate(cert_pem)
        served = x509.load_pem_x509_certificates(full_pem)[0]
    except (IdentityError, ValueError, TypeError, UnsupportedAlgorithm):
        return  # not the state a killed run leaves: not ours to change
    if not isinstance(key, PrivateKey) or same_public_key(key, served):
        return
    if same_public_key(key, leaf):
        with suppress(OSError):  # this run's own write reports a directory it cannot write
            write_atomic(out_dir / "fullchain.pem", cert_pem + chain_pem, 0o644)


def _remove_leftovers(paths: tuple[Path, ...]) -> None:
    """Delete what killed runs left beside ``paths`` (we hold --out's lock: no run is writing
    there): write_all's temporary files and backups, copies of old and new keys among them."""
    for path in paths:
        for pattern in (f".{path.name}.*.tmp", f".{path.name}.*.bak"):
            for leftover in path.parent.glob(pattern):
                with suppress(OSError):  # best effort: never fail a renewal over litter
                    leftover.unlink()


def _check_ca_bundle(path: Path) -> None:
    try:
        data = read_file(path, "CA bundle")  # a FIFO nobody writes to reads as empty, no hang
    except IdentityError as exc:
        raise AcmeError(f"{exc}; pass a readable PEM file") from exc
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise AcmeError(
            f"cannot use CA bundle {path.resolve()}: no PEM certificate in it; "
            "pass a readable PEM file"
        ) from exc


def _key_access(path: Path) -> tuple[int, tuple[int, int]]:
    """Mode and owner for a new privkey.pem: keep the old one's group read access, as certbot
    does, so a non-root server given that group can still read it; never other-read. Run as
    root (a cron job), keep its owner too: a server that owns its key must still read the
    renewed one, or it keeps serving the old certificate until that expires."""
    try:
        old = path.stat()
    except FileNotFoundError:
        return 0o600, (-1, -1)
    uid = old.st_uid if os.geteuid() == 0 else -1  # only root may give a file away
    return 0o600 | (old.st_mode & stat.S_IRGRP), (uid, old.st_gid)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse would print the usage block and exit; we promise a single error line.
        raise _UsageError(message)


def _env_port(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:  # an empty variable counts as unset, as elsewhere
        return default
    try:
        return int(value)
    except ValueError:
        raise _UsageError(f"{name}={value!r} is not a port number") from None


def main(argv: list[str] | None = None, prog: str = "obtain-cert") -> int:
    """scripts/obtain-cert, and `pinrpc-server obtain-cert` with its ``prog``."""
    parser = _Parser(
        prog=prog,
        description="Obtain a server certificate from an ACME CA using HTTP-01.",
    )
    add_version_flag(parser)
    parser.add_argument(
        "--directory",
        default=os.environ.get("PINRPC_ACME_DIRECTORY"),
        help="ACME directory URL (env PINRPC_ACME_DIRECTORY)",
    )
    parser.add_argument(
        "--domain",
        action="append",
        default=[],
        required=True,
        help="DNS name for the certificate (repeatable)",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="directory for privkey.pem, cert.pem, chain.pem, fullchain.pem and the ACME "
        "account's key, account.key (reused by later runs; keep it private)",
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="port for the HTTP-01 responder (default 80, env PINRPC_ACME_HTTP_PORT)",
    )
    parser.add_argument(
        "--http-host",
        default=ALL_INTERFACES,
        help="address for the HTTP-01 responder (default 0.0.0.0, all IPv4 addresses: the CA "
        "connects from outside; :: for IPv6)",
    )
    parser.add_argument(
        "--ca-bundle",
        type=Path,
        default=None,
        help="PEM file to trust the ACME server's own TLS certificate (e.g. pebble)",
    )
    parser.add_argument("--email", default=None, help="contact address for the ACME account")
    parser.add_argument(
        "--key-type", choices=KEY_TYPES, default="ec256", help="server key type (default ec256)"
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=DEFAULT_DEADLINE_S,
        metavar="SECONDS",
        help=f"give up (exit 1, files unchanged, lock released) when the certificate is not in "
        f"hand after this long, e.g. from a CA that answers a byte at a time "
        f"(default {DEFAULT_DEADLINE_S:g})",
    )
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help
            return exc.code if isinstance(exc.code, int) else 0
        http_port: int = (
            args.http_port if args.http_port is not None else _env_port("PINRPC_ACME_HTTP_PORT", 80)
        )
        if not 1 <= http_port <= 65535:
            raise _UsageError(f"HTTP port {http_port} is out of range 1-65535")
        if not args.out:  # `--out "$DIR"` with DIR unset: never the current directory
            raise _UsageError("--out is empty; pass the directory for the certificate files")
        if not args.directory:
            raise _UsageError("no ACME directory; pass --directory or set PINRPC_ACME_DIRECTORY")
        if not 0 < args.deadline <= _MAX_DEADLINE_S:  # NaN too; setitimer overflows beyond
            raise _UsageError(
                f"--deadline {args.deadline:g} is out of range; pass seconds, at most "
                f"{_MAX_DEADLINE_S:g}"
            )
    except _UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        result = obtain_certificate(
            args.directory,
            args.domain,
            Path(args.out),
            http_port=http_port,
            http_host=args.http_host,
            acme_ca_bundle=args.ca_bundle,
            email=args.email,
            key_type=args.key_type,
            deadline_s=args.deadline,
        )
    except AcmeError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: error: interrupted", file=sys.stderr)
        return 130
    if result.contact_updated is not None:
        print(f"updated the ACME account's contact to {', '.join(result.contact_updated)}")
    print(
        f"wrote {result.fullchain} and {result.privkey} (serial {result.serial:x}, "
        f"expires {result.not_after:%Y-%m-%d %H:%M} UTC)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
