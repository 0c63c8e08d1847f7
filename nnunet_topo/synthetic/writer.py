"""Writing phantoms to disk: one case as NIfTI (:func:`save_phantom`) and a whole nnU-Net v2 raw dataset
(:func:`write_dataset`: ``imagesTr``/``labelsTr``/``imagesTs``/``labelsTs`` and a ``dataset.json`` with the preset's
``topology`` block), written atomically and overwritten only when it carries this generator's marker.

This module does not import nnU-Net; SimpleITK is used only to write images.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from numbers import Integral
from typing import Any, Optional, Sequence, Union

import numpy as np

from nnunet_topo.synthetic.phantom import Phantom, embed_phantom, make_phantom
from nnunet_topo.synthetic.presets import check_preset, check_shape, topology_block

#: marker written into dataset.json; ``write_dataset(..., overwrite=True)`` only replaces folders carrying it
_MARKER_KEY = "nnunet_topo_synthetic"


def _sitk_image(array: np.ndarray, ph: Phantom):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in ph.spacing[::-1]))
    img.SetOrigin(tuple(float(o) for o in ph.origin))
    img.SetDirection(tuple(float(d) for d in ph.direction))
    return img


def save_phantom(ph: Phantom, image_path: Union[str, os.PathLike], label_path: Union[str, os.PathLike]) -> None:
    """Write a phantom's image (float32) and label (uint8) with its spacing, origin and direction."""
    import SimpleITK as sitk

    sitk.WriteImage(_sitk_image(ph.image, ph), os.fspath(image_path), useCompression=True)
    sitk.WriteImage(_sitk_image(ph.label.astype(np.uint8), ph), os.fspath(label_path), useCompression=True)


