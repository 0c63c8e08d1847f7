#!/usr/bin/env python
"""Convert the ACDC cine-MRI volumes in WSL4MIS's h5 form into a standard nnU-Net raw dataset (example, not API).

Input: a folder of ``patientNNN_frameFF.h5`` files with keys ``image`` (float, (slices, rows, cols)) and ``label``
(uint8: 0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity), as in ``../shared/data/acdc`` (see its README for
the terms: research use, cite Bernard et al., IEEE TMI 2018).

Output: ``RAW/DatasetNNN_NAME/{imagesTr,labelsTr}`` (NIfTI, written with SimpleITK one case at a time) and a
``dataset.json`` with labels ``RV``/``MYO``/``LV`` and a ``topology`` block that holds on every ACDC reference
(``nnUNetv2_topo_check_rules`` reports so; measured on all 200 volumes, see documentation/results.md):

* 2D rules along the short-axis slice axis 0: ``exclusion(LV,RV)`` and the inclusion of the LV cavity in the
  epicardium ``LV+MYO``, each with ``"exempt_end_slices": 1``: in 9 of the 200 references the first slice in which
  the LV appears (the basal slice, where the cavity opens towards the atrium) breaks them by 2-34 voxels; no other
  slice does.
* per-slice Betti priors as allowed sets (what the references show): LV and LV+MYO one disc ``[1, 0]``; MYO a ring
  ``[1, 1]``, or at the base an open C ``[1, 0]`` or two pieces ``[2, 0]``; RV ``[1, 0]`` or two pieces ``[2, 0]``.
* 3D prior only for the epicardial region ``LV_epi = LV+MYO`` ``[1, 0, 0]``: with 10 mm slices the references' 3D
  Betti numbers of MYO and RV are staircase artefacts (MYO has 0-40 tunnels), so no 3D prior is stated for them.
* mesh structures ``LV_endo`` (LV), ``LV_epi`` (LV+MYO), ``RV``, and two mesh rules: ``mesh_exclusion(RV,LV_epi)``
  (the RV touches the myocardium, so no voxel rule between RV and MYO can hold, but the RV mesh must never enter
  the LV epicardial mesh: that is septal penetration) and ``mesh_inclusion(LV_endo in LV_epi)``. Both hold on the
  label maps by construction (RV and LV+MYO share no label; LV is part of LV+MYO) and on the reference meshes
  (``mesh_from_mask`` of each region, all 200 references): the inclusion with 0 mm³ everywhere, the exclusion with
  0 mm³ in 175 cases and a marching-cubes artefact of 2-8 mm³ in 25 (documentation/topology_spec.md).

The h5 files carry no spacing. The converter writes ``--spacing`` (default 10 x 1.5 x 1.5 mm, (Z, Y, X): ACDC's
typical values; the published ranges are 5-10 mm between slices and 1.37-1.68 mm in-plane) into every image and
states it in dataset.json's ``description``. Topology measured slice by slice does not depend on it; millimetre
metrics (HD95, Chamfer) do, in proportion.

The 5-fold split is nnU-Net's own for ACDC (``nnunetv2.dataset_conversion.Dataset027_ACDC.create_ACDC_split``: by
patient, so both phases of a patient are in the same fold), written to ``$nnUNet_preprocessed/DatasetNNN_NAME/
splits_final.json`` unless a split is already there (then it is left as it is, and the converter says so).

Usage::

    python examples/acdc/convert_acdc_h5.py -i ../shared/data/acdc -d 127 [--num_cases 40] [--spacing 10 1.5 1.5]

An existing dataset folder is never overwritten unless it was written by this converter and ``--overwrite`` is given.
"""
import argparse
import json
import os
import re
import shutil
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

