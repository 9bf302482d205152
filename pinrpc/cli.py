"""What both command-line programs share: flags with PINRPC_* fallbacks, exit codes, errors."""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import sys
from collections.abc import Callable, Sequence
from enum import IntEnum
from importlib import metadata
from typing import Any, TextIO, TypeVar, cast

from google.protobuf.timestamp_pb2 import Timestamp

from pinrpc.errors import AnswerError, OutputError, PinrpcError

N = TypeVar("N", int, float)
DIST = "pinrpc"  # the distribution both programs ship in


class Exit(IntEnum):
    """Exit codes, documented in the README."""

    OK = 0
    ERROR = 1  # bad input, unreadable file, registry problem
    USAGE = 2  # argparse's own code for bad flags
    CONNECT = 3  # could not reach the server or the TLS handshake failed
    DENIED = 4  # the server refused the call (not enrolled, revoked, not allowed)
    RPC = 5  # any other call failure


def env_name(flag: str) -> str:
    return "PINRPC_" + flag.lstrip("-").replace("-", "_").upper()


def add_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    *,
    help: str,
    required: bool = False,
    default: str | None = None,
    **kwargs: object,
) -> None:
    """``--flag`` with the environment variable PINRPC_FLAG as its fallback."""
    env = env_name(flag)
    value = os.environ.get(env) or default
    suffix = f" [env {env}]" if default is None else f" [env {env}; default {default}]"
    choices = kwargs.get("choices")
    if choices is not None and os.environ.get(env):
        # argparse checks choices only on the command line; this checks the variable too,
        # when the flag is not given (argparse converts a string default with ``type``).
        kwargs["type"] = _one_of(choices, kwargs.get("type", str), env)  # type: ignore[arg-type]
    elif "type" in kwargs and os.environ.get(env):
        kwargs["type"] = _named_env(kwargs["type"], env, os.environ[env])  # type: ignore[arg-type]
    parser.add_argument(
        flag,
        default=value,
        required=required and value is None,
        help=help + suffix,
        **kwargs,  # type: ignore[arg-type]
    )


def at_least(
    convert: Callable[[str], N], minimum: N, maximum: N | None = None
) -> Callable[[str], N]:
    """An argparse ``type``: a number (int or float) from ``minimum`` up to ``maximum``."""

    def check(text: str) -> N:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value):  # float() takes "nan" and "inf"; nothing here means them
            raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum:g}, got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:g}, got {text}")
        return value

    return check


def utf8(text: str) -> str:
    """An argparse ``type``: text that can be sent on (argv bytes that are not UTF-8 cannot)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"not valid UTF-8: {text!r}") from None
    return text


def file_path(text: str) -> str:
    """An argparse ``type``: a file name that is not empty or blank ("" would name the current
    directory and "  " a file nobody meant, and the error would be about those). Any bytes:
    file names need not be UTF-8."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be {'blank' if text else 'empty'}: {text!r}")
    return text


def path_text(text: str) -> str:
    """An argparse ``type``: a registry path or URL, UTF-8 (it is stored and shown as text),
    not blank, without spaces around it (a pasted " reg.db" made a new, empty registry)."""
    if file_path(utf8(text)) != text.strip():
        raise argparse.ArgumentTypeError(f"has spaces around it: {text!r}")
    return text


def host_port(*, port_zero: bool = False) -> Callable[[str], str]:
    """An argparse ``type``: HOST:PORT, an IPv6 host in brackets ([::1]:8443), the port a
    number up to 65535 (0, "any free port", only where ``port_zero``)."""
    lowest = 0 if port_zero else 1

    def check(text: str) -> str:
        host, sep, port = utf8(text).rpartition(":")
        v6 = host.startswith("[") and host.endswith("]")
        if (
            not sep
            or not host.strip("[]")
            or (":" in host and not v6)
            or not (port.isascii() and port.isdigit())
            or not lowest <= int(port) <= 65535
        ):
            raise argparse.ArgumentTypeError(
                f"not HOST:PORT with a port from {lowest} to 65535: {text!r} "
                "(e.g. api.example.com:8443, [::1]:8443)"
            )
        return text

    return check


def _named_env(
    convert: Callable[[str], object], env: str, env_value: str
) -> Callable[[str], object]:
    """``convert``, whose refusal of the variable's value names the variable: argparse names
    only the flag, which the user may never have typed."""

    def check(text: str) -> object:
        try:
            return convert(text)
        except argparse.ArgumentTypeError as exc:
            if text != env_value:
                raise
            raise argparse.ArgumentTypeError(f"{exc} (from {env})") from None

    check.__name__ = getattr(convert, "__name__", "value")  # argparse's "invalid NAME value"
    return check


def _one_of(
    choices: Sequence[str], convert: Callable[[str], str], env: str
) -> Callable[[str], str]:
    def check(text: str) -> str:
        value = convert(text)
        if value not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {text!r} (from {env} or the flag; choose from "
                f"{', '.join(choices)})"
            )
        return value

    return check


