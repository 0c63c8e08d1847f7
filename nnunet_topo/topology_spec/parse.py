"""Reading the ``topology`` block of a dataset.json into a :class:`~nnunet_topo.topology_spec.model.TopologySpec`
(:func:`parse_topology`, :func:`load_topology`), or the defaults when there is none (:func:`default_topology`).

Every problem raises :class:`~nnunet_topo.topology_spec.errors.TopologySpecError` whose message names the offending
key, rule or label and says how to fix it; ``documentation/topology_spec.md`` documents every key.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from nnunet_topo.topology_spec.errors import TopologySpecError, did_you_mean, is_int, quoted_list
from nnunet_topo.topology_spec.model import (ALLOWED_TOP_LEVEL_KEYS, IGNORE_LABEL_NAME, MESH_RULE_KEYS,
                                             REFERENCE_EXCEPTION_KEYS, RULE_KEYS, ExclusionRule, InclusionRule,
                                             MeshExclusionRule, MeshInclusionRule, MeshRule, ReferenceException, Rule,
                                             Structure, StructureResolver, TopologySpec)
from nnunet_topo.topology_spec.rule_names import default_rule_name, quote_name


_MODES = ("3d", "2d")
_CONNECTIVITIES = (6, 26)


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
        if not is_int(value) or value < 0:
            raise TopologySpecError(
                f"dataset.json label {name!r} must have a non-negative integer id, got {value!r}")
        value = int(value)
        if value in seen:
            raise TopologySpecError(
                f"dataset.json labels {seen[value]!r} and {name!r} have the same id {value}; ids must be unique")
        seen[value] = name
        all_labels[str(name)] = value
    foreground = {n: i for n, i in all_labels.items() if i != 0 and n != IGNORE_LABEL_NAME}
    return foreground, all_labels


def _parse_axis(value: Any, where: str) -> int:
    if not is_int(value) or not 0 <= value <= 2:
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
        raise TopologySpecError(f"{where}: missing required key 'type' (one of {quoted_list(table)})")
    rule_type = raw["type"]
    if rule_type not in table:
        raise TopologySpecError(f"{where}: unknown {what} type {rule_type!r}; choose one of "
                                f"{quoted_list(table)}.{hint(rule_type)}{did_you_mean(rule_type, table)}")
    _check_keys(raw, f"{where} ({rule_type})", *table[rule_type])
    return rule_type


def _check_keys(raw: Mapping, where: str, required: tuple, optional: tuple) -> None:
    """Unknown keys and missing required keys of one rule entry (voxel or mesh rule) are clear errors."""
    allowed = ("type",) + required + optional
    for key in raw:
        if key not in allowed:
            raise TopologySpecError(f"{where}: unknown key {key!r}; allowed keys: {quoted_list(allowed)}."
                                    f"{did_you_mean(key, allowed)}")
    for key in required:
        if key not in raw:
            raise TopologySpecError(f"{where}: missing required key {key!r} (required: {quoted_list(required)})")


def _parse_rule(i: int, raw: Any, resolver: StructureResolver) -> Rule:
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
                f"{where}: a={a.name!r} and b={b.name!r} share label(s) {quoted_list(shared)}; a structure always "
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
                f"structure is the enclosing region, inner labels included); missing {quoted_list(missing)}. "
                f"Write e.g. \"outer\": {json.dumps(list(outer.label_names) + missing)}.")
        if may_touch is not None:
            with_inner = [n for n, k in zip(may_touch.label_names, may_touch.label_ids) if k in inner.label_ids]
            if with_inner:
                raise TopologySpecError(
                    f"{where}: may_touch={may_touch.name!r} contains label(s) {quoted_list(with_inner)} of "
                    f"inner={inner.name!r}; may_touch lists the *other* structures the inner one may touch. "
                    "Remove them.")
            with_outer = [n for n, k in zip(may_touch.label_names, may_touch.label_ids) if k in outer.label_ids]
            if with_outer:
                raise TopologySpecError(
                    f"{where}: may_touch={may_touch.name!r} contains label(s) {quoted_list(with_outer)} of "
                    f"outer={outer.name!r}, which the inner structure may touch anyway (redundant). Remove them.")
        parts = {"inner": inner, "outer": outer, "may_touch": may_touch}

    name = raw.get("name")
    if name is None:
        name = default_rule_name(rule_type, parts, mode, axis)
    elif not isinstance(name, str) or not name.strip():
        raise TopologySpecError(f"{where}: name must be a non-empty string, got {name!r}")
    exempt = raw.get("exempt_end_slices", 0)
    if "exempt_end_slices" in raw:
        if not is_int(exempt) or exempt < 0:
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
                                f"{quoted_list(mesh_structures)}), got {value!r}; e.g. {example}")
    if value in mesh_structures:
        return value
    hint = did_you_mean(value, mesh_structures)
    region = structures.get(value) or (Structure(value, (value,), (foreground[value],)) if value in foreground
                                       else None)
    if region is not None:
        same = [m for m, s in mesh_structures.items() if set(s.label_ids) == set(region.label_ids)]
        what = f"{value!r} is a {'structure' if value in structures else 'label'}, not a mesh structure"
        hint = (f" ({what}; its mesh is {same[0]!r}.)" if same else
                f" ({what}, and no mesh structure has its labels {'+'.join(region.label_names)}.)") + hint
    raise TopologySpecError(f"{where}: unknown mesh structure {value!r}; mesh rules name keys of "
                            f"topology.mesh_structures: {quoted_list(mesh_structures)}.{hint}")


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
                f"({'+'.join(mesh_structures[b].label_names)}) share label(s) {quoted_list(names)}, so their reference "
                f"volumes overlap and every reference would break the rule. Use meshes of disjoint regions (e.g. RV "
                f"and LV_epi), or \"mesh_inclusion\" when one region contains the other.")
        name = raw.get("name", f"mesh_exclusion({quote_name(a)},{quote_name(b)})")
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
                f"reference itself breaks the rule; missing {quoted_list(missing)}.")
        name = raw.get("name", f"mesh_inclusion({quote_name(inner)} in {quote_name(outer)})")
        rule = MeshInclusionRule(name=name, inner=inner, outer=outer)
    if not isinstance(rule.name, str) or not rule.name.strip():
        raise TopologySpecError(f"{where}: name must be a non-empty string, got {rule.name!r}")
    return rule


def _parse_betti_vector(value: Any, length: int, where: str) -> Tuple[int, ...]:
    example = "[1, 0, 0]" if length == 3 else "[1, 0]"
    meaning = "(b0, b1, b2): components, tunnels/handles, cavities" if length == 3 else "(b0, b1): components, holes"
    if (not isinstance(value, (list, tuple)) or len(value) != length
            or not all(is_int(v) and v >= 0 for v in value)):
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
                f"{where}: the allowed set lists {quoted_list([list(v) for v in dup])} more than once; give each "
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
            f"dataset.json 'topology' must be a dict with keys among {quoted_list(ALLOWED_TOP_LEVEL_KEYS)}, got "
            f"{type(topo).__name__} {topo!r}")
    for key in topo:
        if key not in ALLOWED_TOP_LEVEL_KEYS:
            raise TopologySpecError(
                f"topology: unknown key {key!r}; allowed keys: {quoted_list(ALLOWED_TOP_LEVEL_KEYS)}."
                f"{did_you_mean(key, ALLOWED_TOP_LEVEL_KEYS)}")

    connectivity = topo.get("connectivity", 6)
    if not is_int(connectivity) or connectivity not in _CONNECTIVITIES:
        raise TopologySpecError(
            f"topology.connectivity must be 6 (face neighbours, default) or 26 (face, edge and corner neighbours), "
            f"got {connectivity!r}")
    connectivity = int(connectivity)

    # named structures (label names only, so definitions never depend on their order)
    resolver = StructureResolver(foreground, all_labels)
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
                                        f"{quoted_list(required + optional)}.{did_you_mean(key, required + optional)}")
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
                    f"{quoted_list(rule_names) if rule_names else 'none'}).{did_you_mean(r, rule_names)}")
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


def spec_from_dataset_json(dataset_json: Mapping) -> TopologySpec:
    """The dataset's topology spec, or the defaults (:func:`default_topology`) when it has no ``topology`` block."""
    if "topology" in dataset_json:
        return parse_topology(dataset_json)
    return default_topology(dataset_json["labels"])
