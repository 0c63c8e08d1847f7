"""The GCN mesh head (DESIGN §7 "Head"): global alignment, then residual graph-convolution blocks.

For each mesh structure ``s`` with template vertices ``T_s (V_s, 3)`` (normalised patch frame,
``(x, y, z)``, see ``templates.py``):

0. **Segmentation-guided placement** (optional, ``structure_channels`` given; placement version 2,
   :attr:`MeshHead.PLACEMENT_VERSION`): the template is placed where the network *decided* the structure is
   (DESIGN §7 "Placement"): the hard mask ``argmax_c(logits) in structure_channels[s]``, only its largest
   26-connected component (:func:`largest_component`), whose solid (each voxel a box) has volume ``V``, centroid
   ``c`` and per-axis standard deviation ``std`` (:func:`mask_solid_moments`, normalised frame). With ``V_T, c_T,
   std_T`` the same of the template's enclosed solid::

       g = clip((V / V_T)^(1/3), *PLACEMENT_SCALE_RANGE)                 # overall size, from the volume
       r = std / std_T,  r <- r / geomean(r)                               # shape: per-axis ratios, product 1
       r <- clip(r, *PLACEMENT_AXIS_RATIO_RANGE),  r <- r / geomean(r)
       B = c + diag(g r) (T - c_T)

   so the placed template encloses exactly ``V`` (unless ``g`` is clipped). A structure that is not in the
   arg-max, or whose largest component has fewer than ``min_alignment_voxels`` voxels, keeps the template's own
   pose (``B = T``). No gradient (the mesh losses cannot move the segmentation through it).
   Frame: the normalised patch frame is the mm frame scaled per axis (anisotropic patches included); a volume
   ratio and per-axis std ratios are the same in both frames, so the placement is that of the mm frame.
   Why hard and not soft (version 1, in nnunet-topo 0.1.0 before issue 21, matched the softmax map's moments):
   moments weight stray probability by its squared distance; 4.5e-5 of it inflated placements x1.3-2.7, 2.5e-3 up to x8 (ACDC crops,
   issue 21). Why at all: a head that starts from a fixed template must otherwise learn position and size from
   globally pooled features, which it did not do in our short runs (documentation/results.md).
1. **Global alignment** (in the spirit of the MIE paper's alignment step): an MLP on the globally
   average-pooled bottleneck features predicts per structure a log-scale ``sigma (3)``, an
   axis-angle rotation ``omega (3)`` and a translation ``t (3)``. With ``M = R(omega) diag(exp(sigma))``
   (Rodrigues' formula) and ``c`` the vertex centroid of ``B``::

       v = B + (M - I) (B - c) + t

   i.e. a residual scale and rotation about the centroid. The MLP's last layer is zero-initialised,
   so at initialisation ``M - I`` and ``t`` are exactly 0 and the head outputs ``B`` (without
   segmentation-guided placement: the templates bit-for-bit, ``T + 0 + 0``).
2. **Deformation**: ``num_blocks`` blocks, each sampling the decoder feature maps at the current
   vertices with ``grid_sample(..., align_corners=True, padding_mode="border")`` (multi-scale: all
   given decoder stages, concatenated) plus the vertex coordinates, then
   ``GraphConv -> LeakyReLU -> [residual GraphConv -> LeakyReLU] * num_residual -> GraphConv(3)``
   predicting offsets added to the vertices. The offset layer is zero-initialised, so offsets
   start at 0. Each structure has its own alignment outputs and its own GCN blocks (structures
   have different graphs and shapes).

Templates are persistent buffers (``template_vertices_<s>``, ``template_faces_<s>``) and names, genera and the
placement version are the module's extra state, so a state dict carries the complete head; the graph
operators are derived from the faces (non-persistent) and rebuilt on load. A head that places refuses a state of
another placement version (a state without one is version 1), since it would give other meshes.
"""
from __future__ import annotations

from typing import Any, Sequence

import cc3d
import numpy as np
import torch
import trimesh
import torch.nn.functional as F
from torch import nn

from nnunet_topo.mesh_head.graph import GraphConv, normalized_adjacency
from nnunet_topo.mesh_head.templates import Template

__all__ = [
    "MeshHead",
    "axis_angle_to_matrix",
    "largest_component",
    "mask_solid_moments",
    "sample_features",
    "solid_moments",
]

