"""Projected pooling loss (Fu et al.).

Implements the soft topology constraint of G. Fu, R. El Jurdi, L. Chougar, D. Dormont, R. Valabregue,
S. Lehericy, O. Colliot, *Projected pooling loss for red nucleus segmentation with soft topology constraints*,
J. Med. Imaging 11(4):044002, 2024: the 3D class probability
map is max-projected onto the three orthogonal planes, each projection is max-pooled at several scales,
and the L1 distance to the same pooled projections of the one-hot reference is the loss. Pooling at
coarse scales compares the *shape of the silhouettes* rather than voxels, which penalises spurious
components and gaps in thin structures far more than a voxel-wise loss does.

Definition used here, for a probability map ``P`` of shape ``(B, C, X, Y, Z)`` and one-hot reference
``G`` of the same shape::

    L = mean_{axis a in spatial axes} mean_{k in kernel_sizes} mean_{b, c, i, j}
            | pool_k(max_a P)[b, c, i, j] - pool_k(max_a G)[b, c, i, j] |

``pool_k`` is max pooling with window ``k`` and stride ``k`` (non-overlapping windows, ``ceil_mode``
so the border rows are not dropped). A window larger than the projected plane is clamped to the plane
size along that dimension (a 24-voxel axis pooled with k=20 uses a 20 window; with k=32 a 24 window);
this is our choice, the paper trains on patches larger than every kernel. For 2D inputs
``(B, C, X, Y)`` the projections are 1D profiles pooled with 1D windows.

Background (channel 0) is excluded by default, as in the paper, which constrains the structures only.
Voxels with ``mask == 0`` (nnU-Net's ignore label) are zeroed in both maps before projecting, so they
influence neither projection.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_KERNEL_SIZES: tuple[int, ...] = (4, 5, 8, 10, 20)


def _validate_kernel_sizes(kernel_sizes: Sequence[int]) -> tuple[int, ...]:
    if isinstance(kernel_sizes, int) or len(kernel_sizes) == 0:
        raise ValueError(f"kernel_sizes must be a non-empty sequence of positive ints, got {kernel_sizes!r}")
    ks = tuple(kernel_sizes)
    for k in ks:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"kernel_sizes must contain positive ints, got {kernel_sizes!r}")
    return ks


def _pool(x: Tensor, k: int) -> Tensor:
    """Non-overlapping max pooling of ``(N, C, *plane)`` with window ``k`` clamped to the plane size."""
    plane = x.shape[2:]
    window = tuple(min(k, s) for s in plane)
    if len(plane) == 2:
        return F.max_pool2d(x, kernel_size=window, stride=window, ceil_mode=True)
    return F.max_pool1d(x, kernel_size=window, stride=window, ceil_mode=True)


def projected_pooling_loss(
    probabilities: Tensor,
    target_onehot: Tensor,
    kernel_sizes: Sequence[int] = DEFAULT_KERNEL_SIZES,
    include_background: bool = False,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Projected pooling loss between a probability map and a one-hot reference.

    Args:
        probabilities: ``(B, C, X, Y, Z)`` or ``(B, C, X, Y)`` class probabilities (e.g. softmax output).
        target_onehot: one-hot reference, same shape as ``probabilities``.
        kernel_sizes: pooling windows (voxels) applied to every projection.
        include_background: keep channel 0 in the loss.
        mask: optional ``(B, 1, *spatial)`` tensor, 0 where voxels are ignored.

    Returns:
        Scalar tensor (float32), connected to the graph of ``probabilities``.
    """
    ks = _validate_kernel_sizes(kernel_sizes)
    if probabilities.shape != target_onehot.shape:
        raise ValueError(
            f"probabilities {tuple(probabilities.shape)} and target_onehot {tuple(target_onehot.shape)} must have "
            "the same shape (B, C, *spatial)")
    spatial_dims = probabilities.ndim - 2
    if spatial_dims not in (2, 3):
        raise ValueError(f"expected (B, C, X, Y) or (B, C, X, Y, Z) inputs, got shape {tuple(probabilities.shape)}")
    p = probabilities.float()
    g = target_onehot.to(p.dtype)
    if mask is not None:
        if mask.shape[0] != p.shape[0] or mask.shape[2:] != p.shape[2:]:
            raise ValueError(f"mask {tuple(mask.shape)} does not match inputs {tuple(p.shape)}")
        m = mask.to(p.dtype)
        p = p * m
        g = g * m
    if not include_background:
        if p.shape[1] < 2:
            raise ValueError("include_background=False needs at least 2 channels (background + one class)")
        p, g = p[:, 1:], g[:, 1:]
    terms = []
    for axis in range(2, 2 + spatial_dims):
        pp = p.amax(dim=axis)
        gp = g.amax(dim=axis)
        for k in ks:
            terms.append((_pool(pp, k) - _pool(gp, k)).abs().mean())
    return torch.stack(terms).mean()


