"""The topology spec: the ``topology`` block of an nnU-Net ``dataset.json``, parsed and validated. The user
documentation of every key is ``documentation/topology_spec.md``; this package implements it.

Structures are named by nnU-Net *label names*; a structure may be a single label, a *region* (a list of
label names, e.g. the LV epicardium encloses ``["LV", "MYO"]``) or a name defined in the block's own
``structures`` table. Rules say which structures must not touch (``exclusion``) and which must lie inside
another (``inclusion``); ``betti``/``betti_2d`` give topological priors; ``mesh_structures`` names the closed
surfaces a mesh head predicts, and ``mesh_rules`` says which of those surfaces must not overlap
(``mesh_exclusion``, contact allowed) and which lies inside another (``mesh_inclusion``). Voxel rules are about
label maps ("must not touch"), mesh rules about the volumes the closed surfaces enclose (DESIGN §4). The meaning of
the rules on voxels is in :mod:`nnunet_topo.violations` (DESIGN §4).

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
rule or label and says how to fix it. This package does not import nnU-Net.

Modules, one concept each:

* :mod:`~nnunet_topo.topology_spec.model`: what a spec is (:class:`Structure`, the voxel and mesh rules,
  :class:`ReferenceException`, :class:`TopologySpec`) and how a structure reference resolves;
* :mod:`~nnunet_topo.topology_spec.parse`: dataset.json -> :class:`TopologySpec` (:func:`parse_topology`,
  :func:`load_topology`, :func:`default_topology`, :func:`spec_from_dataset_json`);
* :mod:`~nnunet_topo.topology_spec.rule_names`: the default rule names and :func:`parse_rule_name`;
* :mod:`~nnunet_topo.topology_spec.mesh_rules`: the mesh-level rules in force (:func:`mesh_rules_in_force`);
* :mod:`~nnunet_topo.topology_spec.derived`: the spec in the patch frame, for a sparse reference, single-label priors;
* :mod:`~nnunet_topo.topology_spec.describe`: a summary for logs;
* :mod:`~nnunet_topo.topology_spec.errors`: :class:`TopologySpecError` and its message helpers.
"""
from nnunet_topo.topology_spec.derived import label_priors, reference_spec, spec_in_patch_frame
from nnunet_topo.topology_spec.describe import describe, format_betti_set
from nnunet_topo.topology_spec.errors import TopologySpecError
from nnunet_topo.topology_spec.mesh_rules import mesh_for_structure, mesh_rule_meshes, mesh_rules_in_force
from nnunet_topo.topology_spec.model import (ALLOWED_TOP_LEVEL_KEYS, MESH_RULE_KEYS, REFERENCE_EXCEPTION_KEYS,
                                             RULE_KEYS, ExclusionRule, InclusionRule, MeshExclusionRule,
                                             MeshInclusionRule, MeshRule, ReferenceException, Rule, Structure,
                                             StructureRef, TopologySpec, in_plane_connectivity, rule_structures)
from nnunet_topo.topology_spec.parse import default_topology, load_topology, parse_topology, spec_from_dataset_json
from nnunet_topo.topology_spec.rule_names import parse_rule_name

__all__ = [
    "ALLOWED_TOP_LEVEL_KEYS",
    "ExclusionRule",
    "InclusionRule",
    "MESH_RULE_KEYS",
    "MeshExclusionRule",
    "MeshInclusionRule",
    "MeshRule",
    "REFERENCE_EXCEPTION_KEYS",
    "RULE_KEYS",
    "ReferenceException",
    "Rule",
    "Structure",
    "StructureRef",
    "TopologySpec",
    "TopologySpecError",
    "default_topology",
    "describe",
    "format_betti_set",
    "in_plane_connectivity",
    "label_priors",
    "load_topology",
    "mesh_for_structure",
    "mesh_rule_meshes",
    "mesh_rules_in_force",
    "parse_rule_name",
    "parse_topology",
    "reference_spec",
    "rule_structures",
    "spec_from_dataset_json",
    "spec_in_patch_frame",
]
