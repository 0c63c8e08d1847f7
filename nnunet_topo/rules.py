"""The topology spec: parse and validate the ``topology`` block of an nnU-Net ``dataset.json``.

Structures are named by nnU-Net *label names*; a structure may be a single label, a *region* (a list of
label names, e.g. the LV epicardium encloses ``["LV", "MYO"]``) or a name defined in the block's own
``structures`` table. Rules say which structures must not touch (``exclusion``) and which must lie inside
another (``inclusion``); ``betti``/``betti_2d`` give topological priors; ``mesh_structures`` names the closed
surfaces a mesh head predicts, and ``mesh_rules`` says which of those surfaces must not overlap
(``mesh_exclusion``, contact allowed) and which lies inside another (``mesh_inclusion``). Voxel rules are about
label maps ("must not touch"), mesh rules about the volumes the closed surfaces enclose (DESIGN §4). The meaning of
the rules on voxels is in :mod:`nnunet_topo.violations` (DESIGN §4); the user documentation of every key is
``documentation/topology_spec.md``.

Example (short-axis cardiac MRI, labels background/RV/MYO/LV)::

    "topology": {
      "connectivity": 6,
      "structures": {"LV_epi": ["LV", "MYO"]},
      "rules": [
        {"type": "exclusion", "a": "LV", "b": "RV"},
        {"type": "inclusion", "inner": "LV", "outer": "LV_epi", "mode": "2d", "axis": 0}
      ],
      "betti": {"LV": [1, 0, 0], "MYO": [1, 0, 0], "RV": [1, 0, 0]},
      "betti_2d": {"axis": 0, "MYO": [[1, 1], [1, 0]]},
      "mesh_structures": {"LV_endo": ["LV"], "LV_epi": ["LV", "MYO"], "RV": ["RV"]},
      "mesh_rules": [
        {"type": "mesh_exclusion", "meshes": ["RV", "LV_epi"]},
        {"type": "mesh_inclusion", "inner": "LV_endo", "outer": "LV_epi"}
      ]
    }

Every problem raises :class:`TopologySpecError` (a ``ValueError``) whose message names the offending key,
rule or label and says how to fix it. This module does not import nnU-Net.
"""
from __future__ import annotations

import dataclasses

import difflib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = [
    "spec_from_dataset_json",
    "spec_in_patch_frame",
    "TopologySpecError",
    "Structure",
    "ExclusionRule",
    "InclusionRule",
    "Rule",
    "MeshExclusionRule",
    "MeshInclusionRule",
    "MeshRule",
    "mesh_for_structure",
    "mesh_rule_meshes",
    "mesh_rules_in_force",
    "TopologySpec",
    "parse_topology",
    "load_topology",
    "default_topology",
    "describe",
    "in_plane_connectivity",
    "parse_rule_name",
    "format_betti_set",
    "reference_spec",
    "ALLOWED_TOP_LEVEL_KEYS",
    "ReferenceException",
    "RULE_KEYS",
    "MESH_RULE_KEYS",
]

#: keys allowed in the ``topology`` block
ALLOWED_TOP_LEVEL_KEYS: Tuple[str, ...] = ("connectivity", "structures", "rules", "betti", "betti_2d",
                                           "mesh_structures", "mesh_rules", "reference_exceptions")
#: keys of one ``reference_exceptions`` entry: (required, optional)
REFERENCE_EXCEPTION_KEYS: Tuple[Tuple[str, ...], Tuple[str, ...]] = (("cases",), ("rules", "reason"))
#: rule type -> (required keys, optional keys); ``type`` itself is always required
RULE_KEYS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "exclusion": (("a", "b"), ("name", "mode", "axis", "exempt_end_slices")),
    "inclusion": (("inner", "outer"), ("may_touch", "name", "mode", "axis", "exempt_end_slices")),
}
#: mesh rule type -> (required keys, optional keys); ``type`` itself is always required
MESH_RULE_KEYS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "mesh_exclusion": (("meshes",), ("name",)),
    "mesh_inclusion": (("inner", "outer"), ("name",)),
}
_MODES = ("3d", "2d")
_CONNECTIVITIES = (6, 26)
_IN_PLANE = {6: 4, 26: 8}
_IGNORE_NAME = "ignore"


class TopologySpecError(ValueError):
    """A ``topology`` block (or the ``labels`` it refers to) is invalid; the message says how to fix it."""


@dataclass(frozen=True)
class Structure:
    """A named set of nnU-Net labels.

    Attributes:
        name: the label name, the ``structures``/``betti``/``mesh_structures`` key it was defined under, or for
            an inline region the label names joined by ``"+"`` (``"LV+MYO"``).
        label_names: the label names, in the order written.
        label_ids: the nnU-Net label ids of ``label_names`` (same order).
    """

    name: str
    label_names: Tuple[str, ...]
    label_ids: Tuple[int, ...]


@dataclass(frozen=True)
class ExclusionRule:
    """Structures ``a`` and ``b`` must not touch (no voxel of one is a neighbour of a voxel of the other).

    Attributes:
        name: unique rule name (default ``exclusion(A,B)``, plus `` [2d axis k]`` in 2d mode).
        a, b: the two structures (disjoint label sets).
        mode: ``"3d"`` (volume neighbourhood) or ``"2d"`` (in-plane neighbourhood of each slice along ``axis``).
        axis: slice axis for ``mode="2d"`` (spatial axis index 0..2 of ``(Z, Y, X)`` arrays); unused in 3d.
        exempt_end_slices: ``mode="2d"`` only: the first and the last ``k`` slices along ``axis`` in which ``a`` or
            ``b`` is present (in the label map being checked) are not checked; 0 = every slice is checked. Not
            part of the default name.
    """

    name: str
    a: Structure
    b: Structure
    mode: str = "3d"
    axis: int = 0
    exempt_end_slices: int = 0


@dataclass(frozen=True)
class InclusionRule:
    """Structure ``inner`` lies inside ``outer``: it may only touch voxels of ``outer`` or ``may_touch``.

    Attributes:
        name: unique rule name (default ``inclusion(I in O)`` or ``inclusion(I in O | may_touch M)``, plus
            `` [2d axis k]`` in 2d mode).
        inner: the enclosed structure; its labels are a proper subset of ``outer``'s.
        outer: the enclosing region (it contains the inner labels, e.g. ``LV+MYO`` for ``LV``).
        may_touch: structures the inner one may also touch (openings such as valves), or ``None``; disjoint
            from ``outer``.
        mode: ``"3d"`` or ``"2d"``.
        axis: slice axis for ``mode="2d"`` (0..2); unused in 3d.
        exempt_end_slices: ``mode="2d"`` only: the first and the last ``k`` slices along ``axis`` in which ``inner``
            is present (in the label map being checked) are not checked; 0 = every slice is checked. Not part of
            the default name.
    """

    name: str
    inner: Structure
    outer: Structure
    may_touch: Optional[Structure] = None
    mode: str = "3d"
    axis: int = 0
    exempt_end_slices: int = 0


