"""One synthetic case: :class:`Phantom` (image, reference label map, voxel size, image-to-patient transform) and how it
is drawn (:func:`make_phantom`: voxel size, heart geometry, self-check, intensities, origin/direction) or placed in a
larger image (:func:`embed_phantom`).

Array conventions (``documentation/architecture.md``): arrays are ``(Z, Y, X)`` as SimpleITK returns them;
``spacing`` is in the same order, in mm. ``origin`` and ``direction`` follow SimpleITK's own convention (physical
``(x, y, z)`` order; ``direction`` is the row-major 3x3 matrix whose *columns* are the directions of the index axes
i, j, k = X, Y, Z) — the same split nnU-Net's ``SimpleITKIO`` uses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_topo.synthetic.heart import acdc_geometry, wholeheart_geometry
from nnunet_topo.synthetic.intensities import acdc_image, ct_image
from nnunet_topo.synthetic.presets import SeedLike, as_generator, check_preset, check_shape
from nnunet_topo.synthetic.reference import check_reference

#: how many fresh random draws :func:`make_phantom` tries before it gives up
_MAX_ATTEMPTS = 8


@dataclass
class Phantom:
    """One synthetic case.

    Attributes:
        image: float32 array ``(Z, Y, X)``; MRI arbitrary units (``acdc``) or Hounsfield-like units
            (``wholeheart``).
        label: uint8 array ``(Z, Y, X)`` of label ids (see :attr:`labels`).
        spacing: voxel size in mm, array order ``(Z, Y, X)``.
        origin: physical position of voxel ``[0, 0, 0]`` in mm, SimpleITK order ``(x, y, z)``.
        direction: 9 floats, row-major 3x3, SimpleITK convention (columns = directions of index axes X, Y, Z).
        preset: preset name.
        labels: label name -> id.
        params: the random geometry/intensity parameters that were drawn (for inspection and docs).
    """

    image: np.ndarray
    label: np.ndarray
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: Tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    preset: str = ""
    labels: Dict[str, int] = field(default_factory=dict)
    params: Dict[str, Any] = field(default_factory=dict)


def _random_rotation(rng: np.random.Generator, min_angle_deg: float = 10.0) -> np.ndarray:
    """A uniformly random proper rotation, at least ``min_angle_deg`` away from the identity."""
    while True:
        q, r = np.linalg.qr(rng.standard_normal((3, 3)))
        q = q * np.sign(np.diag(r))
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        angle = math.degrees(math.acos(np.clip((np.trace(q) - 1) / 2, -1, 1)))
        if angle >= min_angle_deg:
            return q


def make_phantom(preset: str, seed: SeedLike, shape: Optional[Sequence[int]] = None, *,
                 oblique: bool = False) -> Phantom:
    """Draw one synthetic heart phantom (image + reference label map).

    Deterministic for an int ``seed``; with a ``Generator`` it consumes that generator. The reference is
    checked against the preset's rules and priors
    (:func:`nnunet_topo.synthetic.reference.check_reference`); a failing draw is replaced by a
    new one (a few times) before giving up.

    Args:
        preset: ``"acdc"`` or ``"wholeheart"`` (see :data:`PRESETS`).
        seed: int seed or numpy Generator.
        shape: ``(Z, Y, X)`` in voxels (default: the preset's ``default_shape``; at least ``min_shape``).
        oblique: if True, ``direction`` is a random rotation (at least 10 degrees from the identity) instead
            of the identity. The arrays are the same; only the image-to-patient transform changes.

    Returns:
        A :class:`Phantom`: image float32 ``(Z, Y, X)``, label uint8 ``(Z, Y, X)``, spacing ``(Z, Y, X)`` mm,
        origin ``(x, y, z)`` mm and direction (SimpleITK convention).

    Raises:
        ValueError: unknown preset or bad shape.
        RuntimeError: no valid phantom after several draws (should not happen at supported sizes).
    """
    p = check_preset(preset)
    shp = check_shape(p, shape)
    rng = as_generator(seed)
    problems: List[str] = []
    for attempt in range(_MAX_ATTEMPTS):
        (zlo, zhi), (ylo, yhi), _ = p.spacing_range
        s_in = float(np.round(rng.uniform(ylo, yhi), 3))
        if p.name == "acdc":
            spacing = (float(np.round(rng.uniform(zlo, zhi), 3)), s_in, s_in)
        else:
            spacing = (float(np.round(np.clip(s_in * rng.uniform(0.9, 1.15), zlo, zhi), 3)), s_in, s_in)
        if p.name == "acdc":
            label, params = acdc_geometry(rng, shp)
        else:
            label, params = wholeheart_geometry(rng, shp, spacing)
        problems = check_reference(label, p.name)
        if not problems:
            break
    else:
        raise RuntimeError(f"could not draw a valid {preset!r} phantom of shape {shp} in {_MAX_ATTEMPTS} "
                           f"attempts; last problems: {problems}")
    if p.name == "acdc":
        image, iparams = acdc_image(rng, label)
    else:
        image, iparams = ct_image(rng, label)
    size_mm = np.asarray(shp[::-1], float) * np.asarray(spacing[::-1])  # (x, y, z)
    origin = tuple(float(v) for v in np.round(-size_mm / 2 + rng.uniform(-20, 20, 3), 3))
    direction = tuple(np.eye(3).ravel().tolist())
    if oblique:
        direction = tuple(float(v) for v in _random_rotation(rng).ravel())
    params = dict(params, attempts=attempt + 1, **iparams)
    return Phantom(image=image, label=label, spacing=spacing, origin=origin,  # type: ignore[arg-type]
                   direction=direction, preset=p.name, labels=dict(p.labels), params=params)


def embed_phantom(ph: Phantom, canvas: Sequence[int], rng: SeedLike,
                  spacing: Optional[Sequence[float]] = None) -> Phantom:
    """The phantom placed off-centre in a larger ``canvas`` ``(Z, Y, X)`` (an image much larger than the heart, as
    a CT scan is): the heart block goes at a random offset in one corner region (the low third of every axis's free
    room, or the high third, per axis at random), the rest is background with the phantom's background intensity
    statistics (median and standard deviation of its label-0 voxels, Gaussian noise); label 0 outside. ``spacing``
    ``(z, y, x)`` mm replaces the phantom's voxel size (the arrays are unchanged; e.g. a coarse middle axis gives
    nnU-Net a non-identity ``transpose_forward``). The origin is moved so the heart stays where it was in world
    space (up to the new spacing)."""
    rng = as_generator(rng)
    canvas = tuple(int(c) for c in canvas)
    shape = ph.label.shape
    if len(canvas) != 3 or any(c < s for c, s in zip(canvas, shape)):
        raise ValueError(f"canvas {list(canvas)} must be 3 sizes >= the phantom's shape {list(shape)}")
    offset = []
    for c, s in zip(canvas, shape):
        room = c - s
        third = room // 3
        lo = int(rng.integers(0, third + 1))
        offset.append(lo if rng.random() < 0.5 else room - lo)
    bg = ph.image[ph.label == 0]
    med, sd = (float(np.median(bg)), float(np.std(bg))) if bg.size else (0.0, 1.0)
    image = (med + sd * rng.standard_normal(canvas)).astype(np.float32)
    label = np.zeros(canvas, np.uint8)
    sl = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    image[sl] = ph.image
    label[sl] = ph.label
    sp = tuple(float(v) for v in (ph.spacing if spacing is None else spacing))
    d = np.asarray(ph.direction, float).reshape(3, 3)
    shift_xyz = np.asarray(offset[::-1], float) * np.asarray(sp[::-1])
    origin = tuple(float(v) for v in np.asarray(ph.origin, float) - d @ shift_xyz)
    params = dict(ph.params, canvas=list(canvas), heart_offset=offset)
    return Phantom(image=image, label=label, spacing=sp, origin=origin, direction=ph.direction,  # type: ignore
                   preset=ph.preset, labels=dict(ph.labels), params=params)
