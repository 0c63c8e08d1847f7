"""Graph convolutions on triangle meshes and the mesh graph they run on (plain torch).

* :class:`GraphConv`: the graph convolution of Kipf & Welling, "Semi-Supervised Classification with
  Graph Convolutional Networks", ICLR 2017, Eq. 2: ``X' = Â X W + b`` with
  ``Â = D^-1/2 (A + I) D^-1/2`` (:func:`normalized_adjacency`).
* :class:`ChebConv`: Chebyshev spectral convolution of Defferrard et al., "Convolutional Neural
  Networks on Graphs with Fast Localized Spectral Filtering", NeurIPS 2016, Eq. 4-5, with the
  rescaled Laplacian ``L~ = 2 L / lambda_max - I`` and ``lambda_max = 2`` (Kipf & Welling's
  approximation), i.e. ``L~ = -D^-1/2 A D^-1/2`` (:func:`scaled_laplacian`).
* The graph structure they run on: :func:`mesh_edges`, :func:`check_faces`.

The mesh regularisers (Laplacian smoothing, edge length) are losses: :mod:`nnunet_topo.losses.mesh_regularisers`.

Vertices are batched ``(B, V, C)`` and share one connectivity ``faces (F, 3)``. Sparse products
run in float32 (autocast-safe) and the result is cast back to the input dtype.
"""
from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "mesh_edges",
    "normalized_adjacency",
    "scaled_laplacian",
    "sparse_batched_mm",
    "GraphConv",
    "ChebConv",
    "check_faces",
]


def check_faces(faces: torch.Tensor, num_vertices: int | None = None) -> torch.Tensor:
    """``faces`` as a long ``(F, 3)`` tensor of vertex indices (in ``[0, num_vertices)`` if given); ValueError
    otherwise."""
    if not isinstance(faces, torch.Tensor):
        faces = torch.as_tensor(faces)
    if faces.dtype.is_floating_point or faces.dtype == torch.bool:
        raise ValueError(f"faces must be an integer tensor, got {faces.dtype}.")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must have shape (F, 3), got {tuple(faces.shape)}.")
    faces = faces.long()
    if faces.numel() and num_vertices is not None and (faces.min() < 0 or faces.max() >= num_vertices):
        raise ValueError(f"face indices must lie in [0, {num_vertices}).")
    return faces


def mesh_edges(faces: torch.Tensor) -> torch.Tensor:
    """Unique undirected edges ``(E, 2)`` (``i < j``, sorted lexicographically) of a triangle mesh."""
    faces = check_faces(faces)
    if faces.numel() == 0:
        return torch.zeros((0, 2), dtype=torch.long, device=faces.device)
    e = torch.cat([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]], dim=0)
    e = torch.sort(e, dim=1).values
    return torch.unique(e, dim=0)


def normalized_adjacency(faces: torch.Tensor, num_vertices: int) -> torch.Tensor:
    """``Â = D^-1/2 (A + I) D^-1/2`` as a coalesced sparse COO ``(V, V)`` float32 tensor.

    ``A`` is the symmetric 0/1 vertex adjacency of the mesh edges, ``D`` the degree matrix of
    ``A + I`` (every vertex has a self loop, so isolated vertices get ``Â_vv = 1``).
    """
    faces = check_faces(faces, num_vertices)
    e = mesh_edges(faces)
    loops = torch.arange(num_vertices, device=faces.device)
    rows = torch.cat([e[:, 0], e[:, 1], loops])
    cols = torch.cat([e[:, 1], e[:, 0], loops])
    deg = torch.bincount(rows, minlength=num_vertices).float()
    dinv = deg.rsqrt()
    vals = dinv[rows] * dinv[cols]
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (num_vertices, num_vertices), check_invariants=True).coalesce()