Rule = Union[ExclusionRule, InclusionRule]


@dataclass(frozen=True)
class MeshExclusionRule:
    """The volumes enclosed by the meshes ``a`` and ``b`` must not overlap; contact is allowed.

    No point may lie inside both closed surfaces (exact winding number > 1/2 for both). This is the anatomical
    constraint between adjacent chambers (the RV cavity touches the myocardium but never enters the LV epicardial
    surface: that would be septal penetration), which no voxel rule can state: on a label map two labels never
    overlap, so a voxel ``exclusion`` means "must not touch" (DESIGN §4).

    Attributes:
        name: unique name (default ``mesh_exclusion(A,B)``; a rule derived from a voxel rule keeps the voxel
            rule's name, :func:`mesh_rules_in_force`).
        a, b: mesh structure names (keys of ``mesh_structures``) whose regions share no label.
    """

    name: str
    a: str
    b: str


@dataclass(frozen=True)
class MeshInclusionRule:
    """The volume enclosed by the mesh ``inner`` lies inside that of ``outer``; contact is allowed.

    No point may lie inside ``inner`` and outside ``outer`` (and outside every mesh of ``may_touch``).

    Attributes:
        name: unique name (default ``mesh_inclusion(I in O)``; a rule derived from a voxel rule keeps its name).
        inner, outer: mesh structure names; the labels of ``inner`` are a subset of those of ``outer``.
        may_touch: meshes the inner one may also enter: only on rules derived from a voxel inclusion whose
            ``may_touch`` structure is a mesh structure (the openings of the voxel rule); ``()`` for the rules
            of ``mesh_rules``.
    """

    name: str
    inner: str
    outer: str
    may_touch: Tuple[str, ...] = ()


MeshRule = Union[MeshExclusionRule, MeshInclusionRule]
StructureRef = Union[str, Sequence[str], Structure]


def in_plane_connectivity(connectivity: int) -> int:
    """In-plane connectivity used by 2d rules for a 3D connectivity: 6 -> 4, 26 -> 8."""
    if connectivity not in _IN_PLANE:
        raise ValueError(f"connectivity must be 6 or 26, got {connectivity!r}")
    return _IN_PLANE[connectivity]


# ---------------------------------------------------------------------------------------------- helpers
def _suggest(name: Any, choices: Iterable[str]) -> str:
    if not isinstance(name, str):
        return ""
    choices = list(choices)
    same_case = [c for c in choices if c.lower() == name.lower()]
    close = same_case or difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def _is_int(x: Any) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _fmt_list(names: Iterable[str]) -> str:
    names = list(names)
    return ", ".join(repr(n) for n in names) if names else "(none)"


def _parse_labels(labels: Any) -> Tuple[Dict[str, int], Dict[str, int]]:
    """Validate nnU-Net ``labels``; return (foreground labels, all labels). Foreground excludes id 0 and 'ignore'."""
    if not isinstance(labels, Mapping) or not labels:
        raise TopologySpecError(
            f"dataset.json 'labels' must be a non-empty dict of label name -> integer id "
            f"(e.g. {{\"background\": 0, \"LV\": 1}}), got {labels!r}")
    all_labels: Dict[str, int] = {}
    seen: Dict[int, str] = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            raise TopologySpecError(
                f"dataset.json label {name!r} is defined as a list of ids {list(value)}: region-based (sigmoid) "
                "label definitions are not supported by the topology tools yet. Use plain integer labels and "
                "express regions in the 'topology' block instead (e.g. \"outer\": [\"LV\", \"MYO\"]).")
        if not _is_int(value) or value < 0:
            raise TopologySpecError(
                f"dataset.json label {name!r} must have a non-negative integer id, got {value!r}")
        value = int(value)
        if value in seen:
            raise TopologySpecError(
                f"dataset.json labels {seen[value]!r} and {name!r} have the same id {value}; ids must be unique")
        seen[value] = name
        all_labels[str(name)] = value
    foreground = {n: i for n, i in all_labels.items() if i != 0 and n != _IGNORE_NAME}
    return foreground, all_labels


class _Resolver:
    """Resolves structure references against the labels and the named structures."""

    def __init__(self, foreground: Dict[str, int], all_labels: Dict[str, int],
                 structures: Optional[Dict[str, Structure]] = None) -> None:
        self.foreground = foreground
        self.all_labels = all_labels
        self.structures = structures if structures is not None else {}

    def _unknown(self, name: Any, where: str, allow_structures: bool) -> TopologySpecError:
        known = f"Known labels: {_fmt_list(self.foreground)}"
        choices = list(self.foreground)
        if allow_structures and self.structures:
            known += f"; structures: {_fmt_list(self.structures)}"
            choices += list(self.structures)
        return TopologySpecError(f"{where}: unknown label {name!r}. {known}.{_suggest(name, choices)}")

    def _label(self, name: Any, where: str, allow_structures: bool) -> int:
        if not isinstance(name, str):
            raise TopologySpecError(f"{where}: expected a label name (string), got {name!r}")
        if name in self.foreground:
            return self.foreground[name]
        if name in self.all_labels:
            if self.all_labels[name] == 0:
                raise TopologySpecError(
                    f"{where}: {name!r} is the background label (id 0); background cannot be part of a structure "
                    "(everything outside all structures is background). Remove it.")
            raise TopologySpecError(
                f"{where}: {name!r} is nnU-Net's ignore label and cannot be part of a structure. Remove it.")
        if name in self.structures:
            s = self.structures[name]
            raise TopologySpecError(
                f"{where}: {name!r} is a structure ({'+'.join(s.label_names)}), not a label; inside a list use "
                f"label names only, e.g. {json.dumps(list(s.label_names))}.")
        raise self._unknown(name, where, allow_structures)

    def resolve(self, ref: Any, where: str, *, allow_structures: bool = True, name: Optional[str] = None
                ) -> Structure:
        """Resolve a label name, a list of label names or (if allowed) a structure name; ``name`` renames it."""
        if isinstance(ref, Structure):
            return ref
        if isinstance(ref, str):
            if allow_structures and ref in self.structures:
                s = self.structures[ref]
                return s if name is None else Structure(name, s.label_names, s.label_ids)
            label_id = self._label(ref, where, allow_structures)
            return Structure(ref if name is None else name, (ref,), (label_id,))
        if isinstance(ref, (list, tuple)):
            if len(ref) == 0:
                raise TopologySpecError(f"{where}: a region must list at least one label name, got []")
            ids: List[int] = []
            for j, item in enumerate(ref):
                label_id = self._label(item, f"{where}[{j}]", allow_structures)
                if label_id in ids:
                    raise TopologySpecError(f"{where}: label {item!r} is listed twice in {list(ref)!r}")
                ids.append(label_id)
            names = tuple(str(x) for x in ref)
            return Structure("+".join(names) if name is None else name, names, tuple(ids))
        raise TopologySpecError(
            f"{where}: expected a label name, a list of label names or a structure name, got {ref!r}")