def _json_dumps(obj: Any, indent: int = 0) -> str:
    """JSON with 2-space indentation, but lists of scalars on one line (readable topology blocks)."""
    pad, pad2 = " " * indent, " " * (indent + 2)
    flat = isinstance(obj, dict) and all(
        not isinstance(v, (dict, list, tuple)) or (isinstance(v, (list, tuple))
                                                   and not any(isinstance(x, (dict, list, tuple)) for x in v))
        for v in obj.values())
    if flat and len(json.dumps(obj)) <= 100:  # e.g. a rule: one line
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_json_dumps(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, dict) and obj:
        items = [f"{pad2}{json.dumps(str(k))}: {_json_dumps(v, indent + 2)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, (list, tuple)) and obj and any(isinstance(v, (dict, list, tuple)) for v in obj):
        return "[\n" + ",\n".join(pad2 + _json_dumps(v, indent + 2) for v in obj) + "\n" + pad + "]"
    if isinstance(obj, (list, tuple)):
        return "[" + ", ".join(json.dumps(v) for v in obj) + "]"
    return json.dumps(obj)


def _is_ours(folder: pathlib.Path) -> bool:
    try:
        with open(folder / "dataset.json", "r", encoding="utf-8") as f:
            return _MARKER_KEY in json.load(f)
    except (OSError, ValueError):
        return False


def write_dataset(raw_root: Union[str, os.PathLike], dataset_id: int, preset: str = "acdc",
                  num_training: int = 10, num_test: int = 4, seed: int = 0,
                  shape: Optional[Sequence[int]] = None, name: Optional[str] = None, oblique: bool = False,
                  overwrite: bool = False, canvas: Optional[Sequence[int]] = None,
                  spacing: Optional[Sequence[float]] = None) -> pathlib.Path:
    """Write a synthetic nnU-Net v2 raw dataset ``raw_root/Dataset{ID:03d}_{name}/``.

    Layout: ``imagesTr/{case}_0000.nii.gz``, ``labelsTr/{case}.nii.gz``, ``imagesTs/``, ``labelsTs/`` (test
    references, for evaluation) and ``dataset.json`` (``channel_names``, ``labels``, ``numTraining``,
    ``file_ending``, the preset's ``topology`` block, a description saying the data are synthetic, and the
    generator settings under ``"nnunet_topo_synthetic"``). Case ``i`` (training first, then test) is drawn
    with seed ``(seed, i)``, so a case does not depend on how many others are written. The folder is built
    under a temporary name and renamed at the end, so a crash never leaves a half-written dataset behind.

    Args:
        raw_root: the nnU-Net raw folder (``$nnUNet_raw``); created if missing.
        dataset_id: 1..999.
        preset: ``"acdc"`` or ``"wholeheart"``.
        num_training: training cases (>= 5: nnU-Net's 5-fold cross-validation needs five).
        num_test: test cases (>= 0) in ``imagesTs``/``labelsTs``.
        seed: base seed.
        shape: ``(Z, Y, X)`` of every case (default: the preset's default shape).
        name: dataset name (default ``SynthACDC`` / ``SynthWholeHeart``); letters, digits, ``-`` and ``_``.
        oblique: give every case a random non-identity direction matrix.
        canvas: ``(Z, Y, X)``: place each phantom off-centre in an image of this size (:func:`embed_phantom`;
            CT-like cases much larger than the heart).
        spacing: ``(z, y, x)`` mm for every case instead of the preset's random voxel size.
        overwrite: replace an existing dataset with this ID, if it was written by this function (its
            dataset.json carries the ``"nnunet_topo_synthetic"`` marker). Nothing else is ever deleted.

    Returns:
        Path of the dataset folder.

    Raises:
        FileExistsError: a ``Dataset{ID:03d}_*`` folder exists and ``overwrite`` is False, or it exists but
            was not written by this generator, or it has another name (nnU-Net needs unique IDs).
        ValueError: bad arguments (the message says which and what is allowed).
    """
    p = check_preset(preset)
    if not isinstance(dataset_id, Integral) or isinstance(dataset_id, bool) or not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be an integer in 1..999 (nnU-Net's Dataset{{ID:03d}} naming), "
                         f"got {dataset_id!r}")
    if not isinstance(num_training, Integral) or isinstance(num_training, bool) or num_training < 5:
        raise ValueError(f"num_training must be an integer >= 5: nnU-Net's default 5-fold cross-validation "
                         f"split needs at least 5 training cases, got {num_training!r}")
    if not isinstance(num_test, Integral) or isinstance(num_test, bool) or num_test < 0:
        raise ValueError(f"num_test must be an integer >= 0, got {num_test!r}")
    if not isinstance(seed, Integral) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    shp = check_shape(p, shape)
    name = p.dataset_name if name is None else name
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ValueError(f"name must be a non-empty string of letters, digits, '-' and '_', got {name!r}")

    root = pathlib.Path(raw_root)
    folder_name = f"Dataset{int(dataset_id):03d}_{name}"
    target = root / folder_name
    existing = sorted(root.glob(f"Dataset{int(dataset_id):03d}_*")) if root.is_dir() else []
    for ex in existing:
        if not overwrite:
            raise FileExistsError(
                f"{ex} already exists (dataset ID {int(dataset_id):03d} is taken). Pass overwrite=True "
                f"(--overwrite on the command line) to replace it, or choose another dataset_id.")
        if ex.name != folder_name:
            raise FileExistsError(
                f"{ex} already uses dataset ID {int(dataset_id):03d} under another name; nnU-Net needs unique IDs "
                f"and overwrite only replaces a synthetic dataset named {folder_name}. Remove or rename {ex} "
                "yourself, or choose another dataset_id.")
        if not _is_ours(ex):
            raise FileExistsError(
                f"{ex} exists but was not written by nnunet_topo.synthetic (no {_MARKER_KEY!r} key in its "
                "dataset.json); refusing to delete it even with overwrite=True. Remove it yourself or choose "
                "another dataset_id.")

    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{folder_name}.tmp-", dir=root))
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (tmp / sub).mkdir()
        cases = []
        for i in range(num_training + num_test):
            case = f"{p.case_prefix}_{i:03d}"
            rng = np.random.default_rng((int(seed), i))
            ph = make_phantom(p.name, rng, shp, oblique=oblique)
            if canvas is not None or spacing is not None:
                ph = embed_phantom(ph, shp if canvas is None else canvas, rng, spacing)
            split = "Tr" if i < num_training else "Ts"
            save_phantom(ph, tmp / f"images{split}" / f"{case}_0000.nii.gz", tmp / f"labels{split}" / f"{case}.nii.gz")
            cases.append(case)
        dataset_json = {
            "name": name,
            "description": p.description + " generated by nnunet_topo.synthetic; synthetic data, no patient data.",
            "reference": "synthetic phantom (nnunet_topo.synthetic), not a clinical dataset",
            "licence": "CC0 (synthetic)",
            "channel_names": {"0": p.channel_name},
            "labels": dict(p.labels),
            "numTraining": int(num_training),
            "numTest": int(num_test),
            "file_ending": ".nii.gz",
            "overwrite_image_reader_writer": "SimpleITKIO",
            "topology": topology_block(p.name),
            _MARKER_KEY: {"preset": p.name, "seed": int(seed), "shape": list(shp), "oblique": bool(oblique),
                          "canvas": None if canvas is None else [int(c) for c in canvas],
                          "spacing": None if spacing is None else [float(v) for v in spacing],
                          "training_cases": cases[:num_training], "test_cases": cases[num_training:]},
        }
        with open(tmp / "dataset.json", "w", encoding="utf-8") as f:
            f.write(_json_dumps(dataset_json) + "\n")
        if target.exists():  # overwrite=True and checked above: it is ours
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
