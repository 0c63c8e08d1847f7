"""``OccupancyBCELoss``: a thin ``nn.Module`` around :func:`nnunet_topo.occupancy.occupancy_bce`, kept for the tests
(the library's losses call the function; issue 24 dropped the unused module from the library)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor, nn

from nnunet_topo.occupancy import (DEFAULT_CHUNK_SIZE, DEFAULT_EPS, REDUCTIONS, _check_backend, _check_eps,
                                   _check_options, occupancy_bce)


class OccupancyBCELoss(nn.Module):
    """Binary cross-entropy of mesh occupancy (TPM Eq. 10-11), a thin module around :func:`occupancy_bce`.

    Args:
        method: ``"exact"`` or ``"dipole"`` (see :func:`winding_number`).
        eps: occupancy clamp margin in (0, 0.5).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        chunk_size: most point-face (or point-vertex) pairs per block.
        smoothing: smoothed-dipole ``sigma`` in vertex units (``method="dipole"`` only).
        backend: ``"torch"``, ``"triton"``, ``"auto"`` or ``None`` (see :func:`winding_number`).

    Shapes:
        points ``(..., N, 3)``, vertices ``(..., V, 3)``, faces ``(F, 3)``, targets ``(..., N)``,
        optional weights broadcastable to ``(..., N)``; output scalar (``(..., N)`` for ``"none"``).
    """

    def __init__(self, method: str = "exact", eps: float = DEFAULT_EPS, reduction: str = "mean",
                 chunk_size: int = DEFAULT_CHUNK_SIZE, smoothing: float = 0.0,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        _check_options(method, chunk_size, smoothing)
        _check_backend(backend)
        _check_eps(eps)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.method, self.eps, self.reduction = method, float(eps), reduction
        self.chunk_size, self.smoothing = chunk_size, float(smoothing)
        self.backend = backend

    def forward(self, points: Tensor, vertices: Union[Tensor, Sequence[Tensor]],
                faces: Union[Tensor, Sequence[Tensor]], targets: Tensor,
                weights: Optional[Tensor] = None) -> Tensor:
        return occupancy_bce(points, vertices, faces, targets, method=self.method, eps=self.eps, weights=weights,
                             reduction=self.reduction, chunk_size=self.chunk_size, smoothing=self.smoothing,
                             backend=self.backend)

    def extra_repr(self) -> str:
        return (f"method={self.method!r}, eps={self.eps}, reduction={self.reduction!r}, "
                f"chunk_size={self.chunk_size}, smoothing={self.smoothing}, backend={self.backend!r}")