# ---------------------------------------------------------------------------------------------- the spec
@dataclass(frozen=True)
class ReferenceException:
    """Reference cases whose labels may break some rules (or all): the data-level way to train on a dataset with a
    few imperfect references. Only the check of the rules on the reference labels (the trainers' start,
    ``nnUNetv2_topo_check_rules``) skips them, and logs each; the rules still apply to every prediction and, in
    training, to every patch (a loss cannot know the case a patch came from without nnU-Net's loader changing).

    Attributes:
        cases: case identifiers as nnU-Net names them (the label file name without the file ending).
        rules: names of the voxel rules the cases are excepted from; empty: every rule.
        reason: the user's note, repeated in every log line and report that uses the exception.
    """

    cases: Tuple[str, ...]
    rules: Tuple[str, ...] = ()
    reason: str = ""

    def covers(self, rule_name: str, case: str) -> bool:
        return case in self.cases and (not self.rules or rule_name in self.rules)


@dataclass(frozen=True)
class TopologySpec:
    """The validated ``topology`` block of a dataset.

    Attributes:
        labels: foreground label name -> nnU-Net id (background id 0 and the ``ignore`` label excluded).
        rules: :class:`ExclusionRule` / :class:`InclusionRule` objects, in file order; names are unique.
        betti: structure name -> 3D Betti prior ``(b0, b1, b2)``.
        betti_structures: structure name -> :class:`Structure` for every ``betti`` and ``betti_2d`` key.
        betti_2d: structure name -> the *allowed set* of per-slice Betti vectors along ``betti_2d_axis``: a
            non-empty tuple of distinct ``(b0, b1)`` tuples, in file order (dataset.json ``[1, 1]`` gives
            ``((1, 1),)``; ``[[1, 1], [1, 0]]`` gives ``((1, 1), (1, 0))``). A slice meets the prior when its Betti
            vector is one of them.
        betti_2d_axis: slice axis of ``betti_2d`` (0..2 of ``(Z, Y, X)``).
        mesh_structures: mesh name -> :class:`Structure` (the region whose closed surface is the mesh).
        connectivity: 3D neighbourhood of the rules, 6 or 26; 2d rules use 4 resp. 8 in plane.
        is_default: True when dataset.json had no ``topology`` block (see :func:`default_topology`).
        structures: the named structures of the block's ``structures`` table.
        mesh_rules: the :class:`MeshExclusionRule` / :class:`MeshInclusionRule` objects of ``mesh_rules``, in file
            order (names unique among all rules). The mesh-level checks actually in force add those implied by
            the voxel rules: :func:`mesh_rules_in_force`.
        reference_exceptions: :class:`ReferenceException` entries (``reference_exceptions``), in file order.
    """

    labels: Dict[str, int]
    rules: Tuple[Rule, ...]
    betti: Dict[str, Tuple[int, int, int]]
    betti_structures: Dict[str, Structure]
    betti_2d: Dict[str, Tuple[Tuple[int, int], ...]]
    betti_2d_axis: int
    mesh_structures: Dict[str, Structure]
    connectivity: int = 6
    is_default: bool = False
    structures: Dict[str, Structure] = field(default_factory=dict)
    mesh_rules: Tuple[MeshRule, ...] = ()
    reference_exceptions: Tuple[ReferenceException, ...] = ()

    def reference_exception(self, rule_name: str, case: str) -> Optional[ReferenceException]:
        """The first ``reference_exceptions`` entry that excepts ``case`` from rule ``rule_name``, or None."""
        return next((e for e in self.reference_exceptions if e.covers(rule_name, case)), None)

    def structure(self, ref: StructureRef) -> Structure:
        """Resolve a structure reference.

        Args:
            ref: a foreground label name, a name from ``structures``, a list of label names (a region), or a
                :class:`Structure` (returned unchanged).

        Returns:
            The :class:`Structure`.

        Raises:
            TopologySpecError: unknown name, background/ignore label, or malformed reference.
        """
        all_labels = dict(self.labels)
        return _Resolver(self.labels, all_labels, self.structures).resolve(ref, f"structure {ref!r}")

    @property
    def rule_names(self) -> Tuple[str, ...]:
        """Names of the rules, in file order."""
        return tuple(r.name for r in self.rules)

    @property
    def in_plane_connectivity(self) -> int:
        """Connectivity used by 2d rules (4 for 6, 8 for 26)."""
        return _IN_PLANE[self.connectivity]


#: label/structure names written bare in rule names; any other name is JSON-quoted (``"LV,endo"``) so that rule names
#: stay unambiguous for every label name (commas, brackets, ``+``, ``|``, spaces, quotes)
_BARE_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def _quote(name: str) -> str:
    return name if _BARE_NAME.fullmatch(name) and name != "in" else json.dumps(name, ensure_ascii=False)


def _struct_token(s: Structure) -> str:
    """A structure in a rule name: ``LV``, ``LV+MYO`` (an inline region), ``LV_epi`` (a named structure); names that
    are not plain words are quoted, so ``"A+B"`` (one label named A+B) differs from ``A+B`` (a region)."""
    if s.name == "+".join(s.label_names):  # a single label or an inline region
        return "+".join(_quote(n) for n in s.label_names)
    return _quote(s.name)


