"""The heart geometry of the phantoms: a random reference label map per preset (no intensities).

* ``"acdc"``: the LV a tapered elliptic cylinder along Z, the MYO a ring around it on every LV slice (free wall 2–3
  voxels, septum 1–2 voxels), the RV a crescent wrapped around the septal side.
* ``"wholeheart"``: an ellipsoidal LV cavity in a MYO shell that opens only into the LA (mitral) and the AO
  (aortic), the RV crescent beside a thin septum, LA/RA above the ventricles, the AO a tube leaving the LV.

Geometry is built in two steps so that thin walls can never alias away: the *cavities* are rasterised from smooth
implicit shapes (ellipses/ellipsoids/a capsule, randomly deformed by a low-frequency displacement field, rotated,
scaled and placed), and every wall is then made by *discrete* morphology on the voxel grid (the MYO is a dilation of
the LV; the RV is kept out of the ``t``-fold 6-connected dilation of the LV, so the septum is exactly ``t`` voxels at
its thinnest). ``documentation/synthetic_data.md`` gives the parameters and why each preset's topology holds.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from nnunet_topo.synthetic.presets import PRESETS, Shape3

_S6 = ndimage.generate_binary_structure(3, 1)
_S26 = ndimage.generate_binary_structure(3, 3)
_S4_2D = ndimage.generate_binary_structure(2, 1)
_S8_2D = ndimage.generate_binary_structure(2, 2)


def _disk(radius: float) -> np.ndarray:
    """In-plane disk structuring element of shape ``(1, 2r+1, 2r+1)``."""
    r = int(math.floor(radius))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy ** 2 + xx ** 2 <= radius ** 2 + 1e-9)[None]


def _ball(radius: float) -> np.ndarray:
    r = int(math.floor(radius))
    zz, yy, xx = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1]
    return zz ** 2 + yy ** 2 + xx ** 2 <= radius ** 2 + 1e-9


_CROSS_2D = ndimage.generate_binary_structure(2, 1)[None]  # (1, 3, 3) in-plane 4-neighbourhood


def _dilate(mask: np.ndarray, structure: np.ndarray, iterations: int = 1) -> np.ndarray:
    if iterations <= 0:
        return mask.copy()
    return ndimage.binary_dilation(mask, structure, iterations=iterations)


def _largest_component(mask: np.ndarray, structure: np.ndarray = _S6) -> np.ndarray:
    lab, n = ndimage.label(mask, structure)
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (int(np.argmax(sizes)) + 1)


def _fourier_field(rng: np.random.Generator, coords: Sequence[np.ndarray], fmax: Sequence[float],
                   amplitude: float, n_modes: int = 3) -> np.ndarray:
    """A smooth random scalar field: sum of ``n_modes`` plane waves, ``|field| <= amplitude``.

    Args:
        coords: broadcastable coordinate arrays (one per dimension).
        fmax: largest frequency (cycles per coordinate unit) per dimension.
        amplitude: bound of the field.
    """
    out = 0.0
    for _ in range(n_modes):
        phase = rng.uniform(0, 2 * math.pi)
        arg = phase
        for c, f in zip(coords, fmax):
            arg = arg + 2 * math.pi * rng.uniform(-f, f) * c
        out = out + (amplitude / n_modes) * rng.uniform(0.5, 1.0) * np.sin(arg)
    return out


def _rotation(axis: Sequence[float], angle: float) -> np.ndarray:
    """Rodrigues rotation matrix about a unit ``axis`` by ``angle`` radians."""
    a = np.asarray(axis, dtype=float)
    a = a / np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _place(lo: np.ndarray, hi: np.ndarray, lower: np.ndarray, upper: np.ndarray,
           rng: np.random.Generator) -> Optional[np.ndarray]:
    """A random centre so that ``[centre + lo, centre + hi]`` lies in ``[lower, upper]`` (None if impossible)."""
    low = lower - lo
    high = upper - hi
    if np.any(high < low):
        return None
    return rng.uniform(low, high)


def acdc_geometry(rng: np.random.Generator, shape: Shape3) -> Tuple[np.ndarray, Dict[str, Any]]:
    """An ``acdc`` label map uint8 ``shape`` (RV 1, MYO 2, LV 3) and the parameters drawn."""
    Z, Y, X = shape
    lab = PRESETS["acdc"].labels
    n_inplane = min(Y, X)
    w_wall = int(rng.integers(2, 4))  # free wall 2-3 voxels
    t_sep = int(rng.integers(1, 3))  # septum 1-2 voxels at its thinnest
    theta = rng.uniform(0, 2 * math.pi)  # septal direction (LV -> RV) in the (Y, X) plane
    ecc = rng.uniform(0.0, 0.12)
    taper = rng.uniform(0.45, 0.6)  # apex radius / base radius
    power = rng.uniform(1.5, 2.5)  # radius profile r(t) = r0 (1 - (1 - taper) t^p), t = 0 base .. 1 apex
    dfac, afac, bfac = rng.uniform(0.7, 0.9), rng.uniform(1.0, 1.25), rng.uniform(1.5, 1.9)
    r0 = n_inplane * rng.uniform(0.11, 0.14)

    z_base = 1
    n_lv = Z - 2 - (int(rng.integers(0, 2)) if Z >= 8 else 0)
    n_rv = int(min(n_lv, max(2, round(n_lv * rng.uniform(0.6, 0.85)))))
    drift = rng.uniform(-0.35, 0.35, size=2)  # LV centre drift per slice (long-axis tilt), voxels

    e = np.array([math.cos(theta), math.sin(theta)])  # septal axis u in (y, x)
    eperp = np.array([-math.sin(theta), math.cos(theta)])  # v
    centre = None
    for _ in range(30):  # shrink until the heart fits
        amp = 0.15 * r0
        u_lo, u_hi = -(r0 * (1 + ecc) + w_wall + 1), r0 * (dfac + afac) + 1
        v_ext = max(r0 * bfac, r0 * (1 + ecc) + w_wall + 1)
        corners = np.array([u * e + v * eperp for u in (u_lo, u_hi) for v in (-v_ext, v_ext)])
        dz = drift * (n_lv - 1)
        lo = corners.min(0) + np.minimum(dz, 0)
        hi = corners.max(0) + np.maximum(dz, 0)
        margin = 1.5 + amp
        centre = _place(lo, hi, np.full(2, margin), np.array([Y - 1, X - 1], float) - margin, rng)
        if centre is not None:
            break
        r0 *= 0.93
    if centre is None:
        raise RuntimeError(f"acdc phantom does not fit into shape {shape}")
    if r0 < 3.0:
        raise RuntimeError(f"shape {shape} is too small for an acdc phantom (LV radius {r0:.1f} < 3 voxels)")

    zi = np.arange(Z, dtype=float)[:, None, None]
    yi = np.arange(Y, dtype=float)[None, :, None]
    xi = np.arange(X, dtype=float)[None, None, :]
    wl = 1.0 / (3.0 * r0)  # displacement wavelength >= 3 r0
    fz = 0.04
    dy = _fourier_field(rng, (zi, yi, xi), (fz, wl, wl), 0.15 * r0)
    dx = _fourier_field(rng, (zi, yi, xi), (fz, wl, wl), 0.15 * r0)

    k = zi - z_base  # LV slice index (0 at the base)
    in_lv = (k >= 0) & (k < n_lv)
    t = np.clip(k / max(n_lv - 1, 1), 0, 1)
    r = np.maximum(r0 * (1 - (1 - taper) * t ** power), 2.0)
    cy = centre[0] + drift[0] * k
    cx = centre[1] + drift[1] * k
    py = yi + dy - cy
    px = xi + dx - cx
    u = py * e[0] + px * e[1]
    v = py * eperp[0] + px * eperp[1]
    lv = in_lv & ((u / (r * (1 + ecc))) ** 2 + (v / (r * (1 - ecc))) ** 2 <= 1.0)

    # RV crescent candidate: an ellipse on the septal side that overlaps the LV, so that after removing the
    # LV neighbourhood it wraps around the septum; it shrinks (lam) towards its apical end.
    in_rv = (k >= 0) & (k < n_rv)
    half = max((n_rv - 1) / 2.0, 1.0)
    lam = 1.0 - 0.2 * np.clip((k - half) / half, 0, 1)
    rvc = in_rv & (((u - dfac * r) / (afac * r * lam)) ** 2 + (v / (bfac * r * lam)) ** 2 <= 1.0)

    # Walls by discrete morphology. The RV stays out of the t_sep-fold in-plane 4-dilation of the LV (a septum
    # of exactly t_sep voxels at its thinnest) and out of the 4-dilated LV of the neighbouring slices (3D
    # 6-exclusion). The MYO of a slice also covers the 4-dilated LV of its neighbours, so consecutive MYO rings
    # overlap (face to face) in a closed ring around both LV cross-sections: the stack is one tube, b1 = 1,
    # with no extra tunnels where the LV tapers. The septum stays thin where the LV does not taper (the base).
    lv_nb = np.zeros_like(lv)
    lv_nb[:-1] |= lv[1:]
    lv_nb[1:] |= lv[:-1]
    lv_nb = _dilate(lv_nb, _CROSS_2D)
    rv = rvc & ~_dilate(lv, _CROSS_2D, t_sep) & ~lv_nb
    rv = _largest_component(rv, _S6)
    myo = (_dilate(lv, _disk(w_wall)) | (lv_nb & in_lv)) & ~lv & ~rv
    # in-plane pockets enclosed by the MYO other than the LV (single RV voxels at the crescent tips) -> MYO
    for z in np.flatnonzero(lv.any(axis=(1, 2))):
        comp, _ = ndimage.label(np.pad(~myo[z], 1, constant_values=True), _S4_2D)
        keep = np.unique(np.concatenate([comp[0], comp[-1], comp[:, 0], comp[:, -1], comp[1:-1, 1:-1][lv[z]]]))
        pocket = ((comp > 0) & ~np.isin(comp, keep))[1:-1, 1:-1]
        myo[z] |= pocket
        rv[z] &= ~pocket
    # drop MYO bits cut off from the ring by the RV (they would be extra 2D components)
    lab2d = np.zeros_like(myo)
    for z in range(Z):
        if myo[z].any():
            comp, n = ndimage.label(myo[z], _S8_2D)
            touching = np.unique(comp[_dilate(lv[z][None], _CROSS_2D)[0] & myo[z]])
            lab2d[z] = np.isin(comp, touching[touching > 0])
    myo = lab2d

    label = np.zeros(shape, dtype=np.uint8)
    label[myo] = lab["MYO"]
    label[rv] = lab["RV"]
    label[lv] = lab["LV"]
    params = dict(w_wall=w_wall, t_sep=t_sep, theta_rad=theta, r0_vox=float(r0), taper=taper, ecc=ecc,
                  lv_slices=(z_base, z_base + n_lv - 1), rv_slices=(z_base, z_base + n_rv - 1))
    return label, params


# canonical layout in units of the LV short radius R; u: LV -> RV (septal axis), v: anterior, w: apex -> base
_WH_LAYOUT = {
    "LV": dict(c=(0.0, 0.0, 0.0), s=(1.0, 0.92, 1.55)),
    "LA": dict(c=(-0.25, -0.4, 1.75), s=(0.72, 0.6, 0.72)),
    "RV": dict(c=(1.0, 0.15, 0.05), s=(1.1, 1.25, 1.2)),
    "RA": dict(c=(1.35, -0.35, 1.8), s=(0.68, 0.6, 0.7)),
    "AO": dict(p0=(0.35, 0.4, 0.8), d=(0.15, 0.45, 1.0), w_end=2.1, r=0.27),
}
_WH_BOX = np.array([[-1.05, 2.15], [-1.15, 1.45], [-1.6, 2.4]])  # canonical bounding box (u, v, w), units of R


def _ellipsoid(q: Sequence[np.ndarray], c: Sequence[float], s: Sequence[float]) -> np.ndarray:
    return sum(((qi - ci) / si) ** 2 for qi, ci, si in zip(q, c, s)) <= 1.0


def _capsule(q: Sequence[np.ndarray], p0: np.ndarray, p1: np.ndarray, radius: float) -> np.ndarray:
    d = p1 - p0
    t = sum((qi - p0[i]) * d[i] for i, qi in enumerate(q)) / float(d @ d)
    t = np.clip(t, 0.0, 1.0)
    return sum((qi - (p0[i] + t * d[i])) ** 2 for i, qi in enumerate(q)) <= radius ** 2


def wholeheart_geometry(rng: np.random.Generator, shape: Shape3,
                         spacing: Tuple[float, float, float]) -> Tuple[np.ndarray, Dict[str, Any]]:
    """A ``wholeheart`` label map uint8 ``shape`` (LV 1, MYO 2, RV 3, LA 4, RA 5, AO 6; placed in mm with
    ``spacing``) and the parameters drawn."""
    Z, Y, X = shape
    lab = PRESETS["wholeheart"].labels
    sp = np.asarray(spacing, float)

    # orientation: spin about the long axis, then tilt the long axis away from +Z (array axis 0)
    spin = rng.uniform(0, 2 * math.pi)
    tilt = math.radians(rng.uniform(0, 20))
    az = rng.uniform(0, 2 * math.pi)
    m0 = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # columns u, v, w in (z, y, x)
    rot = _rotation((0.0, math.cos(az), math.sin(az)), tilt) @ _rotation((1.0, 0.0, 0.0), spin) @ m0

    jit = {k: rng.uniform(0.92, 1.08, size=3) for k in ("LV", "LA", "RV", "RA")}
    deform_amp = 0.07
    corners = np.array([[a, b, c] for a in _WH_BOX[0] for b in _WH_BOX[1] for c in _WH_BOX[2]])
    ext = corners @ rot.T  # (8, 3) physical offsets per unit R, mm
    size_mm = (np.asarray(shape) - 1) * sp
    margin_mm = 4.0 * sp  # the MYO wall (<= 3 voxels) + 1 voxel of background
    r_fit = np.min((size_mm - 2 * margin_mm) / ((ext.max(0) - ext.min(0)) * (1 + deform_amp)))
    if r_fit <= 0:
        raise RuntimeError(f"shape {shape} is too small for a wholeheart phantom")
    R = r_fit * rng.uniform(0.9, 1.0)  # mm
    r_vox = R / sp.mean()
    if r_vox < 3.5:
        raise RuntimeError(f"shape {shape} is too small for a wholeheart phantom (LV radius {r_vox:.1f} voxels)")
    w_wall = 3 if (r_vox >= 6.0 and rng.uniform() < 0.5) else 2
    t_sep = int(rng.integers(1, 3))
    lo = ext.min(0) * R * (1 + deform_amp)
    hi = ext.max(0) * R * (1 + deform_amp)
    centre = _place(lo, hi, margin_mm, size_mm - margin_mm, rng)
    if centre is None:  # cannot happen given r_fit, kept as a guard
        raise RuntimeError(f"wholeheart phantom does not fit into shape {shape}")

    pz = (np.arange(Z) * sp[0] - centre[0])[:, None, None]
    py = (np.arange(Y) * sp[1] - centre[1])[None, :, None]
    px = (np.arange(X) * sp[2] - centre[2])[None, None, :]
    q = [(rot[0, i] * pz + rot[1, i] * py + rot[2, i] * px) / R for i in range(3)]  # canonical coords (R)
    fmax = (1 / 3.0, 1 / 3.0, 1 / 3.0)
    q = [qi + _fourier_field(rng, q, fmax, deform_amp) for qi in q]

    def ell(key: str) -> np.ndarray:
        spec = _WH_LAYOUT[key]
        return _ellipsoid(q, spec["c"], np.asarray(spec["s"]) * jit[key])

    ao = _WH_LAYOUT["AO"]
    p0 = np.asarray(ao["p0"], float)
    d = np.asarray(ao["d"], float)
    d = d / d[2]
    p1 = p0 + d * (ao["w_end"] - p0[2])
    ao_r = max(ao["r"] * rng.uniform(0.9, 1.1), 1.6 * sp.max() / R)

    lv = ell("LV")
    aor = _capsule(q, p0, p1, ao_r)
    ball2 = _ball(2)
    # LA keeps 2 voxels from the AO, so the mitral and aortic openings of the MYO shell are separate
    la = ell("LA") & ~lv & ~_dilate(aor, ball2)
    ao_m = aor & ~lv
    # RV and RA keep out of the 26-neighbourhood of the LV (then t_sep - 1 more 6-steps for the RV): a MYO
    # layer that is only 6-thick around corners would add spurious tunnels to the MYO
    lv_26 = _dilate(lv, _S26)
    rv = ell("RV") & ~_dilate(lv_26, _S6, t_sep - 1) & ~_dilate(la, _S6) & ~ao_m
    rv = _largest_component(rv)
    ra = ell("RA") & ~lv_26 & ~_dilate(la, _S6, 2) & ~ao_m & ~rv
    ra = _largest_component(ra)
    myo = _dilate(lv, _ball(w_wall)) & ~lv & ~la & ~ao_m & ~rv & ~ra
    # Let the RV grow (geodesically, w_wall steps) into the MYO it may occupy: this removes thin MYO arches
    # left over the cavity where its ellipsoid grazes the wall (each arch is a spurious MYO tunnel). (The same
    # for the RA made more RA tunnels than it removed MYO ones; the self-check redraws those rare cases.)
    rv_ok = myo & ~_dilate(lv_26, _S6, t_sep - 1) & ~_dilate(la, _S6)
    for _ in range(w_wall):
        rv |= _dilate(rv, _S6) & rv_ok
    myo &= ~rv
    # keep only the MYO components that touch the LV
    comp, n = ndimage.label(myo, _S26)
    touching = np.unique(comp[_dilate(lv, _S6) & myo])
    myo = np.isin(comp, touching[touching > 0])

    label = np.zeros(shape, dtype=np.uint8)
    label[myo] = lab["MYO"]
    label[ra] = lab["RA"]
    label[rv] = lab["RV"]
    label[la] = lab["LA"]
    label[ao_m] = lab["AO"]
    label[lv] = lab["LV"]
    params = dict(w_wall=w_wall, t_sep=t_sep, R_mm=float(R), R_vox=float(r_vox), tilt_deg=math.degrees(tilt),
                  spin_rad=spin, axes_zyx=rot.tolist())
    return label, params
