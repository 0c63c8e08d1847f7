"""What a topology spec is: structures (named label sets), voxel rules, mesh rules, Betti priors and reference
exceptions, gathered in one frozen :class:`TopologySpec`; and how a structure reference (a label name, a list of label
names, a name of the ``structures`` table) resolves to a :class:`Structure`.

Voxel rules are about label maps ("must not touch"), mesh rules about the volumes the closed surfaces enclose
(DESIGN §4); the meaning of the rules on voxels is in :mod:`nnunet_topo.violations`. The keys of the ``topology`` block
are documented in ``documentation/topology_spec.md``; :mod:`nnunet_topo.topology_spec.parse` builds the objects here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from nnunet_topo.topology_spec.errors import TopologySpecError, did_you_mean, quoted_list


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
#: in-plane connectivity of the 2d rules for each 3D connectivity
_IN_PLANE = {6: 4, 26: 8}
#: the label name nnU-Net gives its ignore label (unknown voxels of a sparse reference); never part of a structure
IGNORE_LABEL_NAME = "ignore"


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
            rule's name, :func:`~nnunet_topo.topology_spec.mesh_rules.mesh_rules_in_force`).
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


def rule_structures(rule: Rule) -> List[Structure]:
    """The structures whose absence from a label map makes a voxel rule hold vacuously: both sides of an exclusion,
    the inner structure of an inclusion (a missing outer one with a present inner one is an ordinary violation)."""
    return [rule.a, rule.b] if isinstance(rule, ExclusionRule) else [rule.inner]


StructureRef = Union[str, Sequence[str], Structure]


def in_plane_connectivity(connectivity: int) -> int:
    """In-plane connectivity used by 2d rules for a 3D connectivity: 6 -> 4, 26 -> 8."""
    if connectivity not in _IN_PLANE:
        raise ValueError(f"connectivity must be 6 or 26, got {connectivity!r}")
    return _IN_PLANE[connectivity]


class StructureResolver:
    """Resolves structure references against the labels and the named structures."""

    def __init__(self, foreground: Dict[str, int], all_labels: Dict[str, int],
                 structures: Optional[Dict[str, Structure]] = None) -> None:
        self.foreground = foreground
        self.all_labels = all_labels
        self.structures = structures if structures is not None else {}

    def _unknown(self, name: Any, where: str, allow_structures: bool) -> TopologySpecError:
        known = f"Known labels: {quoted_list(self.foreground)}"
        choices = list(self.foreground)
        if allow_structures and self.structures:
            known += f"; structures: {quoted_list(self.structures)}"
            choices += list(self.structures)
        return TopologySpecError(f"{where}: unknown label {name!r}. {known}.{did_you_mean(name, choices)}")

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
        is_default: True when dataset.json had no ``topology`` block (see
            :func:`~nnunet_topo.topology_spec.parse.default_topology`).
        structures: the named structures of the block's ``structures`` table.
        mesh_rules: the :class:`MeshExclusionRule` / :class:`MeshInclusionRule` objects of ``mesh_rules``, in file
            order (names unique among all rules). The mesh-level checks actually in force add those implied by
            the voxel rules: :func:`~nnunet_topo.topology_spec.mesh_rules.mesh_rules_in_force`.
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
        return StructureResolver(self.labels, all_labels, self.structures).resolve(ref, f"structure {ref!r}")

    @property
    def rule_names(self) -> Tuple[str, ...]:
        """Names of the rules, in file order."""
        return tuple(r.name for r in self.rules)

    @property
    def in_plane_connectivity(self) -> int:
        """Connectivity used by 2d rules (4 for 6, 8 for 26)."""
        return _IN_PLANE[self.connectivity]
