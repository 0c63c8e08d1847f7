"""Where a case sits in a training patch, as nnU-Net's data loader places it (no nnU-Net import).

nnU-Net pads a case that is smaller than the patch symmetrically (``need // 2`` voxels before, the rest after).
Whole-structure methods (mesh templates, whole-volume Betti priors) need every case inside the patch; these helpers
place arrays the same way and say which cases do not fit.
"""
from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

import numpy as np

__all__ = ["cases_larger_than_patch", "center_pad_to", "check_whole_volume_in_patch"]


def center_pad_to(array: np.ndarray, patch: Sequence[int], fill: float = 0) -> np.ndarray:
    """Pad the last ``len(patch)`` axes of ``array`` to ``patch`` as nnU-Net's data loader places a case smaller
    than the patch (``need // 2`` before, the rest after); a larger axis is centre-cropped. Leading axes (channels)
    are kept."""
    lead = array.ndim - len(patch)
    if lead < 0:
        raise ValueError(f"array of shape {array.shape} has fewer axes than the patch {list(patch)}")
    pads = [(0, 0)] * lead
    for s, p in zip(array.shape[lead:], patch):
        need = max(int(p) - s, 0)
        pads.append((need // 2, need - need // 2))
    out = np.pad(array, pads, constant_values=fill)
    sl = (slice(None),) * lead + tuple(slice((s - int(p)) // 2, (s - int(p)) // 2 + int(p)) if s > int(p)
                                       else slice(None) for s, p in zip(out.shape[lead:], patch))
    return out[sl]


def cases_larger_than_patch(shapes: Iterable[Tuple[str, Sequence[int]]],
                            patch: Sequence[int]) -> List[Tuple[str, List[int]]]:
    """``[(case, shape)]`` of the cases with a spatial axis larger than the patch (empty when all fit)."""
    p = [int(x) for x in patch]
    return [(name, [int(s) for s in shape]) for name, shape in shapes if any(int(s) > q for s, q in zip(shape, p))]


def check_whole_volume_in_patch(shapes: Iterable[Tuple[str, Sequence[int]]], patch_size: Sequence[int],
                                reason: str = "semi-supervised Betti priors need the whole structure in view",
                                advice: str = "A prior on a patch that cuts a structure is wrong (DESIGN §6). Use a "
                                              "configuration whose patch covers the preprocessed volume (e.g. "
                                              "3d_lowres, or plans with a larger patch), or crop the images to the "
                                              "heart.") -> None:
    """Raise a ``RuntimeError`` (``reason``, the sizes, ``advice``) unless every case fits in the patch."""
    patch = [int(p) for p in patch_size]
    too_big = cases_larger_than_patch(shapes, patch)
    if too_big:
        raise RuntimeError(f"{reason}, but the patch size {patch} is smaller than {len(too_big)} case(s), e.g. "
                           f"{too_big[:3]}. {advice}")
