"""GCN mesh head (plain torch; DESIGN §7, documentation/mesh_head.md).

All mesh tensors live in the normalised patch frame of ``grid_sample(..., align_corners=True)``:
coordinates in ``[-1, 1]``, last dimension ``(x, y, z)`` with ``x`` the last array axis of a
``(B, C, Z, Y, X)`` volume; faces wound outward (positive signed volume).
"""
from nnunet_topo.mesh_head.graph import ChebConv, GraphConv, mesh_edges, normalized_adjacency, scaled_laplacian
from nnunet_topo.mesh_head.head import MeshHead, axis_angle_to_matrix, sample_features
from nnunet_topo.mesh_head.network import MeshAugmentedNetwork, decoder_stage_channels
from nnunet_topo.mesh_head.templates import Template, sphere_template, template_from_masks, torus_template

__all__ = [
    "ChebConv",
    "GraphConv",
    "MeshAugmentedNetwork",
    "MeshHead",
    "Template",
    "axis_angle_to_matrix",
    "decoder_stage_channels",
    "mesh_edges",
    "normalized_adjacency",
    "sample_features",
    "scaled_laplacian",
    "sphere_template",
    "template_from_masks",
    "torus_template",
]
