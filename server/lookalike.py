"""Client names that read alike, for the operator skimming `pinrpc-server pending`.

A name is ASCII letters, digits, '.', '_' and '-' (check_name), so the look-alikes that matter
are few. A name's skeleton is its casefold (the registry already treats case variants as one
name) with these mapped to one form. Unicode TR39's confusables map four of them within this
alphabet (``0`` to ``O``, ``1`` and capital ``I`` to ``l``, ``m`` to ``rn``); small ``i``, ``w``
and the separators are this module's own additions:

- ``0`` -> ``o``: zero and the letter o.
- ``1`` and ``i`` -> ``l``: one, capital I and small l are the same stroke in many fonts, and
  after casefolding capital I is small i. The price: names that differ only in i/l ("mail" and
  "mall") are marked too; it is a warning, and such a pair is worth a second look anyway.
- ``m`` -> ``rn``, ``w`` -> ``vv``: expanded, not contracted, so that "rnn"/"mn" and "vvv"/"wv"
  need no ordering rule.
- ``.`` and ``_`` -> ``-``: the separators, easily swapped when read or retyped.

Kept small on purpose: every entry marks more distinct names too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

_FOLD: Final = str.maketrans(
    {"0": "o", "1": "l", "i": "l", "m": "rn", "w": "vv", ".": "-", "_": "-"}
)


def skeleton(name: str) -> str:
    """The form two names share when one reads as the other."""
    return name.casefold().translate(_FOLD)


class LookAlikes:
    """The given names by skeleton, built once: `pending` checks every request against
    registries of 10,000+ clients, so one pass over them, then one lookup per request."""

    def __init__(self, names: Iterable[str]) -> None:
        self._names: dict[str, list[str]] = {}
        for name in sorted(names):  # sorted: the same answer on every run
            self._names.setdefault(skeleton(name), []).append(name)

    def of(self, name: str) -> str | None:
        """A name that reads like ``name`` without being it, or None; a case variant first,
        as the one the registry would refuse ``name`` for."""
        alike = [n for n in self._names.get(skeleton(name), ()) if n != name]
        folded = name.casefold()
        return next((n for n in alike if n.casefold() == folded), next(iter(alike), None))