def _default_rule_name(rule_type: str, parts: Dict[str, Optional[Structure]], mode: str, axis: int) -> str:
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
    """Read a default rule name back: the inverse of the names :func:`parse_topology` gives rules without ``name``.

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


def _parse_axis(value: Any, where: str) -> int:
    if not _is_int(value) or not 0 <= value <= 2:
        raise TopologySpecError(
            f"{where}: axis must be an integer 0, 1 or 2 (spatial axis of the (Z, Y, X) array; 0 = slice axis of "
            f"short-axis MRI), got {value!r}")
    return int(value)


def _rule_type(raw: Any, where: str, table: Mapping[str, tuple], what: str, example: str,
               hint=lambda rule_type: "") -> str:
    """The ``type`` of one rule entry (voxel rule or mesh rule, ``table``: type -> (required, optional) keys), its
    keys checked; clear errors for a non-dict, a missing or unknown type, unknown and missing keys."""
    if not isinstance(raw, Mapping):
        raise TopologySpecError(f"{where}: each {what} must be a dict such as {example}, got {raw!r}")
    if "type" not in raw:
        raise TopologySpecError(f"{where}: missing required key 'type' (one of {_fmt_list(table)})")
    rule_type = raw["type"]
    if rule_type not in table:
        raise TopologySpecError(f"{where}: unknown {what} type {rule_type!r}; choose one of "
                                f"{_fmt_list(table)}.{hint(rule_type)}{_suggest(rule_type, table)}")
    _check_keys(raw, f"{where} ({rule_type})", *table[rule_type])
    return rule_type


def _check_keys(raw: Mapping, where: str, required: tuple, optional: tuple) -> None:
    """Unknown keys and missing required keys of one rule entry (voxel or mesh rule) are clear errors."""
    allowed = ("type",) + required + optional
    for key in raw:
        if key not in allowed:
            raise TopologySpecError(f"{where}: unknown key {key!r}; allowed keys: {_fmt_list(allowed)}."
                                    f"{_suggest(key, allowed)}")
    for key in required:
        if key not in raw:
            raise TopologySpecError(f"{where}: missing required key {key!r} (required: {_fmt_list(required)})")


def _parse_rule(i: int, raw: Any, resolver: _Resolver) -> Rule:
    where = f"topology.rules[{i}]"
    rule_type = _rule_type(raw, where, RULE_KEYS, "rule", "{\"type\": \"exclusion\", \"a\": \"LV\", \"b\": \"RV\"}")
    where = f"{where} ({rule_type})"

    mode = raw.get("mode", "3d")
    if mode not in _MODES:
        raise TopologySpecError(f"{where}: mode must be \"3d\" or \"2d\" (lower case), got {mode!r}")
    axis = _parse_axis(raw.get("axis", 0), where)

    if rule_type == "exclusion":
        a = resolver.resolve(raw["a"], f"{where}.a")
        b = resolver.resolve(raw["b"], f"{where}.b")
        if set(a.label_ids) == set(b.label_ids):
            raise TopologySpecError(
                f"{where}: names the same structure twice (a={a.name!r}, b={b.name!r}); an exclusion needs two "
                "different structures.")
        shared = [n for n, k in zip(a.label_names, a.label_ids) if k in b.label_ids]
        if shared:
            raise TopologySpecError(
                f"{where}: a={a.name!r} and b={b.name!r} share label(s) {_fmt_list(shared)}; a structure always "
                "touches itself, so every voxel of those labels would violate. Use disjoint structures.")
        parts: Dict[str, Optional[Structure]] = {"a": a, "b": b}
    else:
        inner = resolver.resolve(raw["inner"], f"{where}.inner")
        outer = resolver.resolve(raw["outer"], f"{where}.outer")
        may_raw = raw.get("may_touch")
        may_touch = None if may_raw is None else resolver.resolve(may_raw, f"{where}.may_touch")
        if set(inner.label_ids) == set(outer.label_ids):
            raise TopologySpecError(
                f"{where}: names the same structure twice (inner={inner.name!r}, outer={outer.name!r}); the outer "
                f"structure is the enclosing region including the inner labels, e.g. \"inner\": \"LV\", "
                f"\"outer\": [\"LV\", \"MYO\"].")
        missing = [n for n, k in zip(inner.label_names, inner.label_ids) if k not in outer.label_ids]
        if missing:
            raise TopologySpecError(
                f"{where}: outer={outer.name!r} must contain every label of inner={inner.name!r} (the outer "
                f"structure is the enclosing region, inner labels included); missing {_fmt_list(missing)}. "
                f"Write e.g. \"outer\": {json.dumps(list(outer.label_names) + missing)}.")
        if may_touch is not None:
            with_inner = [n for n, k in zip(may_touch.label_names, may_touch.label_ids) if k in inner.label_ids]
            if with_inner:
                raise TopologySpecError(
                    f"{where}: may_touch={may_touch.name!r} contains label(s) {_fmt_list(with_inner)} of "
                    f"inner={inner.name!r}; may_touch lists the *other* structures the inner one may touch. "
                    "Remove them.")
            with_outer = [n for n, k in zip(may_touch.label_names, may_touch.label_ids) if k in outer.label_ids]
            if with_outer:
                raise TopologySpecError(
                    f"{where}: may_touch={may_touch.name!r} contains label(s) {_fmt_list(with_outer)} of "
                    f"outer={outer.name!r}, which the inner structure may touch anyway (redundant). Remove them.")
        parts = {"inner": inner, "outer": outer, "may_touch": may_touch}

    name = raw.get("name")
    if name is None:
        name = _default_rule_name(rule_type, parts, mode, axis)
    elif not isinstance(name, str) or not name.strip():
        raise TopologySpecError(f"{where}: name must be a non-empty string, got {name!r}")
    exempt = raw.get("exempt_end_slices", 0)
    if "exempt_end_slices" in raw:
        if not _is_int(exempt) or exempt < 0:
            raise TopologySpecError(
                f"{where} rule {name!r}: exempt_end_slices must be a non-negative integer (how many slices at each "
                f"end of the rule's structures along its axis are not checked, e.g. 1), got {exempt!r}")
        if mode != "2d":
            raise TopologySpecError(
                f"{where} rule {name!r}: exempt_end_slices is only for rules with \"mode\": \"2d\" (it exempts end "
                f"slices along the rule's \"axis\"; a 3d rule has no slices). Add \"mode\": \"2d\" and \"axis\", "
                "or remove the key.")
    exempt = int(exempt)
    if rule_type == "exclusion":
        return ExclusionRule(name=name, a=parts["a"], b=parts["b"], mode=mode, axis=axis,
                             exempt_end_slices=exempt)
    return InclusionRule(name=name, inner=parts["inner"], outer=parts["outer"], may_touch=parts["may_touch"],
                         mode=mode, axis=axis, exempt_end_slices=exempt)


def _mesh_name(value: Any, where: str, mesh_structures: Mapping[str, Structure], structures: Mapping[str, Structure],
               foreground: Mapping[str, int]) -> str:
    """A mesh structure name of a mesh rule, or a :class:`TopologySpecError` naming the unknown one."""
    example = '{"type": "mesh_exclusion", "meshes": ["RV", "LV_epi"]}'
    if not mesh_structures:
        raise TopologySpecError(
            f"{where}: mesh rules name mesh structures, but topology.mesh_structures is empty; define the meshes "
            f"first, e.g. \"mesh_structures\": {{\"LV_epi\": [\"LV\", \"MYO\"], \"RV\": [\"RV\"]}}")
    if not isinstance(value, str):
        raise TopologySpecError(f"{where}: expected a mesh structure name (a key of topology.mesh_structures: "
                                f"{_fmt_list(mesh_structures)}), got {value!r}; e.g. {example}")
    if value in mesh_structures:
        return value
    hint = _suggest(value, mesh_structures)
    region = structures.get(value) or (Structure(value, (value,), (foreground[value],)) if value in foreground
                                       else None)
    if region is not None:
        same = [m for m, s in mesh_structures.items() if set(s.label_ids) == set(region.label_ids)]
        what = f"{value!r} is a {'structure' if value in structures else 'label'}, not a mesh structure"
        hint = (f" ({what}; its mesh is {same[0]!r}.)" if same else
                f" ({what}, and no mesh structure has its labels {'+'.join(region.label_names)}.)") + hint
    raise TopologySpecError(f"{where}: unknown mesh structure {value!r}; mesh rules name keys of "
                            f"topology.mesh_structures: {_fmt_list(mesh_structures)}.{hint}")


def _parse_mesh_rule(i: int, raw: Any, mesh_structures: Mapping[str, Structure], structures: Mapping[str, Structure],
                     foreground: Mapping[str, int]) -> MeshRule:
    where = f"topology.mesh_rules[{i}]"
    rule_type = _rule_type(raw, where, MESH_RULE_KEYS, "mesh rule",
                           "{\"type\": \"mesh_exclusion\", \"meshes\": [\"RV\", \"LV_epi\"]}",
                           lambda t: (f" ({t!r} is a voxel rule: put it in topology.rules, or use 'mesh_{t}' here.)"
                                      if t in RULE_KEYS else ""))
    where = f"{where} ({rule_type})"

    def ids(m: str) -> set:
        return set(mesh_structures[m].label_ids)

    if rule_type == "mesh_exclusion":
        pair = raw["meshes"]
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise TopologySpecError(f"{where}.meshes: give exactly two mesh structure names, e.g. "
                                    f"[\"RV\", \"LV_epi\"]; got {pair!r}")
        a, b = (_mesh_name(m, f"{where}.meshes[{j}]", mesh_structures, structures, foreground)
                for j, m in enumerate(pair))
        if a == b:
            raise TopologySpecError(f"{where}: names the same mesh twice ({a!r}); a mesh exclusion needs two "
                                    "different mesh structures.")
        shared = sorted(ids(a) & ids(b))
        if shared:
            names = [n for n, k in zip(mesh_structures[a].label_names, mesh_structures[a].label_ids) if k in shared]
            raise TopologySpecError(
                f"{where}: the regions of {a!r} ({'+'.join(mesh_structures[a].label_names)}) and {b!r} "
                f"({'+'.join(mesh_structures[b].label_names)}) share label(s) {_fmt_list(names)}, so their reference "
                f"volumes overlap and every reference would break the rule. Use meshes of disjoint regions (e.g. RV "
                f"and LV_epi), or \"mesh_inclusion\" when one region contains the other.")
        name = raw.get("name", f"mesh_exclusion({_quote(a)},{_quote(b)})")
        rule: MeshRule = MeshExclusionRule(name=name, a=a, b=b)
    else:
        inner = _mesh_name(raw["inner"], f"{where}.inner", mesh_structures, structures, foreground)
        outer = _mesh_name(raw["outer"], f"{where}.outer", mesh_structures, structures, foreground)
        if inner == outer:
            raise TopologySpecError(f"{where}: names the same mesh twice (inner=outer={inner!r}); the outer mesh "
                                    "encloses the inner one, e.g. \"inner\": \"LV_endo\", \"outer\": \"LV_epi\".")
        missing = [n for n, k in zip(mesh_structures[inner].label_names, mesh_structures[inner].label_ids)
                   if k not in ids(outer)]
        if missing:
            raise TopologySpecError(
                f"{where}: the region of outer={outer!r} ({'+'.join(mesh_structures[outer].label_names)}) must contain "
                f"every label of inner={inner!r} ({'+'.join(mesh_structures[inner].label_names)}), otherwise the "
                f"reference itself breaks the rule; missing {_fmt_list(missing)}.")
        name = raw.get("name", f"mesh_inclusion({_quote(inner)} in {_quote(outer)})")
        rule = MeshInclusionRule(name=name, inner=inner, outer=outer)
    if not isinstance(rule.name, str) or not rule.name.strip():
        raise TopologySpecError(f"{where}: name must be a non-empty string, got {rule.name!r}")
    return rule


def _parse_betti_vector(value: Any, length: int, where: str) -> Tuple[int, ...]:
    example = "[1, 0, 0]" if length == 3 else "[1, 0]"
    meaning = "(b0, b1, b2): components, tunnels/handles, cavities" if length == 3 else "(b0, b1): components, holes"
    if (not isinstance(value, (list, tuple)) or len(value) != length
            or not all(_is_int(v) and v >= 0 for v in value)):
        raise TopologySpecError(
            f"{where}: a Betti vector must be a list of {length} non-negative integers {meaning}, e.g. "
            f"{example}; got {value!r}")
    return tuple(int(v) for v in value)


def _parse_betti_set(value: Any, length: int, where: str) -> Tuple[Tuple[int, ...], ...]:
    """One Betti vector (a 1-element set) or a non-empty list of distinct vectors (an allowed set)."""
    example = "[[1, 1], [1, 0]]"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) for v in value):
        vecs = tuple(_parse_betti_vector(v, length, f"{where}[{i}]") for i, v in enumerate(value))
        dup = sorted({v for v in vecs if vecs.count(v) > 1})
        if dup:
            raise TopologySpecError(
                f"{where}: the allowed set lists {_fmt_list([list(v) for v in dup])} more than once; give each "
                f"Betti vector once, e.g. {example}")
        return vecs
    if isinstance(value, (list, tuple)) and not value:
        raise TopologySpecError(
            f"{where}: an empty set of allowed Betti vectors allows no slice; give one vector [b0, b1] or a "
            f"non-empty list of vectors, e.g. {example}")
    if isinstance(value, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in value):
        raise TopologySpecError(
            f"{where}: mixes numbers and lists; give one vector [b0, b1] or a list of vectors, e.g. {example}; "
            f"got {value!r}")
    try:
        return (_parse_betti_vector(value, length, where),)
    except TopologySpecError as e:
        raise TopologySpecError(f"{e} (or a non-empty list of such vectors, an allowed set, e.g. {example})") from None


def _as_dict(value: Any, where: str, example: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise TopologySpecError(f"{where} must be a dict, e.g. {example}; got {value!r}")
    return value


def parse_topology(dataset_json: Mapping) -> TopologySpec:
    """Parse and validate the ``topology`` block of a dataset.json dict.

    Args:
        dataset_json: the whole dataset.json content (needs ``labels``; ``topology`` is optional).

    Returns:
        The validated :class:`TopologySpec`. Without a ``topology`` key, :func:`default_topology` of the labels
        (which warns).

    Raises:
        TopologySpecError: any invalid key, label, rule or prior; the message names the offender and the fix.
    """
    if not isinstance(dataset_json, Mapping):
        raise TopologySpecError(f"dataset.json content must be a dict, got {type(dataset_json).__name__}")
    if "labels" not in dataset_json:
        raise TopologySpecError("dataset.json has no 'labels' key; the topology block refers to label names")
    if "topology" not in dataset_json:
        return default_topology(dataset_json["labels"])
    foreground, all_labels = _parse_labels(dataset_json["labels"])
    topo = dataset_json["topology"]
    if not isinstance(topo, Mapping):
        raise TopologySpecError(
            f"dataset.json 'topology' must be a dict with keys among {_fmt_list(ALLOWED_TOP_LEVEL_KEYS)}, got "
            f"{type(topo).__name__} {topo!r}")
    for key in topo:
        if key not in ALLOWED_TOP_LEVEL_KEYS:
            raise TopologySpecError(
                f"topology: unknown key {key!r}; allowed keys: {_fmt_list(ALLOWED_TOP_LEVEL_KEYS)}."
                f"{_suggest(key, ALLOWED_TOP_LEVEL_KEYS)}")

    connectivity = topo.get("connectivity", 6)
    if not _is_int(connectivity) or connectivity not in _CONNECTIVITIES:
        raise TopologySpecError(
            f"topology.connectivity must be 6 (face neighbours, default) or 26 (face, edge and corner neighbours), "
            f"got {connectivity!r}")
    connectivity = int(connectivity)

    # named structures (label names only, so definitions never depend on their order)
    resolver = _Resolver(foreground, all_labels)
    structures: Dict[str, Structure] = {}
    raw_structures = _as_dict(topo.get("structures", {}), "topology.structures", '{"LV_epi": ["LV", "MYO"]}')
    for sname, ref in raw_structures.items():
        where = f"topology.structures[{sname!r}]"
        if not isinstance(sname, str) or not sname.strip():
            raise TopologySpecError(f"{where}: structure names must be non-empty strings")
        if sname in all_labels:
            raise TopologySpecError(
                f"{where}: structure name {sname!r} collides with the label {sname!r}; choose another name "
                f"(e.g. {sname + '_region'!r}).")
        structures[sname] = resolver.resolve(ref, where, allow_structures=False, name=sname)
    resolver.structures = structures

    # rules
    raw_rules = topo.get("rules", [])
    if not isinstance(raw_rules, (list, tuple)):
        raise TopologySpecError(f"topology.rules must be a list of rule dicts, got {type(raw_rules).__name__}")
    rules: List[Rule] = []
    first_index: Dict[str, int] = {}
    for i, raw in enumerate(raw_rules):
        rule = _parse_rule(i, raw, resolver)
        if rule.name in first_index:
            raise TopologySpecError(
                f"topology.rules[{i}]: rule name {rule.name!r} is used twice (also topology.rules"
                f"[{first_index[rule.name]}]); remove the duplicate or give one a unique \"name\".")
        first_index[rule.name] = i
        rules.append(rule)

    # Betti priors
    betti: Dict[str, Tuple[int, int, int]] = {}
    betti_structures: Dict[str, Structure] = {}
    raw_betti = _as_dict(topo.get("betti", {}), "topology.betti", '{"LV": [1, 0, 0]}')
    for key, value in raw_betti.items():
        where = f"topology.betti[{key!r}]"
        betti_structures[key] = resolver.resolve(key, where)
        betti[key] = _parse_betti_vector(value, 3, where)  # type: ignore[assignment]
    raw_b2 = _as_dict(topo.get("betti_2d", {}), "topology.betti_2d", '{"axis": 0, "MYO": [1, 1]}')
    betti_2d_axis = _parse_axis(raw_b2.get("axis", 0), "topology.betti_2d")
    betti_2d: Dict[str, Tuple[Tuple[int, int], ...]] = {}
    for key, value in raw_b2.items():
        if key == "axis":
            continue
        where = f"topology.betti_2d[{key!r}]"
        s = resolver.resolve(key, where)
        betti_structures.setdefault(key, s)
        betti_2d[key] = _parse_betti_set(value, 2, where)  # type: ignore[assignment]

    # mesh structures
    mesh_structures: Dict[str, Structure] = {}
    raw_mesh = _as_dict(topo.get("mesh_structures", {}), "topology.mesh_structures",
                        '{"LV_epi": ["LV", "MYO"]}')
    for mname, ref in raw_mesh.items():
        where = f"topology.mesh_structures[{mname!r}]"
        if not isinstance(mname, str) or not mname.strip():
            raise TopologySpecError(f"{where}: mesh structure names must be non-empty strings")
        s = resolver.resolve(ref, where, name=mname)
        same_name = structures.get(mname) or (
            Structure(mname, (mname,), (foreground[mname],)) if mname in foreground else None)
        if same_name is not None and set(same_name.label_ids) != set(s.label_ids):
            raise TopologySpecError(
                f"{where}: the mesh name {mname!r} is also a label/structure ({'+'.join(same_name.label_names)}) "
                f"but the mesh is {'+'.join(s.label_names)}; rename the mesh to avoid the confusion.")
        mesh_structures[mname] = s

    # mesh rules (between mesh structures)
    raw_mesh_rules = topo.get("mesh_rules", [])
    if not isinstance(raw_mesh_rules, (list, tuple)):
        raise TopologySpecError(f"topology.mesh_rules must be a list of mesh rule dicts such as "
                                f"{{\"type\": \"mesh_exclusion\", \"meshes\": [\"RV\", \"LV_epi\"]}}, got "
                                f"{type(raw_mesh_rules).__name__}")
    mesh_rules: List[MeshRule] = []
    for i, raw in enumerate(raw_mesh_rules):
        mrule = _parse_mesh_rule(i, raw, mesh_structures, structures, foreground)
        if mrule.name in first_index:
            raise TopologySpecError(
                f"topology.mesh_rules[{i}]: rule name {mrule.name!r} is already used by topology.rules"
                f"[{first_index[mrule.name]}]; give the mesh rule another \"name\".")
        clash = [j for j, r in enumerate(mesh_rules) if r.name == mrule.name]
        if clash:
            raise TopologySpecError(
                f"topology.mesh_rules[{i}]: rule name {mrule.name!r} is used twice (also topology.mesh_rules"
                f"[{clash[0]}]); remove the duplicate or give one a unique \"name\".")
        mesh_rules.append(mrule)

    exceptions = _parse_reference_exceptions(topo.get("reference_exceptions", []),
                                             tuple(r.name for r in rules))
    return TopologySpec(labels=foreground, rules=tuple(rules), betti=betti, betti_structures=betti_structures,
                        betti_2d=betti_2d, betti_2d_axis=betti_2d_axis, mesh_structures=mesh_structures,
                        connectivity=connectivity, is_default=False, structures=structures,
                        mesh_rules=tuple(mesh_rules), reference_exceptions=exceptions)


_EXCEPTION_EXAMPLE = '[{"cases": ["patient012"], "rules": ["LV_excludes_RV"], "reason": "septum gap in the annotation"}]'


def _parse_reference_exceptions(raw: Any, rule_names: Tuple[str, ...]) -> Tuple[ReferenceException, ...]:
    """``topology.reference_exceptions``: a list of ``{"cases": [...], "rules": [...] (optional: every rule),
    "reason": "..." (optional)}``; rule names must name voxel rules of ``rules``."""
    if not isinstance(raw, (list, tuple)):
        raise TopologySpecError(f"topology.reference_exceptions must be a list such as {_EXCEPTION_EXAMPLE}, got "
                                f"{type(raw).__name__}")
    out: List[ReferenceException] = []
    for i, entry in enumerate(raw):
        where = f"topology.reference_exceptions[{i}]"
        if not isinstance(entry, Mapping):
            raise TopologySpecError(f"{where} must be a dict such as {_EXCEPTION_EXAMPLE[1:-1]}, got {entry!r}")
        required, optional = REFERENCE_EXCEPTION_KEYS
        for key in entry:
            if key not in required + optional:
                raise TopologySpecError(f"{where}: unknown key {key!r}; allowed keys: "
                                        f"{_fmt_list(required + optional)}.{_suggest(key, required + optional)}")
        cases, rules, reason = entry.get("cases"), entry.get("rules", []), entry.get("reason", "")
        if not isinstance(cases, (list, tuple)) or not cases or \
                not all(isinstance(c, str) and c.strip() for c in cases):
            raise TopologySpecError(f"{where}.cases must be a non-empty list of case identifiers (label file names "
                                    f"without the file ending, e.g. [\"patient012\"]), got {cases!r}")
        if not isinstance(rules, (list, tuple)) or not all(isinstance(r, str) for r in rules):
            raise TopologySpecError(f"{where}.rules must be a list of rule names (omit it for every rule), got "
                                    f"{rules!r}")
        for r in rules:
            if r not in rule_names:
                raise TopologySpecError(
                    f"{where}.rules: {r!r} is not a voxel rule of topology.rules (rules: "
                    f"{_fmt_list(rule_names) if rule_names else 'none'}).{_suggest(r, rule_names)}")
        if not isinstance(reason, str):
            raise TopologySpecError(f"{where}.reason must be a string, got {reason!r}")
        out.append(ReferenceException(tuple(cases), tuple(rules), reason))
    return tuple(out)


def load_topology(dataset_json: Union[str, os.PathLike, Mapping]) -> TopologySpec:
    """Load the topology spec from a dataset.json path (or a folder containing one) or an already loaded dict.

    Args:
        dataset_json: path to ``dataset.json``, a dataset folder, or the dict itself.

    Returns:
        The validated :class:`TopologySpec` (see :func:`parse_topology`).
    """
    if isinstance(dataset_json, Mapping):
        return parse_topology(dataset_json)
    path = os.fspath(dataset_json)
    if os.path.isdir(path):
        path = os.path.join(path, "dataset.json")
    with open(path, "r", encoding="utf-8") as f:
        try:
            content = json.load(f)
        except json.JSONDecodeError as e:
            raise TopologySpecError(f"{path} is not valid JSON: {e}") from e
    return parse_topology(content)


def default_topology(labels: Mapping) -> TopologySpec:
    """The spec used when dataset.json has no ``topology`` block; warns that defaults are in use.

    No rules, no 2D priors, no mesh structures; a 3D Betti prior of one component ``(1, 0, 0)`` per foreground
    label; 6-connectivity.

    Args:
        labels: dataset.json ``labels`` (name -> id, background included).

    Returns:
        A :class:`TopologySpec` with ``is_default=True``.
    """
    foreground, _ = _parse_labels(labels)
    warnings.warn(
        "dataset.json has no 'topology' block: using defaults (no topology rules, Betti prior (1, 0, 0) = one "
        "connected component per foreground label, 6-connectivity). See documentation/topology_spec.md to "
        "define rules.", UserWarning, stacklevel=2)
    structures = {n: Structure(n, (n,), (i,)) for n, i in foreground.items()}
    return TopologySpec(labels=foreground, rules=(), betti={n: (1, 0, 0) for n in foreground},
                        betti_structures=structures, betti_2d={}, betti_2d_axis=0, mesh_structures={},
                        connectivity=6, is_default=True, structures={})


def _struct_str(s: Structure) -> str:
    region = "+".join(s.label_names)
    return s.name if region == s.name else f"{s.name}={region}"


def format_betti_set(allowed: Sequence[Sequence[int]]) -> str:
    """A per-slice prior for humans: ``(1, 1)`` for a single vector, ``(1, 1) or (1, 0)`` for an allowed set."""
    return " or ".join(str(tuple(int(b) for b in v)) for v in allowed)


def describe(spec: TopologySpec) -> str:
    """A short multi-line human summary of a spec (for logs).

    Args:
        spec: the spec.

    Returns:
        The summary text (no trailing newline).
    """
    src = "defaults (no 'topology' block in dataset.json)" if spec.is_default else "dataset.json 'topology' block"
    lines = [f"topology: {src}; connectivity {spec.connectivity} (2d rules: {spec.in_plane_connectivity})",
             "  labels: " + ", ".join(f"{n}={i}" for n, i in spec.labels.items())]
    if spec.structures:
        lines.append("  structures: " + ", ".join(_struct_str(s) for s in spec.structures.values()))
    lines.append(f"  rules ({len(spec.rules)}):" + ("" if spec.rules else " none"))
    for r in spec.rules:
        if isinstance(r, ExclusionRule):
            default = _default_rule_name("exclusion", {"a": r.a, "b": r.b}, r.mode, r.axis)
        else:
            default = _default_rule_name("inclusion", {"inner": r.inner, "outer": r.outer, "may_touch": r.may_touch},
                                         r.mode, r.axis)
        line = f"    - {r.name}" if r.name == default else f"    - {r.name} = {default}"
        if r.exempt_end_slices:
            line += f" (end slices exempt: {r.exempt_end_slices} at each end)"
        lines.append(line)
    if spec.betti:
        lines.append("  betti: " + ", ".join(f"{k} {tuple(v)}" for k, v in spec.betti.items()))
    if spec.betti_2d:
        lines.append(f"  betti_2d (axis {spec.betti_2d_axis}): "
                     + ", ".join(f"{k} {format_betti_set(v)}" for k, v in spec.betti_2d.items()))
    if spec.mesh_structures:
        lines.append("  mesh structures: " + ", ".join(
            f"{k}={'+'.join(s.label_names)}" for k, s in spec.mesh_structures.items()))
        in_force, _ = mesh_rules_in_force(spec)
        lines.append(f"  mesh rules ({len(in_force)}, {len(spec.mesh_rules)} from mesh_rules):"
                     + ("" if in_force else " none"))
        for r in in_force:
            what = (f"{r.a} and {r.b} must not overlap" if isinstance(r, MeshExclusionRule) else
                    f"{r.inner} inside {r.outer}" + (f" or {'/'.join(r.may_touch)}" if r.may_touch else ""))
            src = "" if r in spec.mesh_rules else " (from the voxel rule)"
            lines.append(f"    - {r.name}: {what}{src}")
    for e in spec.reference_exceptions:
        lines.append(f"  reference exception: case(s) {', '.join(e.cases)} excepted from the reference check of "
                     + (f"rule(s) {', '.join(e.rules)}" if e.rules else "every rule")
                     + (f" ({e.reason})" if e.reason else ""))
    return "\n".join(lines)


def mesh_for_structure(spec: TopologySpec, structure: Structure) -> Optional[str]:
    """The mesh of ``spec.mesh_structures`` whose label-id set equals ``structure``'s, or ``None``.

    If several meshes have the same label set (not useful, but allowed by the spec), the first one in
    ``mesh_structures`` order is returned.
    """
    ids = set(structure.label_ids)
    for name, s in spec.mesh_structures.items():
        if set(s.label_ids) == ids:
            return name
    return None


def mesh_rule_meshes(rule: MeshRule) -> Tuple[str, ...]:
    """The meshes a mesh rule constrains (TPM Eq. 7: every critical point of the rule is a query point of each):
    ``(a, b)`` of an exclusion, ``(inner, outer)`` of an inclusion (allowed openings ``may_touch`` are not)."""
    if isinstance(rule, MeshExclusionRule):
        return (rule.a, rule.b)
    if isinstance(rule, MeshInclusionRule):
        return (rule.inner, rule.outer)
    raise TypeError(f"rule must be a MeshExclusionRule or MeshInclusionRule, got {type(rule).__name__}")


def _same_check(r1: MeshRule, r2: MeshRule) -> bool:
    """``r1`` states at least what ``r2`` states: the same pair (exclusion) or the same inner and outer meshes
    (inclusion; ``r1`` without openings is then the stricter one)."""
    if isinstance(r1, MeshExclusionRule) and isinstance(r2, MeshExclusionRule):
        return {r1.a, r1.b} == {r2.a, r2.b}
    if isinstance(r1, MeshInclusionRule) and isinstance(r2, MeshInclusionRule):
        return (r1.inner, r1.outer) == (r2.inner, r2.outer) and set(r1.may_touch) <= set(r2.may_touch)
    return False


def mesh_rules_in_force(spec: TopologySpec) -> Tuple[Tuple[MeshRule, ...], Dict[str, str]]:
    """The mesh-level rules that the mesh losses (TPM/MIE critical points from the meshes) and the mesh evaluation
    (mesh TVS) check.

    * Every rule of ``spec.mesh_rules``.
    * Every voxel rule whose structures are both mesh structures (matched by label-id set), read on the meshes
      under the voxel rule's own name: ``exclusion(A, B)`` -> the meshes of A and B must not overlap (not touching
      implies not overlapping); ``inclusion(I in O | may_touch M)`` -> the mesh of I inside that of O, or of M where
      M is a mesh structure. ``mode``, ``axis`` and ``exempt_end_slices`` do not apply to meshes (an overlap of two
      closed surfaces is a volume). This keeps specs written before ``mesh_rules`` existed working as they did.
    * A derived rule that states no more than an earlier rule in force (the same pair, the same inner and outer
      meshes) is left out, so one overlap is counted once.

    Returns:
        ``(rules in force (mesh_rules first, then the derived ones in file order), {voxel rule name: why it is not
        read on the meshes}}``.
    """
    rules: List[MeshRule] = list(spec.mesh_rules)
    not_on_meshes: Dict[str, str] = {}
    for r in spec.rules:
        if isinstance(r, ExclusionRule):
            parts = {"a": r.a, "b": r.b}
        else:
            parts = {"inner": r.inner, "outer": r.outer}
        meshes = {k: mesh_for_structure(spec, s) for k, s in parts.items()}
        lack = [parts[k].name for k, m in meshes.items() if m is None]
        if lack:
            not_on_meshes[r.name] = f"structure(s) {lack} have no mesh structure"
            continue
        if isinstance(r, ExclusionRule):
            derived: MeshRule = MeshExclusionRule(name=r.name, a=meshes["a"], b=meshes["b"])
        else:
            mt = mesh_for_structure(spec, r.may_touch) if r.may_touch is not None else None
            derived = MeshInclusionRule(name=r.name, inner=meshes["inner"], outer=meshes["outer"],
                                        may_touch=(mt,) if mt is not None else ())
        covering = next((x for x in rules if _same_check(x, derived)), None)
        if covering is not None:
            not_on_meshes[r.name] = f"on the meshes, the same check as {covering.name!r}"
            continue
        rules.append(derived)
    return tuple(rules), not_on_meshes


def label_priors(spec: TopologySpec) -> Tuple[Dict[int, Tuple[int, ...]], Dict[int, Tuple[Tuple[int, ...], ...]]]:
    """The Betti priors of single labels, keyed by label id: ``(priors_3d, priors_2d)``.

    ``priors_3d[c]`` is one vector ``(b0, b1, b2)``; ``priors_2d[c]`` the allowed set of per-slice vectors, a tuple
    of ``(b0, b1)`` tuples (as :attr:`TopologySpec.betti_2d`; :class:`nnunet_topo.losses.betti.BettiPriorLoss`
    takes either form). Losses act on one probability channel per label, so priors of regions (several labels)
    are left out here; the evaluator still reports them.
    """
    def single(priors, convert):
        return {int(spec.betti_structures[n].label_ids[0]): convert(v) for n, v in priors.items()
                if len(spec.betti_structures[n].label_ids) == 1}

    def vector(v):
        return tuple(int(b) for b in v)
    return (single(spec.betti, vector),
            single(spec.betti_2d, lambda allowed: tuple(vector(v) for v in allowed)))


def spec_from_dataset_json(dataset_json: Mapping) -> TopologySpec:
    """The dataset's topology spec, or the defaults (:func:`default_topology`) when it has no ``topology`` block."""
    if "topology" in dataset_json:
        return parse_topology(dataset_json)
    return default_topology(dataset_json["labels"])


