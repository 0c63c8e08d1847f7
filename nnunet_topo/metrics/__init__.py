"""Topology and geometry metrics on numpy masks (no nnU-Net import here).

See ``documentation/metrics.md`` for the precise definitions, connectivities and empty-input
conventions.
"""

from nnunet_topo.metrics.geometry import (
    chamfer_distance,
    dice,
    hausdorff_distance_95,
    surface_distances,
)
from nnunet_topo.metrics.topology import (
    betti_error,
    betti_error_2d,
    betti_numbers_2d,
    betti_numbers_3d,
    betti_numbers_per_slice,
    components_per_slice,
    connected_component_error_2d,
    connected_component_error_3d,
    count_components_3d,
    slice_violation_rate,
    topology_violation_score,
    violation_rates,
)

__all__ = [
    "betti_error",
    "betti_error_2d",
    "betti_numbers_2d",
    "betti_numbers_3d",
    "betti_numbers_per_slice",
    "chamfer_distance",
    "components_per_slice",
    "connected_component_error_2d",
    "connected_component_error_3d",
    "count_components_3d",
    "dice",
    "hausdorff_distance_95",
    "slice_violation_rate",
    "surface_distances",
    "topology_violation_score",
    "violation_rates",
]