#: clip of the overall (isotropic) scale ``g`` of the placement: a placed template encloses between 1/64 and 64
#: times its own volume
PLACEMENT_SCALE_RANGE: tuple[float, float] = (0.25, 4.0)
#: clip of the per-axis shape ratios ``r`` of the placement (product 1), relative to the template's proportions
PLACEMENT_AXIS_RATIO_RANGE: tuple[float, float] = (0.5, 2.0)


def solid_moments(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid ``(3,)`` and per-axis standard deviation ``(3,)`` of the solid enclosed by a closed mesh.

    From trimesh's mass properties (unit density): the covariance ``C = integral (x - c)(x - c)^T dV`` is
    ``tr(I)/2 * Id - I`` for the inertia tensor ``I`` about the centre of mass; ``std_i = sqrt(C_ii / volume)``.
    """
    return _solid_properties(vertices, faces)[1:]


def _solid_properties(vertices: np.ndarray, faces: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """``(volume, centroid (3,), per-axis std (3,))`` of the solid enclosed by a closed, outward-wound mesh."""
    mesh = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64), process=False)
    volume = float(mesh.volume)
    if not volume > 0:
        raise ValueError(f"solid_moments needs a closed, outward-wound mesh with positive volume, got {volume}.")
    inertia = np.asarray(mesh.moment_inertia, dtype=np.float64)
    cov = np.trace(inertia) / 2.0 * np.eye(3) - inertia
    return volume, np.asarray(mesh.center_mass, dtype=np.float64), np.sqrt(np.clip(np.diag(cov) / volume, 1e-12, None))


def mask_solid_moments(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Volume ``(N,)``, centroid ``(N, 3)`` and per-axis std ``(N, 3)`` of binary masks ``(N, Z, Y, X)``.

    In the normalised ``(x, y, z)`` frame of ``grid_sample(align_corners=True)``: voxel ``i`` of an axis of size
    ``n`` is the interval of width ``w = 2 / (n - 1)`` centred at ``2 i / (n - 1) - 1`` (an axis of size 1: centre
    0, width 2), so the solid made of the mask's voxels has volume ``count * w_x w_y w_z`` and per-axis variance
    ``var(voxel centres) + w^2 / 12`` (the boxes' own spread). These are the quantities :func:`solid_moments` gives
    for a mesh, so the two compare. Separable sums, ``O(N Z Y X)``, on the mask's device; an empty mask gives
    volume 0 and centroid/std 0.
    """
    if mask.ndim != 4:
        raise ValueError(f"mask must be (N, Z, Y, X), got {tuple(mask.shape)}.")
    m = mask.float()
    count = m.sum(dim=(1, 2, 3))
    safe = count.clamp_min(1.0)
    volume = count
    cents, stds = [], []
    for axis in (3, 2, 1):  # x, y, z
        n = m.shape[axis]
        width = 2.0 / (n - 1) if n > 1 else 2.0
        coord = torch.linspace(-1.0, 1.0, n, device=m.device) if n > 1 else torch.zeros(1, device=m.device)
        marginal = m.sum(dim=tuple(a for a in (1, 2, 3) if a != axis))  # (N, n)
        c = (marginal * coord).sum(-1) / safe
        var = (marginal * (coord[None] - c[:, None]) ** 2).sum(-1) / safe + width**2 / 12.0
        cents.append(c)
        stds.append(torch.where(count > 0, var.clamp_min(0).sqrt(), torch.zeros_like(var)))
        volume = volume * width
    return volume, torch.stack(cents, -1), torch.stack(stds, -1)


def largest_component(mask: torch.Tensor) -> torch.Tensor:
    """The largest 26-connected component of each binary mask ``(N, Z, Y, X)`` (bool, same device); empty stays empty.

    26-connectivity (faces, edges and corners), as the topology metrics count foreground components: on
    anisotropic short-axis data a thin, slanted structure (the RV's free wall, the apex) often touches its next
    slice only along an edge or a corner, and 6-connectivity would cut it there and keep only a part of it. A
    false-positive blob that touches the structure at a corner is merged instead, which moves the volume by the
    blob's few voxels.

    Two implementations, one result (tested against each other and against ``scipy.ndimage.label``; between
    components of equal size they may keep different ones):

    * CPU tensors: connected-components-3d (``cc3d.largest_k``), one call per item, on the tensor's own memory
      (no copy, no sync).
    * other devices (CUDA): :func:`_largest_component_propagation`, torch ops on the device: label propagation
      (3x3x3 max-pooling of voxel indices within the mask) with pointer jumping, convergence checked every 4
      iterations, each check one host sync (``torch.equal``; it waits for the queued work only the first time).
      Cardiac-like masks converge in 6-15 iterations (a ball of 350k voxels 6, a crescent RV 14, a ring 15,
      nested ellipsoids with 3x3x3 false-positive blobs <= 12), i.e. 2-5 syncs; nothing else leaves the device.
      The alternative, one device->host copy of the masks and cc3d, has one sync but then costs cc3d's CPU time
      (below) in every step.

    Measured on the 2-core CPU of the development machine (shared with a training run, 1 torch thread, torch
    2.14; logits ``(B, 4, Z, Y, X)`` of such hearts, 3 mesh structures, i.e. 6 masks; median of 5):

    ======================  =======  ==================  ==========================  ===========================
    logits                  cc3d     torch propagation   whole placement (cc3d)      soft-moment placement (v1)
    ======================  =======  ==================  ==========================  ===========================
    (2, 4, 20, 56, 64)      4 ms     320 ms (12 it.)     7 ms                        3 ms
    (2, 4, 40, 160, 160)    61 ms    5200 ms (12 it.)    84 ms                       30 ms
    ======================  =======  ==================  ==========================  ===========================

    So the CPU uses cc3d (the propagation's 27-voxel max-pool is 50-80x slower there). On a GPU the propagation's
    6-16 passes over ``6 Z Y X`` floats should take a few milliseconds at most, against cc3d's 4-61 ms of host
    time after the copy; not measured on a GPU (no device was lent to the session that wrote this).
    """
    if mask.ndim != 4:
        raise ValueError(f"mask must be (N, Z, Y, X), got {tuple(mask.shape)}.")
    mask = mask.detach().bool()
    if mask.device.type == "cpu":
        return _largest_component_cc3d(mask)
    return _largest_component_propagation(mask)


def _largest_component_cc3d(mask: torch.Tensor) -> torch.Tensor:
    """:func:`largest_component` by cc3d, item by item (host memory; a device tensor is copied once each way)."""
    m = mask.to("cpu").contiguous().numpy().view(np.uint8)
    out = np.zeros(m.shape, dtype=bool)
    for i in range(m.shape[0]):
        if m[i].any():
            out[i] = cc3d.largest_k(m[i], k=1, connectivity=26, binary_image=True) > 0
    return torch.from_numpy(out).to(mask.device)


def _largest_component_propagation(mask: torch.Tensor, check_every: int = 4) -> torch.Tensor:
    """:func:`largest_component` by label propagation with torch ops on the mask's device.

    Every voxel of the mask starts with its own (1-based) flat index as label; one iteration takes the maximum
    label over the 3x3x3 neighbourhood within the mask (26-connectivity) and then jumps pointers (each voxel takes
    the label of the voxel its label names, which lies in the same component and has a label at least as large).
    Labels only grow and stay indices of voxels of the same component, so they converge to the component's largest
    index. Convergence is checked every ``check_every`` iterations (one host sync each). Sizes by ``scatter_add``,
    the largest per item by ``argmax`` (ties: the component with the smaller label), all on the device.
    Labels are float32 (exact below 2^24 voxels per item), else float64.
    """
    n = mask.shape[0]
    spatial = tuple(mask.shape[1:])
    numel = int(np.prod(spatial))
    dtype = torch.float32 if numel < 2**24 else torch.float64
    m = mask[:, None]  # (N, 1, Z, Y, X)
    index = torch.arange(1, numel + 1, device=mask.device, dtype=dtype).reshape(1, 1, *spatial)
    zero = torch.zeros((), device=mask.device, dtype=dtype)
    labels = torch.where(m, index, zero)
    while True:
        previous = labels
        for _ in range(check_every):
            labels = torch.where(m, F.max_pool3d(labels, kernel_size=3, stride=1, padding=1), zero)
            flat = labels.reshape(n, numel)
            pointer = (flat.long() - 1).clamp_min(0)
            labels = torch.where(m, flat.gather(1, pointer).reshape(labels.shape), zero)
        if torch.equal(labels, previous):
            break
    flat = labels.reshape(n, numel).long()
    sizes = torch.zeros(n, numel + 1, dtype=torch.long, device=mask.device)
    sizes.scatter_add_(1, flat, torch.ones_like(flat))
    sizes[:, 0] = 0  # background
    best = sizes.argmax(1)  # 0 for an empty mask: nothing is kept
    return ((flat == best[:, None]) & (best[:, None] > 0)).reshape(mask.shape)


def axis_angle_to_matrix(omega: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula: axis-angle ``(..., 3)`` -> rotation matrices ``(..., 3, 3)``.

    ``R = I + a K + b K^2`` with ``K`` the cross-product matrix of ``omega``,
    ``a = sin(theta)/theta``, ``b = (1 - cos(theta))/theta^2``, Taylor-expanded near 0 (finite
    gradients at ``omega = 0``, where ``R`` is exactly the identity).
    """
    theta2 = (omega**2).sum(-1, keepdim=True)[..., None]  # (..., 1, 1)
    theta = torch.sqrt(theta2 + 1e-12)
    small = theta2 < 1e-4
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / (theta2 + 1e-12))
    x, y, z = omega.unbind(-1)
    zero = torch.zeros_like(x)
    K = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(*omega.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand_as(K)
    return eye + a * K + b * (K @ K)


def sample_features(feature_maps: Sequence[torch.Tensor], vertices: torch.Tensor) -> torch.Tensor:
    """Sample ``(B, C_i, Z_i, Y_i, X_i)`` maps at vertices ``(B, V, 3)`` (normalised ``(x, y, z)``).

    Returns ``(B, V, sum C_i)`` (trilinear, ``align_corners=True``, border padding).
    """
    b, v, _ = vertices.shape
    grid = vertices.reshape(b, 1, 1, v, 3)
    out = []
    for fm in feature_maps:
        s = F.grid_sample(fm.float(), grid.float(), mode="bilinear", padding_mode="border", align_corners=True)
        out.append(s.reshape(b, fm.shape[1], v).transpose(1, 2))
    return torch.cat(out, dim=-1)


class _DeformBlock(nn.Module):
    def __init__(self, in_features: int, hidden: int, num_residual: int) -> None:
        super().__init__()
        self.inp = GraphConv(in_features, hidden)
        self.res = nn.ModuleList(GraphConv(hidden, hidden) for _ in range(num_residual))
        self.out = GraphConv(hidden, 3)
        self.out.zero_init()
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        h = self.act(self.inp(x, adj))
        for layer in self.res:
            h = h + self.act(layer(h, adj))
        return self.out(h, adj)


class MeshHead(nn.Module):
    """Template deformation head (see the module docstring).

    Args:
        templates: one :class:`Template` per mesh structure (order = output order).
        decoder_channels: channels ``C_i`` of the decoder feature maps passed to :meth:`forward`.
        bottleneck_channels: channels of the bottleneck feature map.
        hidden_features: width of the GCN layers.
        num_blocks: number of deformation blocks (features are resampled before each).
        num_residual: residual GCN layers per block.
        alignment_hidden: width of the alignment MLP's hidden layer.
        structure_channels: per template, the segmentation output channels (label ids) whose arg-max union is the
            structure's mask, for the segmentation-guided placement; None: no placement (the alignment MLP starts
            from the template).
        min_alignment_voxels: voxels of the structure's largest component below which the placement leaves the
            template unmoved.

    Forward:
        decoder_features: list of ``(B, C_i, Z_i, Y_i, X_i)`` (any resolutions; all cover the patch).
        bottleneck: ``(B, C_b, ...)``.
        segmentation: ``(B, C, Z, Y, X)`` segmentation logits covering the patch; required when
            ``structure_channels`` was given, ignored otherwise.
        Returns a list of ``(B, V_s, 3)`` float32 tensors, one per template, in the normalised
        ``(x, y, z)`` patch frame.
    """

    #: version of the segmentation-guided placement, stored in the extra state (so in every checkpoint):
    #: 1 = moments of the softmax map (nnunet-topo 0.1.0 before issue 21), 2 = hard arg-max mask, largest component
    PLACEMENT_VERSION: int = 2

    def __init__(
        self,
        templates: Sequence[Template],
        decoder_channels: Sequence[int],
        bottleneck_channels: int,
        hidden_features: int = 64,
        num_blocks: int = 2,
        num_residual: int = 1,
        alignment_hidden: int = 64,
        structure_channels: Sequence[Sequence[int]] | None = None,
        min_alignment_voxels: float = 8.0,
    ) -> None:
        super().__init__()
        templates = list(templates)
        if len(templates) == 0:
            raise ValueError("MeshHead needs at least one template.")
        for t in templates:
            if not isinstance(t, Template):
                raise TypeError(f"templates must be Template objects, got {type(t).__name__}.")
        names = [t.name for t in templates]
        if len(set(names)) != len(names):
            raise ValueError(f"template names must be unique, got {names}.")
        self.decoder_channels = [int(c) for c in decoder_channels]
        if len(self.decoder_channels) == 0 or min(self.decoder_channels) < 1:
            raise ValueError(f"decoder_channels must be a non-empty list of positive ints, got {decoder_channels}.")
        if num_blocks < 0 or num_residual < 0:
            raise ValueError("num_blocks and num_residual must be >= 0.")
        self.bottleneck_channels = int(bottleneck_channels)
        self.num_structures = len(templates)
        self.names = names
        self.genera = [t.genus for t in templates]
        if structure_channels is not None:
            channels = [[int(c) for c in chs] for chs in structure_channels]
            if len(channels) != len(templates) or any(not chs or min(chs) < 0 for chs in channels):
                raise ValueError(f"structure_channels must give a non-empty list of channel ids >= 0 for each of the "
                                 f"{len(templates)} templates, got {structure_channels}.")
            self.structure_channels: list[list[int]] | None = channels
        else:
            self.structure_channels = None
        self.min_alignment_voxels = float(min_alignment_voxels)
        for s, t in enumerate(templates):
            self.register_buffer(f"template_vertices_{s}", torch.from_numpy(t.vertices.copy()))
            self.register_buffer(f"template_faces_{s}", torch.from_numpy(t.faces.copy()))
        self._rebuild_graphs()

        self.alignment = nn.Sequential(
            nn.Linear(self.bottleneck_channels, alignment_hidden),
            nn.LeakyReLU(0.01),
            nn.Linear(alignment_hidden, 9 * self.num_structures),
        )
        nn.init.zeros_(self.alignment[-1].weight)
        nn.init.zeros_(self.alignment[-1].bias)

        in_features = sum(self.decoder_channels) + 3
        self.blocks = nn.ModuleList(
            nn.ModuleList(_DeformBlock(in_features, hidden_features, num_residual) for _ in range(num_blocks))
            for _ in range(self.num_structures)
        )

    # ------------------------------------------------------------------ templates and graphs
    def _rebuild_graphs(self) -> None:
        # Plain attributes, not buffers: sparse buffers would be broadcast by DDP and are derived data.
        self._adjacency = [
            normalized_adjacency(self.template_faces(s).cpu(), self.template_vertices(s).shape[0])
            for s in range(self.num_structures)
        ]
        # (volume, centroid, per-axis std) of each template's solid, for the segmentation-guided placement (derived)
        props = [_solid_properties(self.template_vertices(s).detach().cpu().numpy(),
                                   self.template_faces(s).detach().cpu().numpy()) for s in range(self.num_structures)]
        self._template_moments = (  # (S,), (S, 3), (S, 3); cached per device like the adjacencies
            torch.tensor([p[0] for p in props], dtype=torch.float32),
            torch.from_numpy(np.stack([p[1] for p in props])).float(),
            torch.from_numpy(np.stack([p[2] for p in props])).float(),
        )

    def adjacency(self, s: int, device: torch.device | None = None) -> torch.Tensor:
        """Sparse ``(V_s, V_s)`` normalised adjacency of structure ``s`` (cached per device)."""
        adj = self._adjacency[s]
        if device is not None and adj.device != torch.device(device):
            adj = adj.to(device)
            self._adjacency[s] = adj
        return adj

    def _placement_constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Volume ``(S,)``, centroid ``(S, 3)`` and per-axis std ``(S, 3)`` of the templates' solids (cached per device)."""
        if self._template_moments[0].device != torch.device(device):
            self._template_moments = tuple(a.to(device) for a in self._template_moments)
        return self._template_moments

    def template_vertices(self, s: int) -> torch.Tensor:
        """Template vertices ``(V_s, 3)`` of structure ``s``."""
        return getattr(self, f"template_vertices_{s}")

    def template_faces(self, s: int) -> torch.Tensor:
        """Faces ``(F_s, 3)`` of structure ``s`` (shared by every predicted mesh of it)."""
        return getattr(self, f"template_faces_{s}")

    def templates(self) -> list[Template]:
        """The templates as :class:`Template` objects (as stored in the state dict)."""
        return [
            Template(
                self.template_vertices(s).detach().cpu().numpy(),
                self.template_faces(s).detach().cpu().numpy(),
                name=self.names[s],
                genus=self.genera[s],
            )
            for s in range(self.num_structures)
        ]

    def get_extra_state(self) -> dict[str, Any]:
        return {"names": list(self.names), "genera": list(self.genera), "placement_version": self.PLACEMENT_VERSION}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        # Called by load_state_dict after the buffers were copied: check and rebuild the graphs.
        version = state.get("placement_version", 1)  # states without it come from the soft-moment placement
        if self.structure_channels is not None and version != self.PLACEMENT_VERSION:
            what = ("the soft-moment placement (version 1) of nnunet-topo 0.1.0 before the hard-mask placement"
                    if version == 1 else f"placement version {version}")
            raise ValueError(
                f"this mesh head was trained with {what}; this nnunet-topo places templates with placement version "
                f"{self.PLACEMENT_VERSION} (hard arg-max mask, largest component), which would give it different "
                "meshes. Retrain the mesh trainer with this version, or predict with the nnunet-topo version it was "
                "trained with."
            )
        if list(state.get("names", [])) != self.names or list(state.get("genera", [])) != self.genera:
            raise ValueError(
                f"checkpoint mesh head has structures {state.get('names')} (genera {state.get('genera')}), "
                f"this head has {self.names} (genera {self.genera}); build the head from the templates "
                "stored with the model (MeshHead.templates_from_state_dict)."
            )
        self._rebuild_graphs()

    @staticmethod
    def templates_from_state_dict(state_dict: dict[str, Any], prefix: str = "") -> list[Template]:
        """Rebuild the templates stored in a (checkpoint) state dict of a head at ``prefix``.

        E.g. ``prefix="mesh_head."`` for a :class:`~nnunet_topo.mesh_head.network.MeshAugmentedNetwork`.
        """
        extra = state_dict.get(prefix + "_extra_state")
        if extra is None:
            raise KeyError(f"no mesh head at prefix {prefix!r} in this state dict (missing {prefix}_extra_state).")
        out = []
        for s, (name, genus) in enumerate(zip(extra["names"], extra["genera"])):
            out.append(
                Template(
                    state_dict[f"{prefix}template_vertices_{s}"].cpu().numpy(),
                    state_dict[f"{prefix}template_faces_{s}"].cpu().numpy(),
                    name=name,
                    genus=genus,
                )
            )
        return out

    # ------------------------------------------------------------------ forward
    def alignment_parameters(self, bottleneck: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M - I, t)``: ``(B, S, 3, 3)`` and ``(B, S, 3)`` from the bottleneck ``(B, C_b, ...)``."""
        if bottleneck.ndim < 3 or bottleneck.shape[1] != self.bottleneck_channels:
            raise ValueError(
                f"bottleneck must be (B, {self.bottleneck_channels}, ...), got {tuple(bottleneck.shape)}."
            )
        pooled = bottleneck.float().flatten(2).mean(-1)
        p = self.alignment(pooled).float().reshape(-1, self.num_structures, 9)
        log_scale, omega, t = p[..., 0:3], p[..., 3:6], p[..., 6:9]
        m = axis_angle_to_matrix(omega) * torch.exp(log_scale)[..., None, :]  # R diag(s)
        eye = torch.eye(3, dtype=m.dtype, device=m.device)
        return m - eye, t

    @torch.no_grad()
    def placement(self, segmentation: torch.Tensor | None, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Segmentation-guided placement ``(centres (B, S, 3), per-axis scales (B, S, 3))``, no gradient.

        From the hard arg-max of ``segmentation`` ``(B, C, Z, Y, X)`` logits (see the module docstring, step 0):
        the largest 26-connected component of each structure gives the centre (its centroid) and the scales
        ``g r`` about the template's centroid; a structure absent from the arg-max, or whose largest component has
        fewer than ``min_alignment_voxels`` voxels, gets the template's own centroid and scale 1. All on the
        logits' device; the only host syncs are those of :func:`largest_component` (none on a CPU; on CUDA one per
        4 label-propagation iterations, typically 2-5).
        """
        if self.structure_channels is None:
            raise RuntimeError("this head has no structure_channels: no segmentation-guided placement.")
        if segmentation is None:
            raise ValueError("this mesh head places its templates with the network's segmentation "
                             "(structure_channels was given): pass segmentation=(B, C, Z, Y, X) logits.")
        need = max(max(chs) for chs in self.structure_channels) + 1
        if segmentation.ndim != 5 or segmentation.shape[0] != batch or segmentation.shape[1] < need:
            raise ValueError(f"segmentation must be (B={batch}, C>={need}, Z, Y, X) logits, got "
                             f"{tuple(segmentation.shape)}.")
        # the arg-max (first channel on ties); max().indices, not argmax(): 8x faster over dim 1 on a CPU (torch 2.14)
        decision = segmentation.detach().max(1).indices  # (B, Z, Y, X)
        device = decision.device
        masks = []
        for chs in self.structure_channels:
            m = decision == chs[0]
            for c in chs[1:]:
                m = m | (decision == c)
            masks.append(m)
        masks = torch.stack(masks, 1)  # (B, S, Z, Y, X)
        spatial = tuple(masks.shape[2:])
        component = largest_component(masks.reshape(-1, *spatial))
        count = component.flatten(1).sum(1).reshape(batch, -1)  # (B, S)
        volume, centre, std = (a.reshape(batch, self.num_structures, *a.shape[1:])
                               for a in mask_solid_moments(component))
        v_t, c_t, std_t = self._placement_constants(device)  # (S,), (S, 3), (S, 3)
        g = (volume / v_t).clamp_min(1e-12).pow(1.0 / 3.0).clamp(*PLACEMENT_SCALE_RANGE)  # (B, S)
        log_r = torch.log(std.clamp_min(1e-12) / std_t)  # (B, S, 3)
        log_r = log_r - log_r.mean(-1, keepdim=True)
        lo, hi = PLACEMENT_AXIS_RATIO_RANGE
        log_r = log_r.clamp(float(np.log(lo)), float(np.log(hi)))
        log_r = log_r - log_r.mean(-1, keepdim=True)
        scale = g[..., None] * torch.exp(log_r)
        ok = (count >= self.min_alignment_voxels)[..., None]
        centres = torch.where(ok, centre, c_t.expand_as(centre))
        scales = torch.where(ok, scale, torch.ones_like(scale))
        return centres, scales

    def forward(self, decoder_features: Sequence[torch.Tensor], bottleneck: torch.Tensor,
                segmentation: torch.Tensor | None = None) -> list[torch.Tensor]:
        decoder_features = list(decoder_features)
        if len(decoder_features) != len(self.decoder_channels):
            raise ValueError(f"expected {len(self.decoder_channels)} decoder feature maps, got {len(decoder_features)}.")
        for fm, c in zip(decoder_features, self.decoder_channels):
            if fm.ndim != 5 or fm.shape[1] != c:
                raise ValueError(f"decoder feature maps must be (B, C, Z, Y, X) with C = {c}, got {tuple(fm.shape)}.")
        bsz = bottleneck.shape[0]
        m_minus_i, t = self.alignment_parameters(bottleneck)
        placement = self.placement(segmentation, bsz) if self.structure_channels is not None else None
        with torch.autocast(device_type=bottleneck.device.type, enabled=False):
            out = []
            for s in range(self.num_structures):
                tv = self.template_vertices(s).float()
                if placement is None:
                    base = tv.expand(bsz, -1, -1)  # (B, V, 3)
                else:
                    c_seg, scale = placement[0][:, s], placement[1][:, s]  # (B, 3) each
                    c_t = self._placement_constants(tv.device)[1][s]
                    base = c_seg[:, None, :] + (tv - c_t)[None] * scale[:, None, :]
                rel = base - base.mean(1, keepdim=True)
                v = base + rel @ m_minus_i[:, s].transpose(1, 2) + t[:, s, None, :]
                adj = self.adjacency(s, v.device)
                for block in self.blocks[s]:
                    x = torch.cat([sample_features(decoder_features, v), v], dim=-1)
                    v = v + block(x, adj)
                out.append(v)
        return out
