"""How the topology spec reports a mistake: :class:`TopologySpecError` (a ``ValueError``) and the helpers that make
its messages name the offending key or label and suggest the fix (``Did you mean 'LV'?``)."""
from __future__ import annotations

import difflib
from numbers import Integral
from typing import Any, Iterable


class TopologySpecError(ValueError):
    """A ``topology`` block (or the ``labels`` it refers to) is invalid; the message says how to fix it."""


def did_you_mean(name: Any, choices: Iterable[str]) -> str:
    """`` Did you mean 'X'?`` for the choice closest to ``name`` (the same name in another case first), or ``""``."""
    if not isinstance(name, str):
        return ""
    choices = list(choices)
    same_case = [c for c in choices if c.lower() == name.lower()]
    close = same_case or difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def is_int(x: Any) -> bool:
    """An integer that is not a bool (JSON ``true`` is no axis and no Betti number)."""
    return isinstance(x, Integral) and not isinstance(x, bool)


def quoted_list(names: Iterable[str]) -> str:
    """``'LV', 'RV'`` for messages; ``(none)`` when empty."""
    names = list(names)
    return ", ".join(repr(n) for n in names) if names else "(none)"
