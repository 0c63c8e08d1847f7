"""The QC report's inputs and their checks: the report folder (never an input, replaced only when an earlier
report wrote it: :data:`MARKER`), unknown files in the input folders, the images of the cases, reading a label map or
image with nnU-Net's reader and the foreground box every drawing works on."""
from __future__ import annotations

import os
import re
import shutil
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from nnunet_topo.paths import OutputPathError, check_output, reading
from nnunet_topo.summary_io import EvaluationError, load_json_arg
from nnunet_topo.topology_spec import spec_from_dataset_json


class ReportError(EvaluationError):
    """Bad input to the QC report (folders, files, geometry, a summary that does not match the files)."""


#: marker file of a report folder: only a folder holding it is ever replaced
MARKER = ".nnunet_topo_report"


#: file names that look like images or label maps; such a file that does not end in the dataset's file_ending is
#: an unknown file (an error: it would be left out of the report without a word)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".tif", ".tiff", ".png", ".bmp", ".b2nd")


def check_report_dir(report_dir: str, inputs: Mapping[str, Optional[str]], option: str = "-o") -> None:
    """Refuse a ``report_dir`` that is, lies inside or contains an input folder or file
    (:func:`nnunet_topo.paths.check_output`, paths resolved), that is a file, or that exists with other content than
    an earlier report (no :data:`MARKER`). ``inputs``: ``{what: folder or file or None}``."""
    if not report_dir:
        raise ReportError("no report folder given (-o REPORT_DIR)")
    try:
        rd = check_output(report_dir, inputs, kind="folder", option=option)
    except OutputPathError as e:
        raise ReportError(str(e)) from None
    if os.path.exists(rd):
        if not os.path.isdir(rd):
            raise ReportError(f"the report folder {report_dir} exists and is not a folder")
        content = [n for n in os.listdir(rd)]
        if content and MARKER not in content:
            raise ReportError(f"the report folder {report_dir} exists and holds files not written by "
                              f"nnUNetv2_topo_report ({sorted(content)[:5]}); choose a new or empty folder (an "
                              "earlier report's folder is replaced)")


def _looks_like_image(name: str) -> bool:
    low = name.lower()
    return any(low.endswith(s) for s in IMAGE_SUFFIXES)


def _check_unknown_files(folder: str, file_ending: str, what: str) -> None:
    bad = sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.isfile(os.path.join(folder, n))
                 and _looks_like_image(n) and not n.endswith(file_ending))
    if bad:
        raise ReportError(f"unknown file(s) in the {what} {folder}: {bad[:10]} look like images but do not end in the "
                          f"dataset's file_ending {file_ending!r}; they would be left out of the report. Convert or "
                          "remove them")


def image_files(image_folder: str, file_ending: str, cases: Sequence[str],
                 needed: Optional[Sequence[str]] = None) -> Dict[str, str]:
    """``{case: CASE_0000<file_ending>}``: files not named so for one of ``cases`` (the reference cases) are unknown,
    a case of ``needed`` (default: all ``cases``) without its image is missing; both are errors."""
    if not os.path.isdir(image_folder):
        raise ReportError(f"image folder not found: {image_folder}")
    _check_unknown_files(image_folder, file_ending, "image folder")
    pattern = re.compile(r"^(.*)_(\d{4})" + re.escape(file_ending) + "$")
    known = set(cases)
    found: Dict[str, str] = {}
    unknown = []
    for n in sorted(os.listdir(image_folder)):
        if n.startswith(".") or not n.endswith(file_ending):
            continue
        m = pattern.match(n)
        if m is None or m.group(1) not in known:
            unknown.append(n)
        elif m.group(2) == "0000":
            found[m.group(1)] = os.path.join(image_folder, n)
    if unknown:
        raise ReportError(f"unknown file(s) in the image folder {image_folder}: {unknown[:10]} are not named "
                          f"CASE_XXXX{file_ending} for a reference case (nnU-Net's imagesTs naming; cases: "
                          f"{sorted(known)[:5]}...)")
    missing = [c for c in (cases if needed is None else needed) if c not in found]
    if missing:
        raise ReportError(f"{len(missing)} case(s) have no image CASE_0000{file_ending} in {image_folder}: "
                          f"{missing[:10]}")
    return found


