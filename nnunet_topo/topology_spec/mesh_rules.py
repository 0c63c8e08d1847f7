"""The mesh-level rules in force (:func:`mesh_rules_in_force`): the spec's ``mesh_rules`` plus every voxel rule whose
structures are both mesh structures, read on the meshes. The mesh losses (TPM/MIE critical points from the meshes),
the mesh evaluation (mesh TVS), the repair and the report all check exactly these."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from nnunet_topo.topology_spec.model import (ExclusionRule, MeshExclusionRule, MeshInclusionRule, MeshRule, Structure,
                                             TopologySpec)


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
