"""What a registry holds (Client), what a backend offers (Registry), and the enrollment rules.

The rules live here, above the backends, so SQLite and PostgreSQL refuse exactly the same
enrollments with exactly the same messages.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography import x509

from pinrpc.errors import CapacityError, ConflictError
from pinrpc.identity import Fingerprint
from pinrpc.listing import TIMELY, ClientRow, client_json, usable
from server.enrollment import REKEY_HINT, Candidate, canonical_name


@dataclass(frozen=True, slots=True)
class Client:
    name: str
    fingerprint: Fingerprint
    cert_pem: str
    spki_sha256: str
    subject: str
    has_key_ids: bool
    allowed_methods: tuple[str, ...]
    enrolled_at: dt.datetime
    not_after: dt.datetime
    revoked_at: dt.datetime | None
    retire_at: dt.datetime | None = None  # end of a rotation's overlap

    @property
    def active(self) -> bool:
        """Admitted now: not revoked, and not past the end of a rotation overlap."""
        return usable(self.revoked_at, self.retire_at, now_utc())

    @property
    def current(self) -> bool:
        """The client's newest usable certificate (not revoked, not being retired)."""
        return self.revoked_at is None and self.retire_at is None

    def listed(self, now: dt.datetime, warn_days: int) -> ClientRow:
        """As `pinrpc-server list --json` prints it (and `pinrpc admin list --json`)."""
        return client_json(
            name=self.name,
            fingerprint=str(self.fingerprint),
            spki_sha256=self.spki_sha256,
            subject=self.subject,
            allowed_methods=self.allowed_methods,
            enrolled_at=self.enrolled_at,
            not_after=self.not_after,
            revoked_at=self.revoked_at,
            retire_at=self.retire_at,
            now=now,
            warn_days=warn_days,
        )

    def as_json(self) -> dict[str, object]:
        """The stored record, without what depends on the time of asking."""
        fields = self.listed(now_utc(), 0)
        return {key: value for key, value in fields.items() if key not in TIMELY}


@dataclass(frozen=True, slots=True)
class Pending:
    """An enrollment request waiting for an operator: never trusted until approved."""

    fingerprint: Fingerprint
    name: str
    cert_pem: str
    peer: str
    requested_at: dt.datetime
    expires_at: dt.datetime

    def as_json(self) -> dict[str, object]:
        return {
            "fingerprint": str(self.fingerprint),
            "name": self.name,
            "peer": self.peer,
            "requested_at": self.requested_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
        }


Guard = Callable[[Sequence[Client]], None]
"""Called by a change inside its write transaction with the certificates it is about to change
(as that transaction reads them); raising refuses the change, which then changes nothing. A
check made on an earlier read could be overtaken by another change before this one."""

After = Callable[[Callable[[], Sequence[Client]]], None]
"""Called by a change in the same transaction once it is made, with a function that reads
every active certificate as the change leaves them (uncommitted; a read of every row, so only
on demand); raising refuses the change. A check of what remains, e.g. that some client can
still administer the server."""