MARKER = ".written_by_convert_acdc_h5"
LABELS = {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
CASE_RE = re.compile(r"^(patient\d{3})_frame\d{2}\.h5$")


def acdc_topology() -> dict:
    """The ``topology`` block for ACDC (see the module docstring for why each entry is what it is)."""
    return {
        "connectivity": 6,
        "structures": {"LV_epi": ["LV", "MYO"]},
        "rules": [
            {"type": "exclusion", "a": "LV", "b": "RV", "mode": "2d", "axis": 0, "exempt_end_slices": 1},
            {"type": "inclusion", "inner": "LV", "outer": "LV_epi", "mode": "2d", "axis": 0,
             "exempt_end_slices": 1},
        ],
        "betti": {"LV_epi": [1, 0, 0]},
        "betti_2d": {"axis": 0, "LV": [1, 0], "LV_epi": [1, 0], "MYO": [[1, 1], [1, 0], [2, 0]],
                     "RV": [[1, 0], [2, 0]]},
        "mesh_structures": {"LV_endo": ["LV"], "LV_epi": ["LV", "MYO"], "RV": ["RV"]},
        "mesh_rules": [
            {"type": "mesh_exclusion", "meshes": ["RV", "LV_epi"]},
            {"type": "mesh_inclusion", "inner": "LV_endo", "outer": "LV_epi"},
        ],
    }


def list_cases(input_folder: str, num_cases: Optional[int] = None) -> List[str]:
    """Sorted ``patientNNN_frameFF.h5`` file names of ``input_folder`` (the first ``num_cases`` if given)."""
    if not os.path.isdir(input_folder):
        raise SystemExit(f"error: input folder {input_folder!r} does not exist")
    names = sorted(n for n in os.listdir(input_folder) if CASE_RE.match(n))
    if not names:
        raise SystemExit(f"error: no patientNNN_frameFF.h5 files in {input_folder!r}")
    if num_cases is not None:
        if num_cases < 1:
            raise SystemExit(f"error: --num_cases must be >= 1, got {num_cases}")
        names = names[:num_cases]
    return names


def read_case(path: str) -> Dict[str, np.ndarray]:
    """Image and label of one h5 file, checked: same 3D shape, finite image, labels within 0..3."""
    import h5py

    with h5py.File(path, "r") as f:
        missing = [k for k in ("image", "label") if k not in f]
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}; expected 'image' and 'label'")
        image = np.asarray(f["image"][()], dtype=np.float32)
        label = np.asarray(f["label"][()])
    if image.ndim != 3 or image.shape != label.shape:
        raise ValueError(f"{path}: image {image.shape} and label {label.shape} must be the same 3D shape")
    if not np.isfinite(image).all():
        raise ValueError(f"{path}: the image has NaN or infinite values")
    bad = np.setdiff1d(np.unique(label), list(LABELS.values()))
    if bad.size:
        raise ValueError(f"{path}: label values {bad.tolist()} outside {sorted(LABELS.values())}")
    return {"image": image, "label": label.astype(np.uint8)}


def write_nifti(array: np.ndarray, spacing_zyx: Sequence[float], path: str) -> None:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)  # array (Z, Y, X) -> ITK (x, y, z)
    img.SetSpacing([float(s) for s in reversed(spacing_zyx)])
    sitk.WriteImage(img, path, useCompression=True)


def write_split(dataset_name: str, labels_folder: str, preprocessed: Optional[str]) -> Optional[str]:
    """nnU-Net's ACDC split (by patient) into ``preprocessed/dataset_name/splits_final.json``, unless one exists."""
    if not preprocessed:
        print("nnUNet_preprocessed is not set: no splits_final.json written (nnU-Net would split cases at random, "
              "putting the two phases of a patient in different folds)")
        return None
    from nnunetv2.dataset_conversion.Dataset027_ACDC import create_ACDC_split

    target = os.path.join(preprocessed, dataset_name, "splits_final.json")
    if os.path.exists(target):
        print(f"kept the existing split {target}")
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "w") as f:
        json.dump(create_ACDC_split(labels_folder), f, indent=1)
    print(f"wrote nnU-Net's ACDC 5-fold split (by patient) to {target}")
    return target


