"""One enrolled certificate as `pinrpc-server list --json` and `pinrpc admin ... --json` print
it, and the size of Admin.List's pages: shared, so the local and the remote listing agree."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TypedDict

from pinrpc.cli import shown

# A page of Admin.List holds at most PAGE_SIZE clients (about 210 bytes each) and stops early
# past PAGE_BYTES, whatever the records hold; the largest record (an 8 KiB certificate's
# subject, 4096 characters of patterns) is under 16 KiB, so a page fits in MAX_PAGE_BYTES.
PAGE_SIZE = 1000
PAGE_BYTES = 1024 * 1024
MAX_PAGE_BYTES = 2 * PAGE_BYTES
# What client_json adds to the stored record: it depends on the time of asking.
TIMELY = ("active", "days_left", "expiring")
EXPIRED = "expired"
# Names are padded to the longest on a page, but no further than the longest valid name (1-64
# characters, pinrpc.identity.check_name): a hostile server's one long name padded every line.
NAME_WIDTH = 64


class ClientRow(TypedDict):
    """One client as the --json listings print it; the last three depend on the time of asking."""

    name: str
    fingerprint: str
    spki_sha256: str
    subject: str
    allowed_methods: list[str]
    enrolled_at: str
    not_after: str
    revoked_at: str | None
    retire_at: str | None
    active: bool
    days_left: int
    expiring: bool


def usable(revoked_at: dt.datetime | None, retire_at: dt.datetime | None, now: dt.datetime) -> bool:
    """Admitted but for its validity: not revoked, and not past the end of a rotation overlap."""
    return revoked_at is None and (retire_at is None or retire_at > now)


def days_left(not_after: dt.datetime, now: dt.datetime) -> int:
    return (not_after - now).days


def _iso(when: dt.datetime | None) -> str | None:
    return when.isoformat() if when else None


def client_json(
    *,
    name: str,
    fingerprint: str,
    spki_sha256: str,
    subject: str,
    allowed_methods: Sequence[str],
    enrolled_at: dt.datetime,
    not_after: dt.datetime,
    revoked_at: dt.datetime | None,
    retire_at: dt.datetime | None,
    now: dt.datetime,
    warn_days: int,
) -> ClientRow:
    """``active``: admitted now (usable and unexpired); ``expiring``: admitted now, but for
    fewer than ``warn_days`` more days."""
    active = usable(revoked_at, retire_at, now) and not_after > now
    return {
        "name": name,
        "fingerprint": fingerprint,
        "spki_sha256": spki_sha256,
        "subject": subject,
        "allowed_methods": list(allowed_methods),
        "enrolled_at": enrolled_at.isoformat(),
        "not_after": not_after.isoformat(),
        "revoked_at": _iso(revoked_at),
        "retire_at": _iso(retire_at),
        "active": active,
        "days_left": days_left(not_after, now),
        "expiring": active and days_left(not_after, now) < warn_days,
    }


def status(
    revoked_at: dt.datetime | None,
    retire_at: dt.datetime | None,
    not_after: dt.datetime,
    now: dt.datetime,
) -> str:
    """A certificate's state in the text listings: ``active`` where ``client_json`` says so,
    else why the server refuses it."""
    if revoked_at is not None:
        return f"revoked {revoked_at:%Y-%m-%d}"
    if retire_at is not None:  # an overlap may last years: the hour matters
        return f"{'retiring' if retire_at > now else 'retired'} {retire_at:%Y-%m-%d %H:%M}"
    if not_after <= now:
        return f"{EXPIRED} {not_after:%Y-%m-%d}"
    return "active"


def client_line(row: ClientRow, state: str, width: int) -> str:
    """One client as `pinrpc-server list` and `pinrpc admin ...` print it: ``row`` from
    client_json, ``state`` from status(), the name padded to ``width`` (at most NAME_WIDTH).
    Escaped, since a remote listing is another machine's text."""
    days = row["days_left"]
    expiry = "EXPIRED" if days < 0 else f"{days} days left"
    flag = "  <- expiring, rotate it" if row["expiring"] else ""
    if state.startswith(EXPIRED):  # usable but for its dates: rotate cannot run with it
        flag = "  <- expired: new key pair, then enroll --replace"
    allowed = ",".join(row["allowed_methods"]) or "-"
    name, fingerprint, width = row["name"], row["fingerprint"], min(width, NAME_WIDTH)
    return shown(f"{name:<{width}}  {fingerprint}  {state:<18}  {expiry:<15}  {allowed}{flag}")
