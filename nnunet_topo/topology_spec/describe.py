"""A topology spec for humans: the multi-line summary the trainers log (:func:`describe`) and per-slice priors as
text (:func:`format_betti_set`)."""
from __future__ import annotations

from typing import Sequence

from nnunet_topo.topology_spec.mesh_rules import mesh_rules_in_force
from nnunet_topo.topology_spec.model import ExclusionRule, MeshExclusionRule, Structure, TopologySpec
from nnunet_topo.topology_spec.rule_names import default_rule_name


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
            default = default_rule_name("exclusion", {"a": r.a, "b": r.b}, r.mode, r.axis)
        else:
            default = default_rule_name("inclusion", {"inner": r.inner, "outer": r.outer, "may_touch": r.may_touch},
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
