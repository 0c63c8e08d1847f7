"""The image appearance of the phantoms: intensities painted per tissue on a reference label map, then blur, a
smooth multiplicative bias field and Gaussian noise (float32).

``acdc``: bSSFP-like cine MRI, arbitrary units (bright blood, dark myocardium, textured body, air outside);
``wholeheart``: contrast CT in HU (enhanced left heart, less enhanced right heart, textured chest). The value ranges
are tabulated in ``documentation/synthetic_data.md`` (Images).
"""
from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import numpy as np
from scipy import ndimage

from nnunet_topo.synthetic.presets import PRESETS, Shape3

def _smooth_noise(rng: np.random.Generator, shape: Shape3, sigma: Sequence[float]) -> np.ndarray:
    """Zero-mean, unit-std Gaussian-filtered white noise ``(Z, Y, X)``."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return (n - n.mean()) / (n.std() + 1e-8)


def acdc_image(rng: np.random.Generator, label: np.ndarray) -> Tuple[np.ndarray, Dict[str, Any]]:
    """bSSFP-like intensities (arbitrary units): bright blood, dark myocardium, textured body, air outside."""
    Z, Y, X = label.shape
    lab = PRESETS["acdc"].labels
    zi = np.arange(Z)[:, None, None]
    yi = np.arange(Y)[None, :, None]
    xi = np.arange(X)[None, None, :]
    # body: a large ellipse, tissue texture and blobs (lung dark, fat bright, liver grey)
    by, bx = rng.uniform(0.42, 0.55) * Y, rng.uniform(0.42, 0.55) * X
    body = ((yi - Y / 2 + rng.uniform(-2, 2)) / by) ** 2 + ((xi - X / 2 + rng.uniform(-2, 2)) / bx) ** 2 <= 1
    tissue = 0.32 + 0.08 * _smooth_noise(rng, label.shape, (0.7, 4.0, 4.0))
    for _ in range(int(rng.integers(5, 10))):
        c = rng.uniform([0, 0, 0], [Z, Y, X])
        rr = rng.uniform([1.0, 3.0, 3.0], [3.0, 0.25 * Y, 0.25 * X])
        val = rng.choice([rng.uniform(0.02, 0.1), rng.uniform(0.6, 0.85), rng.uniform(0.35, 0.5)])
        blob = ((zi - c[0]) / rr[0]) ** 2 + ((yi - c[1]) / rr[1]) ** 2 + ((xi - c[2]) / rr[2]) ** 2 <= 1
        tissue = np.where(blob, val, tissue)
    # the body always contains the heart with a margin of tissue
    heart = ndimage.distance_transform_edt(~(label != 0).any(axis=0)) <= 0.1 * min(Y, X)
    img = np.where(np.broadcast_to(body | heart[None], label.shape), tissue, 0.02)
    blood = rng.uniform(0.85, 1.0)
    vals = {"LV": blood, "RV": blood * rng.uniform(0.9, 1.0), "MYO": rng.uniform(0.22, 0.32)}
    for name, val in vals.items():
        img = np.where(label == lab[name], val, img)
    blur = (rng.uniform(0.2, 0.4), rng.uniform(0.5, 0.9), rng.uniform(0.5, 0.9))
    img = ndimage.gaussian_filter(img, blur)
    bias_amp = rng.uniform(0.1, 0.2)
    img = img * np.exp(bias_amp * _smooth_noise(rng, label.shape, (Z / 2, Y / 3, X / 3)))
    noise = rng.uniform(0.03, 0.06)
    scale = rng.uniform(300, 800)
    img = (img + rng.normal(0, noise, label.shape)) * scale
    return img.astype(np.float32), dict(blood=blood, myo=vals["MYO"], blur_vox=blur, bias_amp=bias_amp,
                                        noise_rel=noise, scale=scale)


def ct_image(rng: np.random.Generator, label: np.ndarray) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Contrast-CT-like intensities in HU: enhanced left heart, less enhanced right heart, textured chest."""
    Z, Y, X = label.shape
    lab = PRESETS["wholeheart"].labels
    zi = np.arange(Z)[:, None, None]
    yi = np.arange(Y)[None, :, None]
    xi = np.arange(X)[None, None, :]
    img = 40.0 + 35.0 * _smooth_noise(rng, label.shape, (4.0, 4.0, 4.0))
    for _ in range(int(rng.integers(6, 12))):
        c = rng.uniform([0, 0, 0], [Z, Y, X])
        rr = rng.uniform(3.0, 0.3 * min(Z, Y, X), size=3)
        val = rng.choice([rng.uniform(-850, -600), rng.uniform(-120, -60), rng.uniform(20, 80)])
        blob = ((zi - c[0]) / rr[0]) ** 2 + ((yi - c[1]) / rr[1]) ** 2 + ((xi - c[2]) / rr[2]) ** 2 <= 1
        img = np.where(blob, val, img)
    left = rng.uniform(280, 420)
    right = left * rng.uniform(0.7, 0.95)
    vals = {"LV": left, "LA": left * rng.uniform(0.92, 1.0), "AO": left * rng.uniform(0.97, 1.05),
            "RV": right, "RA": right * rng.uniform(0.95, 1.05), "MYO": rng.uniform(90, 140)}
    for name, val in vals.items():
        img = np.where(label == lab[name], val, img)
    blur = float(rng.uniform(0.5, 0.9))
    img = ndimage.gaussian_filter(img, blur)
    bias_amp = rng.uniform(0.02, 0.05)
    img = (img + 1000.0) * np.exp(bias_amp * _smooth_noise(rng, label.shape, (Z / 3, Y / 3, X / 3))) - 1000.0
    noise = rng.uniform(12, 30)
    img = img + rng.normal(0, noise, label.shape)
    return img.astype(np.float32), dict(blood_left=left, blood_right=right, myo=vals["MYO"], blur_vox=blur,
                                        bias_amp=bias_amp, noise_hu=noise)