class Registry(Protocol):
    """What the server and the admin CLI need from a registry backend."""

    where: str  # a path or a URL without its password: for the operator's messages only

    def enroll(
        self,
        candidate: Candidate,
        name: str,
        allowed: Sequence[str],
        *,
        replace: bool = False,
        guard: Guard | None = None,
        after: After | None = None,
    ) -> Client:
        """``guard`` sees the certificates a ``replace`` revokes (none for a new name);
        ``after``, the active ones as the enrollment leaves them."""
        ...

    def revoke(
        self, ref: str, *, guard: Guard | None = None, after: After | None = None
    ) -> list[Client]:
        """Revoke one certificate by fingerprint, or by name every usable one of the client;
        return what it ended (the certificate ``ref`` names first) as its transaction left it.
        ``guard`` sees those certificates; ``after``, the active ones that remain."""
        ...

    def permit(
        self,
        ref: str,
        allowed: Sequence[str],
        *,
        guard: Guard | None = None,
        after: After | None = None,
    ) -> Client:
        """Replace the allowed method patterns of every usable certificate of a client;
        ``guard`` sees those certificates, ``after`` the active ones as the change leaves them."""
        ...

    def rotate(
        self, current: Fingerprint, successor: Candidate, overlap: dt.timedelta
    ) -> list[Client]:
        """Enroll ``successor`` with ``current``'s name and permissions; retire ``current``
        after ``overlap`` (at once if zero), and the client's older retiring certificates no
        later. Return the successor, ``current`` and those older ones, in that order, as the
        rotation's own transaction left them."""
        ...

    def find(self, ref: str) -> Client: ...

    def request_enrollment(
        self,
        candidate: Candidate,
        name: str,
        peer: str,
        ttl: dt.timedelta,
        limit: int,
        *,
        check_waiting: Callable[[Sequence[Pending]], None] | None = None,
    ) -> Pending:
        """Queue a request, at most ``limit`` waiting; ``check_waiting`` may refuse it (by
        raising) on the requests already waiting, read in the same transaction."""
        ...

    def pending(self) -> list[Pending]: ...

    def approve(
        self, ref: str, name: str | None, allowed: Sequence[str], *, replace: bool = False
    ) -> Client:
        """Enroll the waiting request ``ref`` (a fingerprint) and remove it, atomically."""
        ...

    def take_pending(self, ref: str) -> Pending: ...

    def clients(self) -> list[Client]: ...

    def clients_after(self, after: Fingerprint | None, limit: int) -> list[Client]:
        """At most ``limit`` clients in clients()'s order (enrollment order), after
        certificate ``after`` (from the first when None), in one range read; NotFoundError
        when the registry holds no certificate ``after``."""
        ...

    def generation(self) -> int:
        """A number that changes whenever the enrolled set changes; cheap to poll."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class ChangeNotifier(Protocol):
    """A registry that can wake its watcher when another process changed it (PostgreSQL)."""

    def wait_for_change(self, timeout: float) -> None:
        """Return when a change was announced, or after ``timeout`` seconds; never raises."""
        ...


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def subject_clash(candidate: Candidate, active: Sequence[Client]) -> Client | None:
    """A TLS stack that picks trust anchors by name alone cannot tell apart two that share a
    subject and lack key ids (grpcio 1.85 admitted both in a probe: a precaution, SECURITY.md).

    Subjects are compared as the TLS stack compares them (ignoring ASCII case and whitespace),
    not as stored; only the rows that could clash are parsed.
    """
    wanted = canonical_name(candidate.cert.subject)
    for client in active:
        if candidate.has_key_ids and client.has_key_ids:
            continue
        subject = x509.load_pem_x509_certificate(client.cert_pem.encode()).subject
        if canonical_name(subject) == wanted:
            return client
    return None


def refuse_fingerprint_name(name: str) -> None:
    """A stranger could ask for a victim's fingerprint as its name: revoke and permit by that
    name would then reach the victim, whose fingerprint they match first."""
    if Fingerprint.looks_like(name):
        raise ConflictError(
            f"client name {name!r} reads as a certificate fingerprint, which `revoke` and "
            "`permit` would match before the name; choose another name"
        )


def refuse_shared_key(candidate: Candidate, rows: Sequence[Client]) -> None:
    """A revoked certificate's key counts as stolen: a new certificate made with it (under any
    name) would let the thief back in. And one key pair is one client: its certificates would
    otherwise carry two names and two sets of permissions. Called once the candidate's own
    fingerprint was looked for in ``rows`` (refused with its own message)."""
    same = [row for row in rows if row.spki_sha256 == candidate.spki_sha256]
    revoked = next((row for row in same if row.revoked_at is not None), None)
    if revoked is not None:
        raise ConflictError(
            f"the key of certificate {candidate.fingerprint} is that of certificate "
            f"{revoked.fingerprint}, revoked on {revoked.revoked_at:%Y-%m-%d %H:%M} UTC (as "
            f"{revoked.name!r}): a revoked certificate's key counts as compromised; {REKEY_HINT}"
        )
    # Active, in a rotation's overlap, or retired by one: any certificate the key ever had.
    if same:
        raise ConflictError(
            f"the key of certificate {candidate.fingerprint} is that of certificate "
            f"{same[0].fingerprint} of client {same[0].name!r} (enrolled on "
            f"{same[0].enrolled_at:%Y-%m-%d %H:%M} UTC), and one key pair is one client, a "
            f"re-key included; {REKEY_HINT}"
        )


# Certificates of one client a rotation may leave in their overlap, trusted side by side.
# Unbounded, any enrolled client (Rotate needs no permission) could rotate in a loop: 1,500
# rotations in 110 s left 1,501 of its certificates in the server's TLS roots for 24 h, whose
# every rebuild costs more with each one (docs/SCALING.md).
MAX_RETIRING = 3
DAY = dt.timedelta(days=1)


def refuse_more_retiring(current: Client, rows: Sequence[Client]) -> None:
    """Refuse a rotation with an overlap that would leave more than MAX_RETIRING of the
    client's certificates in theirs; one without an overlap ends them all, so it may run."""
    retiring = [r for r in rows if r.name == current.name and r.active and not r.current]
    if len(retiring) >= MAX_RETIRING:
        first = min(r.retire_at for r in retiring if r.retire_at is not None)
        raise CapacityError(
            f"client {current.name!r} already has {len(retiring)} certificates in a rotation's "
            f"overlap (the first ends {first:%Y-%m-%d %H:%M} UTC), the most it may have; rotate "
            "again after that, or now with an overlap of 0 (which ends them all at once)"
        )