class ProjectedPoolingLoss(nn.Module):
    """Projected pooling loss on network logits (Fu et al., J. Med. Imaging 2024).

    Args:
        kernel_sizes: pooling windows in voxels (paper: 4, 5, 8, 10, 20).
        include_background: keep the background channel (default False).
        softmax: apply a softmax over channels to the input (True for logits).
        ignore_label: label id whose voxels are excluded (nnU-Net's ignore label), or None.

    Shapes:
        input: ``(B, C, X, Y, Z)`` logits (or probabilities with ``softmax=False``), 2D works too.
        target: ``(B, 1, X, Y, Z)`` or ``(B, X, Y, Z)`` integer label map with values in ``[0, C)``
        (plus ``ignore_label``), as nnU-Net's data loader provides it (float dtype accepted).
    """

    def __init__(self, kernel_sizes: Sequence[int] = DEFAULT_KERNEL_SIZES, include_background: bool = False,
                 softmax: bool = True, ignore_label: Optional[int] = None) -> None:
        super().__init__()
        self.kernel_sizes = _validate_kernel_sizes(kernel_sizes)
        self.include_background = bool(include_background)
        self.softmax = bool(softmax)
        if ignore_label is not None and (not isinstance(ignore_label, int) or ignore_label < 0):
            raise ValueError(f"ignore_label must be a non-negative int or None, got {ignore_label!r}")
        self.ignore_label = ignore_label

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if input.ndim not in (4, 5):
            raise ValueError(f"input must be (B, C, X, Y[, Z]), got shape {tuple(input.shape)}")
        if target.ndim == input.ndim - 1:
            target = target.unsqueeze(1)
        if target.ndim != input.ndim or target.shape[1] != 1 or target.shape[0] != input.shape[0] \
                or target.shape[2:] != input.shape[2:]:
            raise ValueError(
                f"target must be a label map (B, 1, *spatial) matching input {tuple(input.shape)}, "
                f"got {tuple(target.shape)}")
        with torch.autocast(device_type=input.device.type, enabled=False):
            x = input.float()
            if not torch.isfinite(x).all():
                raise ValueError("ProjectedPoolingLoss got NaN or inf in its input")
            probs = torch.softmax(x, dim=1) if self.softmax else x
            labels = target.long()
            mask = None
            if self.ignore_label is not None:
                mask = labels != self.ignore_label
                labels = torch.where(mask, labels, torch.zeros_like(labels))
            num_classes = input.shape[1]
            if labels.min() < 0 or labels.max() >= num_classes:
                raise ValueError(
                    f"target label ids must lie in [0, {num_classes}) for {num_classes} channels, got range "
                    f"[{int(labels.min())}, {int(labels.max())}]")
            onehot = torch.zeros_like(probs).scatter_(1, labels, 1.0)
            return projected_pooling_loss(probs, onehot, self.kernel_sizes, self.include_background, mask)
