"""GCN mesh head (plain torch; DESIGN §7, documentation/mesh_head.md).

All mesh tensors live in the normalised patch frame of ``grid_sample(..., align_corners=True)``:
coordinates in ``[-1, 1]``, last dimension ``(x, y, z)`` with ``x`` the last array axis of a
``(B, C, Z, Y, X)`` volume; faces wound outward (positive signed volume).
"""
from .graph import (
    ChebConv,
    GraphConv,
    edge_length_loss,
    edge_lengths,
    laplacian_smoothing_loss,
    mesh_edges,
    normalized_adjacency,
    scaled_laplacian,
)
from .head import MeshHead, axis_angle_to_matrix, sample_features
from .network import MeshAugmentedNetwork, decoder_stage_channels
from .templates import Template, signed_volume, sphere_template, template_from_masks, torus_template

__all__ = [
    "ChebConv",
    "GraphConv",
    "MeshAugmentedNetwork",
    "MeshHead",
    "Template",
    "axis_angle_to_matrix",
    "decoder_stage_channels",
    "edge_length_loss",
    "edge_lengths",
    "laplacian_smoothing_loss",
    "mesh_edges",
    "normalized_adjacency",
    "sample_features",
    "scaled_laplacian",
    "signed_volume",
    "sphere_template",
    "template_from_masks",
    "torus_template",
]