# Rotations of one client in a day. Each leaves a row for good (nothing is ever deleted), and
# every server reads every row at each change: unbounded, one client rotating without overlap
# added 52 rows (1.5 KB each) a second.
MAX_ROTATIONS_A_DAY = 50


def refuse_rotating_too_often(current: Client, rows: Sequence[Client], now: dt.datetime) -> None:
    recent = [r.enrolled_at for r in rows if r.name == current.name and r.enrolled_at > now - DAY]
    if len(recent) > MAX_ROTATIONS_A_DAY:  # the client's first certificate is not a rotation
        raise CapacityError(
            f"client {current.name!r} got {len(recent)} certificates in the last 24 hours (at "
            f"most {MAX_ROTATIONS_A_DAY} rotations a day); rotate again after "
            f"{min(recent) + DAY:%Y-%m-%d %H:%M} UTC"
        )


def check_enrollment(
    candidate: Candidate,
    name: str,
    rows: Sequence[Client],
    replace: bool,
    *,
    retired_stays: bool = False,
) -> Client | None:
    """Apply the registry-level rules; return the client that ``replace`` retires, if any.

    ``retired_stays``: the retired certificate stays trusted for a while (a rotation's
    overlap), so the newcomer must not look like it either.
    """
    for row in rows:
        if row.fingerprint != candidate.fingerprint:
            continue
        if row.revoked_at is not None:
            raise ConflictError(
                f"certificate {candidate.fingerprint} was revoked on "
                f"{row.revoked_at:%Y-%m-%d %H:%M} UTC (as {row.name!r}) and cannot be enrolled "
                f"again; {REKEY_HINT}"
            )
        raise ConflictError(
            f"certificate {candidate.fingerprint} is already enrolled as {row.name!r}"
        )
    refuse_shared_key(candidate, rows)
    active = [row for row in rows if row.active]
    retired = next((row for row in active if row.name == name and row.current), None)
    # A certificate still in a rotation's overlap holds its name too, even once its successor
    # was revoked: another key pair under that name would share its permissions (`permit`
    # changes every certificate of a name) and its lines in the logs.
    holder = retired or next((row for row in active if row.name == name), None)
    if holder is not None and not replace:
        raise ConflictError(
            f"a client named {name!r} is already enrolled ({holder.fingerprint}); "
            "pass --replace to re-key it (the old certificate is revoked)"
        )
    # "Alice" and "alice" read the same in logs and audit lines. Only a new name is checked:
    # registries that already hold such a pair keep re-keying and rotating both. Names are
    # ASCII (check_name), where casefold() is plain lower-casing: non-ASCII look-alikes (sharp
    # s, dotless i, combining marks, full-width forms) are refused before they get here.
    if not any(row.name == name for row in active):
        refuse_fingerprint_name(name)
        folded = name.casefold()
        alike = next((row for row in active if row.name.casefold() == folded), None)
        if alike is not None:
            raise ConflictError(
                f"a client named {alike.name!r} is already enrolled ({alike.fingerprint}); "
                f"{name!r} differs from it only in case and would read the same in logs; "
                f"choose another name (or re-key {alike.name!r} with --replace)"
            )
    # A re-key of a name never enrolled is a typo, most likely while replacing a lost key: the
    # old certificate would stay trusted under the right name, and the command succeed.
    if replace and not any(row.name == name for row in rows):
        raise ConflictError(
            f"--replace: no client named {name!r} was ever enrolled, so there is nothing to "
            "re-key; check the name (see `pinrpc-server list`), or drop --replace to enroll "
            "a new client"
        )
    trusted = active if retired_stays else [row for row in active if row is not retired]
    clash = subject_clash(candidate, trusted)
    if clash is not None:
        raise ConflictError(
            f"certificate subject {candidate.subject!r} equals that of enrolled client "
            f"{clash.name!r} (as TLS compares names: case and spacing aside) and one of them "
            f"lacks subject/authority key identifiers, so the TLS stack could not tell them "
            f"apart; {REKEY_HINT}"
        )
    return retired