def installed_version(dist: str = DIST) -> str:
    """The installed distribution's version; a checkout run from PYTHONPATH has none."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


class _Version(argparse.Action):
    """--version, looked up only when asked: the metadata search costs every start otherwise."""

    def __init__(self, option_strings: list[str], dest: str, **_: object) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS,
                         help="print the version and exit")  # fmt: skip

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"{parser.prog} {installed_version()}")
        parser.exit()


def add_version_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action=_Version)


def missing_extra(command: str, extra: str, exc: ModuleNotFoundError) -> str:
    """One line for a command whose optional dependencies (pinrpc[extra]) are not installed."""
    return (
        f"{command} needs the {extra} extra (Python module {exc.name!r} is missing): "
        f"pip install 'pinrpc[{extra}]'"
    )


# What every enrolled client may call, allowed or not (server/auth.py's ALWAYS_ALLOWED).
ALWAYS_ALLOWED_NAMES = "WhoAmI, Rotate, health and reflection"


def add_allow_flag(parser: argparse.ArgumentParser) -> None:
    """--allow PATTERN (repeatable); without it, PINRPC_ALLOW (comma-separated)."""
    parser.add_argument(
        "--allow",
        action="append",
        type=utf8,
        metavar="PATTERN",
        help="method pattern the client may call, e.g. '/pinrpc.v1.Echo/*' (repeatable; "
        f"{ALWAYS_ALLOWED_NAMES} are always allowed; administration only by a pattern naming "
        "/pinrpc.v1.Admin/) [env PINRPC_ALLOW, comma-separated]",
    )


def add_permit_flags(parser: argparse.ArgumentParser) -> None:
    """`permit`'s flags: --allow, or --none to take every permission away."""
    parser.description = (
        "Replace the client's method patterns whole (they are not added to the old ones) on "
        "every certificate it may use, during a rotation's overlap the retiring one too. "
        "Running servers apply it within a poll, to open connections too."
    )
    add_allow_flag(parser)
    parser.add_argument(
        "--none",
        action="store_true",
        help=f"take every permission away ({ALWAYS_ALLOWED_NAMES} stay); instead of --allow",
    )


def permit_patterns(args: argparse.Namespace) -> list[str]:
    # --none outranks PINRPC_ALLOW, as any flag outranks its environment fallback; the server
    # checks the rest (server/enrollment.py's new_permissions).
    return [] if args.none and args.allow is None else allow_patterns(args)


def allow_patterns(args: argparse.Namespace) -> list[str]:
    if args.allow is not None:
        return list(args.allow)
    # "/a/*, /b/*" is how people write a list: the spaces are not part of the patterns.
    return [p.strip() for p in os.environ.get("PINRPC_ALLOW", "").split(",") if p.strip()]


def shown(text: str, keep: str = "") -> str:
    """``text`` from elsewhere (a server's answer, a status message) fit to print on one line:
    each character str.isprintable() refuses but those in ``keep`` is written as repr() writes
    it (ESC as \\x1b, CR as \\r, a newline as \\n, a bidi override as \\u202e), so that it can
    neither drive the terminal nor forge a line of output."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in text)


def answer_time(stamp: Timestamp, what: str) -> dt.datetime:
    """A timestamp in a server's answer as an aware datetime; one outside what protobuf allows
    (years 1-9999) is the server's error, not a traceback."""
    try:
        return stamp.ToDatetime(dt.UTC)
    except (ValueError, OverflowError) as exc:
        raise AnswerError(f"the server answered with an invalid {what}: {exc}") from exc


def run(program: str, body: Callable[[], int]) -> int:
    """Run a command; expected failures become one line on stderr and an exit code. What it
    prints goes through shown(): text a server sent cannot drive the terminal."""
    stdout, stderr = sys.stdout, sys.stderr  # None when started with it closed
    if stdout is not None:
        sys.stdout = cast(TextIO, _CheckedOutput(stdout))
    if stderr is not None:
        sys.stderr = cast(TextIO, _Escaped(stderr))
    try:
        code = body()
        if stdout is not None:
            sys.stdout.flush()  # here, where a failure is caught, not at exit
        return code
    except PinrpcError as exc:
        if isinstance(exc, OutputError):
            _drop_stdout()  # what is buffered cannot fail the flush at exit again
        print(f"{program}: error: {exc}", file=sys.stderr)
        return Exit.RPC if isinstance(exc, AnswerError) else Exit.ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `pinrpc-server list | head -1`: the reader left; silence the final flush too.
        _drop_stdout()
        return Exit.OK
    finally:
        if stdout is not None:
            sys.stdout = stdout
        if stderr is not None:
            sys.stderr = stderr


class _Escaped:
    """A stream whose writes keep newlines and tabs but no other control character: the net
    under every print of server text (those that print a field escape its newlines too)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        # Most writes are one line, or print()'s end: skip the copy for them.
        clean = text.rstrip("\n").isprintable()
        self._stream.write(text if clean else shown(text, keep="\n\t"))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _CheckedOutput(_Escaped):
    """sys.stdout while a command runs: a failed write is an OutputError, one line, not a
    traceback (a reader that left, BrokenPipeError, stays as it is)."""

    def write(self, text: str) -> int:
        try:
            return super().write(text)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(f"cannot write the output: {exc.strerror or exc}") from exc

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(f"cannot write the output: {exc.strerror or exc}") from exc


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the flush at exit cannot fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
