"""Default rule names (``exclusion(LV,RV)``, ``inclusion(LV in LV+MYO | may_touch RA) [2d axis 0]``) and reading them
back (:func:`parse_rule_name`). Rule names are the keys of every per-rule number (TVS, SVR, logs), so they must stay
unambiguous for every label name: names that are not plain words are JSON-quoted
(``documentation/topology_spec.md``, "Rule names")."""
from __future__ import annotations

import json
import re
from typing import Any, Dict, Optional

from nnunet_topo.topology_spec.model import RULE_KEYS, Structure


#: label/structure names written bare in rule names; any other name is JSON-quoted (``"LV,endo"``) so that rule names
#: stay unambiguous for every label name (commas, brackets, ``+``, ``|``, spaces, quotes)
_BARE_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def quote_name(name: str) -> str:
    """A label, structure or mesh name as written in a rule name: bare when a plain word, else JSON-quoted."""
    return name if _BARE_NAME.fullmatch(name) and name != "in" else json.dumps(name, ensure_ascii=False)


def _struct_token(s: Structure) -> str:
    """A structure in a rule name: ``LV``, ``LV+MYO`` (an inline region), ``LV_epi`` (a named structure); names that
    are not plain words are quoted, so ``"A+B"`` (one label named A+B) differs from ``A+B`` (a region)."""
    if s.name == "+".join(s.label_names):  # a single label or an inline region
        return "+".join(quote_name(n) for n in s.label_names)
    return quote_name(s.name)


def default_rule_name(rule_type: str, parts: Dict[str, Optional[Structure]], mode: str, axis: int) -> str:
    """The name :func:`~nnunet_topo.topology_spec.parse.parse_topology` gives a voxel rule without ``name``;
    ``parts``: ``a``/``b`` or ``inner``/``outer``/``may_touch`` (``None`` if absent)."""
    if rule_type == "exclusion":
        name = f"exclusion({_struct_token(parts['a'])},{_struct_token(parts['b'])})"
    else:
        name = f"inclusion({_struct_token(parts['inner'])} in {_struct_token(parts['outer'])}"
        if parts.get("may_touch") is not None:
            name += f" | may_touch {_struct_token(parts['may_touch'])}"
        name += ")"
    if mode == "2d":
        name += f" [2d axis {axis}]"
    return name


_TOKEN = re.compile(r'\s*(?:(?P<q>"(?:[^"\\]|\\.)*")|(?P<w>[A-Za-z0-9_.\-]+)|(?P<p>[(),+|\[\]]))')


def parse_rule_name(name: str) -> Dict[str, Any]:
    """Read a default rule name back: the inverse of the names
    :func:`~nnunet_topo.topology_spec.parse.parse_topology` gives rules without ``name``.

    Returns:
        ``{"type": "exclusion" | "inclusion", "mode": "3d" | "2d", "axis": int,`` and ``"a"``/``"b"`` or
        ``"inner"``/``"outer"``/``"may_touch"`` (``None`` if absent): each a tuple of names — the label names of
        a label or inline region, or the one name of a named structure ``}``.

    Raises:
        ValueError: ``name`` is not a default rule name (e.g. a user-given ``"name"``).
    """
    tokens, pos = [], 0
    while pos < len(name):
        m = _TOKEN.match(name, pos)
        if m is None or m.end() == pos:
            if name[pos:].strip() == "":
                break
            raise ValueError(f"not a default rule name: {name!r} (cannot read it at {name[pos:]!r})")
        tokens.append(("name", json.loads(m["q"])) if m["q"] else ("word", m["w"]) if m["w"] else ("punct", m["p"]))
        pos = m.end()
    i = 0

    def take(kind=None, value=None):
        nonlocal i
        if i >= len(tokens) or (kind and tokens[i][0] != kind) or (value is not None and tokens[i][1] != value):
            raise ValueError(f"not a default rule name: {name!r}")
        i += 1
        return tokens[i - 1]

    def structure():
        names = []
        while True:
            kind, value = take()
            if kind not in ("name", "word"):
                raise ValueError(f"not a default rule name: {name!r}")
            names.append(value)
            if i < len(tokens) and tokens[i] == ("punct", "+"):
                take()
                continue
            return tuple(names)

    kind, rule_type = take("word")
    if rule_type not in RULE_KEYS:
        raise ValueError(f"not a default rule name: {name!r}")
    take("punct", "(")
    out: Dict[str, Any] = {"type": rule_type, "mode": "3d", "axis": 0}
    if rule_type == "exclusion":
        out["a"] = structure()
        take("punct", ",")
        out["b"] = structure()
    else:
        out["inner"] = structure()
        take("word", "in")
        out["outer"] = structure()
        out["may_touch"] = None
        if i < len(tokens) and tokens[i] == ("punct", "|"):
            take()
            take("word", "may_touch")
            out["may_touch"] = structure()
    take("punct", ")")
    if i < len(tokens):
        take("punct", "[")
        take("word", "2d")
        take("word", "axis")
        out["mode"], out["axis"] = "2d", int(take("word")[1])
        take("punct", "]")
    if i != len(tokens):
        raise ValueError(f"not a default rule name: {name!r}")
    return out
