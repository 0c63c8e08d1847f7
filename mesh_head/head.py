"""The GCN mesh head (DESIGN §7 "Head"): global alignment, then residual graph-convolution blocks.

For each mesh structure ``s`` with template vertices ``T_s (V_s, 3)`` (normalised patch frame,
``(x, y, z)``, see ``templates.py``):

0. **Segmentation-guided placement** (optional, ``structure_channels`` given): the template is moved
   and scaled per axis so that its solid moments match those of the network's *own* soft segmentation
   of the structure (sum of the softmax channels of its labels): ``B = c_seg + diag(std_seg / std_T)
   (T - c_T)``, with ``c_T, std_T`` the centroid and per-axis standard deviation of the template's
   enclosed solid (trimesh mass properties) and the scale clipped to ``[0.5, 2]``. It is computed
   without gradient (the mesh losses cannot move the segmentation through it); where the structure's
   soft mass is below ``min_alignment_voxels`` voxels the template stays where it is (``B = T``).
   Why: a head that starts from a fixed template must otherwise learn position and size from
   globally pooled features, which it did not do in our short runs (documentation/results.md);
   the segmentation already knows where the structure is.
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

Templates are persistent buffers (``template_vertices_<s>``, ``template_faces_<s>``) and names and
genera are the module's extra state, so a state dict carries the complete head; the graph
operators are derived from the faces (non-persistent) and rebuilt on load.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import trimesh
import torch.nn.functional as F
from torch import nn

from .graph import GraphConv, normalized_adjacency
from .templates import Template

__all__ = ["MeshHead", "axis_angle_to_matrix", "sample_features", "solid_moments", "soft_mask_moments"]

#: clip of the per-axis scale of the segmentation-guided placement
PLACEMENT_SCALE_RANGE: tuple[float, float] = (0.5, 2.0)


def solid_moments(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid ``(3,)`` and per-axis standard deviation ``(3,)`` of the solid enclosed by a closed mesh.

    From trimesh's mass properties (unit density): the covariance ``C = integral (x - c)(x - c)^T dV`` is
    ``tr(I)/2 * Id - I`` for the inertia tensor ``I`` about the centre of mass; ``std_i = sqrt(C_ii / volume)``.
    """
    mesh = trimesh.Trimesh(np.asarray(vertices, dtype=np.float64), np.asarray(faces, dtype=np.int64), process=False)
    volume = float(mesh.volume)
    if not volume > 0:
        raise ValueError(f"solid_moments needs a closed, outward-wound mesh with positive volume, got {volume}.")
    inertia = np.asarray(mesh.moment_inertia, dtype=np.float64)
    cov = np.trace(inertia) / 2.0 * np.eye(3) - inertia
    return np.asarray(mesh.center_mass, dtype=np.float64), np.sqrt(np.clip(np.diag(cov) / volume, 1e-12, None))


def soft_mask_moments(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mass ``(B,)`` (voxels), centroid ``(B, 3)`` and per-axis std ``(B, 3)`` of soft masks ``(B, Z, Y, X)``.

    Centroid and std are in the normalised ``(x, y, z)`` frame of ``grid_sample(align_corners=True)``
    (index ``i`` of an axis of size ``n`` at ``2 i / (n - 1) - 1``, 0 if ``n = 1``). Separable sums: ``O(Z Y X)``.
    """
    m = mask.float()
    mass = m.sum(dim=(1, 2, 3))
    safe = mass.clamp_min(1e-6)
    cents, stds = [], []
    for axis in (3, 2, 1):  # x, y, z
        n = m.shape[axis]
        coord = torch.linspace(-1.0, 1.0, n, device=m.device) if n > 1 else torch.zeros(1, device=m.device)
        marginal = m.sum(dim=tuple(a for a in (1, 2, 3) if a != axis))  # (B, n)
        c = (marginal * coord).sum(-1) / safe
        var = (marginal * (coord[None] - c[:, None]) ** 2).sum(-1) / safe
        cents.append(c)
        stds.append(var.clamp_min(0).sqrt())
    return mass, torch.stack(cents, -1), torch.stack(stds, -1)


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
        structure_channels: per template, the segmentation output channels (label ids) whose softmax sum is
            the structure's soft mask, for the segmentation-guided placement; None: no placement (the
            alignment MLP starts from the template).
        min_alignment_voxels: soft mass below which the placement leaves the template unmoved.

    Forward:
        decoder_features: list of ``(B, C_i, Z_i, Y_i, X_i)`` (any resolutions; all cover the patch).
        bottleneck: ``(B, C_b, ...)``.
        segmentation: ``(B, C, Z, Y, X)`` segmentation logits covering the patch; required when
            ``structure_channels`` was given, ignored otherwise.
        Returns a list of ``(B, V_s, 3)`` float32 tensors, one per template, in the normalised
        ``(x, y, z)`` patch frame.
    """

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
        # (centroid, per-axis std) of each template's solid, for the segmentation-guided placement (derived data)
        self._template_moments = [
            tuple(torch.from_numpy(a).float() for a in solid_moments(self.template_vertices(s).detach().cpu().numpy(),
                                                                    self.template_faces(s).detach().cpu().numpy()))
            for s in range(self.num_structures)
        ]

    def adjacency(self, s: int, device: torch.device | None = None) -> torch.Tensor:
        """Sparse ``(V_s, V_s)`` normalised adjacency of structure ``s`` (cached per device)."""
        adj = self._adjacency[s]
        if device is not None and adj.device != torch.device(device):
            adj = adj.to(device)
            self._adjacency[s] = adj
        return adj

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
        return {"names": list(self.names), "genera": list(self.genera)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        # Called by load_state_dict after the buffers were copied: check and rebuild the graphs.
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

        Structures whose soft mass is below ``min_alignment_voxels`` get the template's own centroid and scale 1.
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
        probs = torch.softmax(segmentation.detach().float(), dim=1)
        centres, scales = [], []
        lo, hi = PLACEMENT_SCALE_RANGE
        for s, chs in enumerate(self.structure_channels):
            c_t, std_t = (a.to(probs.device) for a in self._template_moments[s])
            mass, c, std = soft_mask_moments(probs[:, chs].sum(1))
            ok = (mass >= self.min_alignment_voxels)[:, None]
            centres.append(torch.where(ok, c, c_t.expand_as(c)))
            scales.append(torch.where(ok, (std / std_t).clamp(lo, hi), torch.ones_like(std)))
        return torch.stack(centres, 1), torch.stack(scales, 1)

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
                    c_t = self._template_moments[s][0].to(tv.device)
                    base = c_seg[:, None, :] + (tv - c_t)[None] * scale[:, None, :]
                rel = base - base.mean(1, keepdim=True)
                v = base + rel @ m_minus_i[:, s].transpose(1, 2) + t[:, s, None, :]
                adj = self.adjacency(s, v.device)
                for block in self.blocks[s]:
                    x = torch.cat([sample_features(decoder_features, v), v], dim=-1)
                    v = v + block(x, adj)
                out.append(v)
        return out
