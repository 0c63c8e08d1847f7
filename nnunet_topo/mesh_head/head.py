"""The GCN mesh head (DESIGN §7 "Head"): global alignment, then residual graph-convolution blocks.

For each mesh structure ``s`` with template vertices ``T_s (V_s, 3)`` (normalised patch frame,
``(x, y, z)``, see ``templates.py``):

1. **Global alignment** (in the spirit of the MIE paper's alignment step): an MLP on the globally
   average-pooled bottleneck features predicts per structure a log-scale ``sigma (3)``, an
   axis-angle rotation ``omega (3)`` and a translation ``t (3)``. With ``M = R(omega) diag(exp(sigma))``
   (Rodrigues' formula) and ``c_s`` the template centroid::

       v = T + (M - I) (T - c_s) + t

   i.e. scale and rotation about the template centroid. The MLP's last layer is zero-initialised,
   so at initialisation ``M - I`` and ``t`` are exactly 0 and the head outputs the templates
   bit-for-bit (``T + 0 + 0``).
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

import torch
import torch.nn.functional as F
from torch import nn

from .graph import GraphConv, normalized_adjacency
from .templates import Template

__all__ = ["MeshHead", "axis_angle_to_matrix", "sample_features"]


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

    Forward:
        decoder_features: list of ``(B, C_i, Z_i, Y_i, X_i)`` (any resolutions; all cover the patch).
        bottleneck: ``(B, C_b, ...)``.
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

    def forward(self, decoder_features: Sequence[torch.Tensor], bottleneck: torch.Tensor) -> list[torch.Tensor]:
        decoder_features = list(decoder_features)
        if len(decoder_features) != len(self.decoder_channels):
            raise ValueError(f"expected {len(self.decoder_channels)} decoder feature maps, got {len(decoder_features)}.")
        for fm, c in zip(decoder_features, self.decoder_channels):
            if fm.ndim != 5 or fm.shape[1] != c:
                raise ValueError(f"decoder feature maps must be (B, C, Z, Y, X) with C = {c}, got {tuple(fm.shape)}.")
        bsz = bottleneck.shape[0]
        m_minus_i, t = self.alignment_parameters(bottleneck)
        with torch.autocast(device_type=bottleneck.device.type, enabled=False):
            out = []
            for s in range(self.num_structures):
                tv = self.template_vertices(s).float()
                c = tv.mean(0)
                rel = (tv - c).expand(bsz, -1, -1)  # (B, V, 3)
                v = tv + rel @ m_minus_i[:, s].transpose(1, 2) + t[:, s, None, :]
                adj = self.adjacency(s, v.device)
                for block in self.blocks[s]:
                    x = torch.cat([sample_features(decoder_features, v), v], dim=-1)
                    v = v + block(x, adj)
                out.append(v)
        return out