def spec_in_patch_frame(spec: TopologySpec, transpose_forward: Sequence[int]) -> TopologySpec:
    """The spec with every slice axis (of 2d rules, of 3d rules' ``axis`` attribute, which MIE uses for its
    slice-wise detection, and ``betti_2d_axis``) mapped from the image's array order to the order of nnU-Net's
    preprocessed arrays (the plans' ``transpose_forward``: preprocessed axis ``k`` is image axis
    ``transpose_forward[k]``). Rule names are kept, so logs and evaluation still match the dataset.json rules.

    Every trainer that applies rules to preprocessed patches calls this once; evaluation on images (original
    order) uses the spec as parsed."""
    order = [int(a) for a in transpose_forward]
    if sorted(order) != [0, 1, 2]:
        raise ValueError(f"transpose_forward must be a permutation of (0, 1, 2), got {list(transpose_forward)}")

    def mapped(axis: int) -> int:
        return order.index(int(axis))

    rules = tuple(dataclasses.replace(r, axis=mapped(r.axis)) for r in spec.rules)
    return dataclasses.replace(spec, rules=rules, betti_2d_axis=mapped(spec.betti_2d_axis))


def reference_spec(spec: TopologySpec, ignore_label: Optional[int]) -> TopologySpec:
    """The spec for checking rules on a *sparse* reference (nnU-Net's ``ignore`` label = unknown voxels).

    An ignored voxel is unknown, never a forbidden neighbour: every inclusion rule may touch it (its id joins
    ``may_touch``), so a violation is counted only where both sides of the contact are annotated. Exclusions need
    no change (an ignored voxel belongs to neither structure). Rule names are kept. ``ignore_label=None``: the
    spec itself.
    """
    if ignore_label is None:
        return spec
    ignore = int(ignore_label)

    def widened(r: Rule) -> Rule:
        if not isinstance(r, InclusionRule):
            return r
        m = r.may_touch
        names, ids = (m.label_names, m.label_ids) if m is not None else ((), ())
        return dataclasses.replace(r, may_touch=Structure(m.name if m is not None else _IGNORE_NAME,
                                                          names + (_IGNORE_NAME,), ids + (ignore,)))
    return dataclasses.replace(spec, rules=tuple(widened(r) for r in spec.rules))