def convert(input_folder: str, raw_folder: str, dataset_id: int, name: str = "ACDCh5",
            spacing: Sequence[float] = (10.0, 1.5, 1.5), num_cases: Optional[int] = None,
            overwrite: bool = False, preprocessed: Optional[str] = None) -> str:
    """Write the nnU-Net raw dataset; returns its folder. See the module docstring."""
    if not (1 <= dataset_id <= 999):
        raise SystemExit(f"error: dataset id must be 1..999, got {dataset_id}")
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise SystemExit(f"error: --spacing needs 3 positive numbers (Z Y X, mm), got {list(spacing)}")
    names = list_cases(input_folder, num_cases)
    dataset_name = f"Dataset{dataset_id:03d}_{name}"
    out = os.path.join(raw_folder, dataset_name)
    if os.path.exists(out):
        if not os.path.exists(os.path.join(out, MARKER)):
            raise SystemExit(f"error: {out} exists and was not written by this converter; choose another -d/--name")
        if not overwrite:
            raise SystemExit(f"error: {out} exists; pass --overwrite to write it again")
        shutil.rmtree(out)
    images, labels = os.path.join(out, "imagesTr"), os.path.join(out, "labelsTr")
    os.makedirs(images)
    os.makedirs(labels)
    open(os.path.join(out, MARKER), "w").close()
    for n in names:
        case = n[:-3]
        data = read_case(os.path.join(input_folder, n))
        write_nifti(data["image"], spacing, os.path.join(images, f"{case}_0000.nii.gz"))
        write_nifti(data["label"], spacing, os.path.join(labels, f"{case}.nii.gz"))
    z, y, x = (float(s) for s in spacing)
    dataset_json = {
        "channel_names": {"0": "cineMRI"},
        "labels": dict(LABELS),
        "numTraining": len(names),
        "file_ending": ".nii.gz",
        "name": name,
        "description": (f"ACDC cine MRI (Bernard et al., IEEE TMI 2018), from WSL4MIS's h5 volumes, which carry no "
                        f"spacing: ASSUMED spacing {z:g} x {y:g} x {x:g} mm (slices x rows x cols), ACDC's typical "
                        "values. Labels: RV cavity, LV myocardium, LV cavity."),
        "reference": "Bernard et al., IEEE TMI 37(11), 2018; research use",
        "spacing_assumed_mm": [z, y, x],
        "topology": acdc_topology(),
    }
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=2)
    write_split(dataset_name, labels, preprocessed)
    print(f"wrote {len(names)} cases to {out} (assumed spacing {z:g} x {y:g} x {x:g} mm)")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-i", "--input", required=True, help="folder with patientNNN_frameFF.h5 files")
    p.add_argument("-o", "--output", default=os.environ.get("nnUNet_raw"),
                   help="nnU-Net raw folder (default: $nnUNet_raw)")
    p.add_argument("-d", "--dataset_id", type=int, default=127, help="dataset id (default 127)")
    p.add_argument("--name", default="ACDCh5", help="dataset name (default ACDCh5)")
    p.add_argument("--spacing", type=float, nargs=3, default=[10.0, 1.5, 1.5], metavar=("Z", "Y", "X"),
                   help="assumed spacing in mm (default 10 1.5 1.5)")
    p.add_argument("--num_cases", type=int, default=None, help="convert only the first N volumes (sorted by name)")
    p.add_argument("--overwrite", action="store_true", help="rewrite a dataset this converter wrote before")
    a = p.parse_args(argv)
    if not a.output:
        p.error("give -o or set nnUNet_raw")
    convert(a.input, a.output, a.dataset_id, a.name, a.spacing, a.num_cases, a.overwrite,
            os.environ.get("nnUNet_preprocessed"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