def _check_mesh_folder(mesh_folder: str, cases: Sequence[str], structures: Sequence[str]) -> None:
    from nnunet_topo.mesh_io import SUPPORTED_MESH_EXTENSIONS

    if not os.path.isdir(mesh_folder):
        raise ReportError(f"mesh folder not found: {mesh_folder}")
    names = {f"{c}_{s}{e}" for c in cases for s in structures for e in SUPPORTED_MESH_EXTENSIONS}
    unknown = sorted(n for n in os.listdir(mesh_folder) if not n.startswith(".")
                     and n.lower().endswith(SUPPORTED_MESH_EXTENSIONS) and n not in names)
    if unknown:
        raise ReportError(f"unknown mesh file(s) in {mesh_folder}: {unknown[:10]} are not CASE_<structure>.<ext> of a "
                          f"reference case and a mesh structure {list(structures)}")


def case_name(entry: Mapping, file_ending: str) -> str:
    name = os.path.basename(entry["reference_file"])
    return name[: -len(file_ending)] if name.endswith(file_ending) else name


#: background voxels kept around the foreground box of a case (context in the drawings)
CROP_MARGIN = 8


def as_labels(seg: np.ndarray) -> np.ndarray:
    """Integer label ids in the smallest type (nnU-Net's readers return float32; the evaluator checked they are
    integers)."""
    if seg.size and seg.min() >= 0 and seg.max() < 256:
        return seg.astype(np.uint8, copy=False)
    return seg.astype(np.int32, copy=False)


def foreground_box(reference: np.ndarray, prediction: np.ndarray, margin: int,
                    ignore_label: Optional[int] = None) -> Tuple[slice, ...]:
    """The box around the foreground of both arrays (nonzero, the reference's ignore label excluded) plus ``margin``
    (clipped to the array); the whole array when both are empty. Found axis by axis on the shrinking sub-array."""
    ref_fg = reference != 0
    if ignore_label is not None:
        ref_fg &= reference != ignore_label
    fg = ref_fg | (prediction != 0)
    box = []
    sub = fg
    for a in range(fg.ndim):
        other = tuple(k for k in range(fg.ndim) if k != a)
        hit = np.flatnonzero(sub.any(axis=other))
        if not len(hit):
            return tuple(slice(0, n) for n in fg.shape)
        lo, hi = max(0, int(hit[0]) - margin), min(fg.shape[a], int(hit[-1]) + 1 + margin)
        box.append(slice(lo, hi))
        sub = sub[(slice(None),) * a + (slice(lo, hi),)]
    return tuple(box)


def read_file(rw, path: str):
    """``(array (Z, Y, X), properties)`` of a one-channel file with nnU-Net's reader ``rw``. For ``SimpleITKIO`` and a
    3D file, SimpleITK directly: the same array and properties (``spacing`` in array order, ``sitk_stuff``) without
    nnU-Net's float32 copy of the whole volume (a second or two per 300 x 512 x 512 file)."""
    if not os.path.isfile(path):
        raise ReportError(f"file not found: {path}")
    with reading("file", path):
        return _read_unchecked(rw, path)


def _read_unchecked(rw, path: str):
    if type(rw).__name__ == "SimpleITKIO":
        import SimpleITK as sitk

        img = sitk.ReadImage(path)
        if img.GetDimension() == 3 and img.GetNumberOfComponentsPerPixel() == 1:
            props = {"spacing": [abs(float(x)) for x in img.GetSpacing()[::-1]],
                     "sitk_stuff": {"spacing": img.GetSpacing(), "origin": img.GetOrigin(),
                                    "direction": img.GetDirection()}}
            return sitk.GetArrayFromImage(img), props
    arr, props = rw.read_images([path])
    arr = np.asarray(arr)
    return (arr[0] if arr.ndim == 4 else arr), props