def scaled_laplacian(faces: torch.Tensor, num_vertices: int) -> torch.Tensor:
    """``L~ = -D^-1/2 A D^-1/2`` (sparse COO float32), the Chebyshev-rescaled normalised Laplacian.

    ``L = I - D^-1/2 A D^-1/2`` with ``lambda_max`` taken as 2 gives ``L~ = L - I``. Isolated
    vertices get a zero row.
    """
    faces = check_faces(faces, num_vertices)
    e = mesh_edges(faces)
    rows = torch.cat([e[:, 0], e[:, 1]])
    cols = torch.cat([e[:, 1], e[:, 0]])
    deg = torch.bincount(rows, minlength=num_vertices).float()
    dinv = torch.where(deg > 0, deg.clamp_min(1).rsqrt(), torch.zeros_like(deg))
    vals = -dinv[rows] * dinv[cols]
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (num_vertices, num_vertices), check_invariants=True).coalesce()


def sparse_batched_mm(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix @ x[b]`` for every batch element: sparse ``(V, V)`` times dense ``(B, V, C)``.

    Folds the batch into the columns (``(V, B*C)``), one ``torch.sparse.mm``, computed in float32.
    """
    b, v, c = x.shape
    if matrix.shape != (v, v):
        raise ValueError(f"matrix is {tuple(matrix.shape)} but x has {v} vertices.")
    dense = x.float().permute(1, 0, 2).reshape(v, b * c)
    out = torch.sparse.mm(matrix.to(dense.device), dense)
    return out.reshape(v, b, c).permute(1, 0, 2).to(x.dtype)


class GraphConv(nn.Module):
    """Kipf & Welling graph convolution ``X' = Â X W + b`` (ICLR 2017, Eq. 2).

    Args:
        in_features, out_features: channels ``C_in``, ``C_out``.
        bias: add a learned bias.

    Forward:
        x: ``(B, V, C_in)``; adjacency: sparse ``(V, V)`` from :func:`normalized_adjacency`.
        Returns ``(B, V, C_out)``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}.")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.empty(self.in_features, self.out_features))
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def zero_init(self) -> None:
        """Set weight and bias to zero (the layer then outputs zeros)."""
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be (B, V, {self.in_features}), got {tuple(x.shape)}.")
        out = sparse_batched_mm(adjacency, x @ self.weight.to(x.dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class ChebConv(nn.Module):
    """Chebyshev graph convolution of order ``K`` (Defferrard et al., NeurIPS 2016, Eq. 4-5).

    ``X' = sum_{k<K} T_k(L~) X W_k + b`` with ``T_0 = I``, ``T_1 = L~``,
    ``T_k = 2 L~ T_{k-1} - T_{k-2}``.

    Forward:
        x: ``(B, V, C_in)``; laplacian: sparse ``(V, V)`` from :func:`scaled_laplacian`.
        Returns ``(B, V, C_out)``.
    """

    def __init__(self, in_features: int, out_features: int, K: int = 3, bias: bool = True) -> None:
        super().__init__()
        if K < 1:
            raise ValueError(f"K must be >= 1, got {K}.")
        self.in_features, self.out_features, self.K = int(in_features), int(out_features), int(K)
        self.weight = nn.Parameter(torch.empty(self.K, self.in_features, self.out_features))
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None
        bound = math.sqrt(6.0 / (self.K * self.in_features + self.out_features))
        nn.init.uniform_(self.weight, -bound, bound)

    def zero_init(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, laplacian: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be (B, V, {self.in_features}), got {tuple(x.shape)}.")
        t_prev, t_cur = None, x
        out = x @ self.weight[0].to(x.dtype)
        for k in range(1, self.K):
            t_next = sparse_batched_mm(laplacian, t_cur)
            if t_prev is not None:
                t_next = 2.0 * t_next - t_prev
            out = out + t_next @ self.weight[k].to(x.dtype)
            t_prev, t_cur = t_cur, t_next
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, K={self.K}, bias={self.bias is not None}"