def image_slices(rw, path: str, box: Sequence[slice], slices: Sequence[dict], ref_shape, ref_spacing, ref_props,
                  ref_name: str, check_geometry, image_geometry) -> Dict[Tuple[int, int], np.ndarray]:
    """``{(axis, index): 2D slice of the image inside box}`` for the drawn slices, after checking the image's shape,
    spacing, origin and direction against the reference. With ``SimpleITKIO`` only the region from the first to the
    last drawn slice inside ``box`` is read (a whole 300 x 512 x 512 float image takes seconds to decompress);
    other readers read the whole file."""
    region = [slice(b.start, b.stop) for b in box]
    axes = {s["axis"] for s in slices}
    if len(axes) == 1:  # slices across one axis: the slab between the first and the last (else the whole box)
        (a,) = axes
        idx = [s["index"] for s in slices]
        region[a] = slice(min(idx), max(idx) + 1)
    arr = None
    if type(rw).__name__ == "SimpleITKIO":
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(path)
        reader.ReadImageInformation()
        if reader.GetDimension() == 3 and reader.GetNumberOfComponents() == 1:
            shape = tuple(int(n) for n in reader.GetSize()[::-1])
            props = {"spacing": [abs(float(x)) for x in reader.GetSpacing()[::-1]],
                     "sitk_stuff": {"spacing": reader.GetSpacing(), "origin": reader.GetOrigin(),
                                    "direction": reader.GetDirection()}}
            if shape == tuple(ref_shape):
                reader.SetExtractIndex([int(r.start) for r in region[::-1]])
                reader.SetExtractSize([int(r.stop - r.start) for r in region[::-1]])
                arr = sitk.GetArrayFromImage(reader.Execute())
    if arr is None:
        full, props = read_file(rw, path)
        shape = full.shape
        if shape == tuple(ref_shape):
            arr = full[tuple(region)]
    if shape != tuple(ref_shape):
        raise ReportError(f"shape mismatch: image {path} has shape {shape}, reference {ref_name} has "
                          f"{tuple(ref_shape)}")
    spacing = [float(x) for x in props["spacing"]]
    if not np.allclose(spacing, ref_spacing, rtol=1e-3, atol=0):
        raise ReportError(f"spacing mismatch: image {path} has spacing {tuple(spacing)}, reference {ref_name} has "
                          f"{tuple(ref_spacing)}")
    check_geometry(image_geometry(ref_props), image_geometry(props), ref_spacing, ref_name=ref_name, pred_name=path)
    out = {}
    for s in slices:
        a = s["axis"]
        plane = np.take(arr, s["index"] - region[a].start, axis=a)
        # in-plane: the region spans the box, so rows/cols are the box's (as the label crops)
        out[(a, s["index"])] = plane
    return out


def prepare_report_dir(report_dir: str) -> bool:
    """Create the report folder (or clear an earlier report in it); returns whether it was created here."""
    created = not os.path.exists(report_dir)
    os.makedirs(report_dir, exist_ok=True)
    for name in ("index.html", "report.json", "summary_topology.json"):
        p = os.path.join(report_dir, name)
        if os.path.isfile(p):
            os.remove(p)
    if os.path.isdir(os.path.join(report_dir, "cases")):
        shutil.rmtree(os.path.join(report_dir, "cases"))
    os.makedirs(os.path.join(report_dir, "cases"))
    with open(os.path.join(report_dir, MARKER), "w") as f:
        f.write("written by nnunet_topo.report; the next report replaces this folder's report files\n")
    return created


def check_report_inputs(ref_folder: str, pred_folder: str, dataset_json: Union[str, os.PathLike, dict],
                        report_dir: str, mesh_folder: Optional[str] = None, image_folder: Optional[str] = None,
                        max_cases: Optional[int] = None, slices_per_case: int = 3,
                        plans: Union[str, os.PathLike, dict, None] = None, option: str = "-o") -> None:
    """The checks that need no evaluation, run before it (so a bad report folder fails in seconds, not after the
    evaluation): arguments, the report folder (:func:`check_report_dir`), unknown files in the reference,
    prediction, image and mesh folders, missing images."""
    dj_path = None if isinstance(dataset_json, dict) else dataset_json
    for v, what in ((max_cases, "max_cases"), (slices_per_case, "slices_per_case")):
        if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1):
            raise ReportError(f"{what} must be a positive integer, got {v!r}")
    check_report_dir(report_dir, {"reference folder": ref_folder, "prediction folder": pred_folder,
                                  "mesh folder": mesh_folder, "image folder": image_folder, "dataset.json": dj_path,
                                  **({"plans file": plans} if isinstance(plans, (str, os.PathLike)) else {})},
                     option=option)
    dataset_json = load_json_arg(dataset_json, "dataset.json")
    fe = dataset_json["file_ending"]
    for folder, what in ((ref_folder, "reference folder"), (pred_folder, "prediction folder")):
        if not os.path.isdir(folder):
            raise ReportError(f"{what} not found: {folder}")
        _check_unknown_files(folder, fe, what)
    cases = sorted(f[: -len(fe)] for f in os.listdir(ref_folder) if f.endswith(fe))
    if image_folder is not None:
        image_files(image_folder, fe, cases)
    if mesh_folder is not None:
        spec = spec_from_dataset_json(dataset_json)
        _check_mesh_folder(mesh_folder, cases, list(spec.mesh_structures))
