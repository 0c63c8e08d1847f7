"""Visual QC report of a topology evaluation: one static ``index.html`` with the metric table and per-case figures.

``nnUNetv2_topo_report REF PRED -djfile dataset.json -pfile plans.json -o REPORT_DIR [--mesh_folder M]
[--image_folder IMAGES] [--max_cases N] [--slices_per_case K]`` (and ``nnUNetv2_topo_evaluate_folder ... --report
DIR``) write into ``REPORT_DIR``:

* ``index.html``: the metric table (per case and mean: Dice per label, TVS, violating voxels per rule, Betti error),
  cases sorted worst first (TVS, then Betti error 3D), and per case the figures below; static, no JavaScript,
  relative links only (the folder can be moved or zipped as a whole);
* ``cases/CASE_slices.png``: the K slices with the most violating voxels (image in grey when ``--image_folder`` is
  given, reference and prediction contours per label, violating voxels coloured per rule); a case without
  violations shows the slices where reference and prediction disagree most;
* ``cases/CASE_betti.png``: per-slice Betti numbers ``(b0, b1)`` of the prediction and the reference for every
  structure with a ``betti_2d`` prior, with the prior (every allowed value when a set of vectors is allowed);
* ``cases/CASE_mesh.png`` (with ``--mesh_folder``): the case's meshes rendered offscreen, vertices that penetrate a
  mesh they must not enter (exclusion rules) or leave their outer mesh (inclusion rules) in red;
* ``summary_topology.json``: the evaluator's summary the page shows (the numbers are the evaluator's, computed once,
  :func:`nnunet_topo.evaluation.compute_topology_metrics_on_folder`); ``report.json``: what each figure shows (slice
  axis and indices, violating voxels, penetrating vertices, pixel size, seconds per case).

The violation maps drawn are :func:`nnunet_topo.violations.violation_maps_numpy` of the prediction, the function the
evaluator counts with; their voxel counts are compared with the evaluator's ``violating_voxels`` and a difference is
an error (a page that draws other violations than its table counts would be wrong silently).

Never writes into an input folder: ``REPORT_DIR`` must not be (or lie inside, or contain) the reference, prediction,
mesh or image folder, and an existing ``REPORT_DIR`` is only replaced when an earlier report wrote it.
documentation/qc_report.md describes the page.
"""
from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import time
import urllib.parse
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from nnunet_topo.topology_spec import (MeshExclusionRule, TopologySpec, mesh_rule_meshes, mesh_rules_in_force,
                                spec_from_dataset_json)
from nnunet_topo.paths import USER_ERRORS, OutputPathError, check_output, reading
from nnunet_topo.summary_io import EvaluationError, ignore_label_of, load_json_arg, nanmean, to_builtin

__all__ = [
    "ReportError",
    "allowed_betti_2d",
    "check_report_dir",
    "check_report_inputs",
    "choose_slices",
    "penetrating_vertices",
    "render_meshes",
    "sort_cases",
    "write_report",
    "write_report_from_summary",
    "report_entry",
]

#: marker file of a report folder: only a folder holding it is ever replaced
MARKER = ".nnunet_topo_report"
#: pixel size of one slice panel (width x height, title included) of ``CASE_slices.png``; legend rows below
PANEL_W, PANEL_H, LEGEND_ROW_H = 380, 430, 22
#: a slice crop larger than this (pixels, either side) is subsampled for drawing only
MAX_PANEL_PIXELS = 384
#: meshes with more faces are decimated for the render and the penetration test
MAX_RENDER_FACES = 4000
#: file names that look like images or label maps; such a file that does not end in the dataset's file_ending is
#: an unknown file (an error: it would be left out of the report without a word)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr", ".tif", ".tiff", ".png", ".bmp", ".b2nd")
_RULE_COLOURS = ("#ff00ff", "#ffd700", "#00e5ff", "#ff7f00", "#7fff00", "#ff1493", "#1e90ff", "#ffffff")
#: marker and size (fraction of a drawn pixel) of the violating voxels of rule k
_RULE_MARKERS = (("s", 0.95), ("x", 0.7), ("+", 0.8), ("D", 0.45), ("o", 0.4), ("^", 0.5), ("v", 0.5), ("*", 0.6))
_MESH_COLOURS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#bcbd22", "#7f7f7f", "#e377c2")


class ReportError(EvaluationError):
    """Bad input to the QC report (folders, files, geometry, a summary that does not match the files)."""


# ------------------------------------------------------------------------------------------------ small helpers
def _matplotlib():
    """Offscreen matplotlib without pyplot (no global backend switch, no window): ``(Figure, FigureCanvasAgg)``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def _save(fig, path: str) -> Tuple[int, int]:
    _, canvas_cls = _matplotlib()
    canvas_cls(fig).print_png(path)
    w, h = fig.get_size_inches() * fig.dpi
    return int(round(w)), int(round(h))


def allowed_betti_2d(prior: Any) -> Tuple[Tuple[int, int], ...]:
    """The allowed per-slice Betti vectors of a ``betti_2d`` prior: a single ``(b0, b1)`` or a set of them (a
    sequence of ``(b0, b1)`` vectors) -> a tuple of ``(b0, b1)`` tuples."""
    p = list(prior)
    if p and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in p):
        return (tuple(int(x) for x in p),)  # type: ignore[return-value]
    out = []
    for v in p:
        v = tuple(int(x) for x in v)
        if len(v) != 2:
            raise ReportError(f"betti_2d prior {prior!r}: expected (b0, b1) vectors")
        out.append(v)
    return tuple(out)


def _fmt(v: Any, p: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{float(v):.{p}f}"


def _isnan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _slug(case: str) -> str:
    return "case-" + re.sub(r"[^A-Za-z0-9_.-]", "_", case)


def _case_name(entry: Mapping, file_ending: str) -> str:
    name = os.path.basename(entry["reference_file"])
    return name[: -len(file_ending)] if name.endswith(file_ending) else name


# ------------------------------------------------------------------------------------------------ input checks
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


def _image_files(image_folder: str, file_ending: str, cases: Sequence[str],
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
    from nnunet_topo.meshes import SUPPORTED_MESH_EXTENSIONS

    if not os.path.isdir(mesh_folder):
        raise ReportError(f"mesh folder not found: {mesh_folder}")
    names = {f"{c}_{s}{e}" for c in cases for s in structures for e in SUPPORTED_MESH_EXTENSIONS}
    unknown = sorted(n for n in os.listdir(mesh_folder) if not n.startswith(".")
                     and n.lower().endswith(SUPPORTED_MESH_EXTENSIONS) and n not in names)
    if unknown:
        raise ReportError(f"unknown mesh file(s) in {mesh_folder}: {unknown[:10]} are not CASE_<structure>.<ext> of a "
                          f"reference case and a mesh structure {list(structures)}")


#: background voxels kept around the foreground box of a case (context in the drawings)
_CROP_MARGIN = 8


def _as_labels(seg: np.ndarray) -> np.ndarray:
    """Integer label ids in the smallest type (nnU-Net's readers return float32; the evaluator checked they are
    integers)."""
    if seg.size and seg.min() >= 0 and seg.max() < 256:
        return seg.astype(np.uint8, copy=False)
    return seg.astype(np.int32, copy=False)


def _foreground_box(reference: np.ndarray, prediction: np.ndarray, margin: int,
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


def _read(rw, path: str):
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


def _read_seg(rw, path: str):
    return _read(rw, path)


def _image_slices(rw, path: str, box: Sequence[slice], slices: Sequence[dict], ref_shape, ref_spacing, ref_props,
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
        full, props = _read(rw, path)
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


def _mask(arr: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    return arr == ids[0] if len(ids) == 1 else np.isin(arr, ids)


# ------------------------------------------------------------------------------------------------ slices
def _slice_axis(rule, spec: TopologySpec) -> int:
    """The slice axis of a rule: its own for a 2d rule, ``betti_2d.axis`` (0 unless set) for a 3d rule, as the
    evaluator's SVR and ``nnUNetv2_topo_check_rules`` take them."""
    return int(rule.axis) if rule.mode == "2d" else int(spec.betti_2d_axis)


def _per_slice(mask: np.ndarray, axis: int) -> np.ndarray:
    other = tuple(a for a in range(mask.ndim) if a != axis)
    return np.count_nonzero(mask, axis=other) if mask.size else np.zeros(mask.shape[axis], np.int64)


def choose_slices(vmaps: Mapping[str, np.ndarray], spec: TopologySpec, reference: np.ndarray,
                  prediction: np.ndarray, k: int = 3, known: Optional[np.ndarray] = None,
                  origin: Sequence[int] = (0, 0, 0)) -> Tuple[List[dict], str]:
    """The ``k`` slices to draw: ``[{"axis", "index", "violating", "per_rule", "disagreement", "reason"}]``, first the
    slices with the most violating voxels (per axis, the sum over the rules whose slice axis it is; ties: lower
    index), then, to fill up to ``k`` (or for a case without violations), the slices along ``betti_2d.axis`` where
    reference and prediction disagree in most voxels, then (prediction = reference) the slices with the most
    foreground. Returns ``(slices, selection)`` with selection ``"violations"``, ``"disagreement"``,
    ``"foreground"`` or ``"empty"`` (the criterion of the first slice). ``origin``: the index of the arrays' first
    voxel in the whole image when they are a crop (the returned indices are the whole image's)."""
    axis0 = int(spec.betti_2d_axis)
    scores: Dict[int, np.ndarray] = {}
    for rule in spec.rules:
        if rule.name not in vmaps:
            continue
        a = _slice_axis(rule, spec)
        c = _per_slice(vmaps[rule.name], a)
        scores[a] = scores.get(a, 0) + c
    cands = []
    for a, c in scores.items():
        for i in np.flatnonzero(c):
            cands.append((-int(c[i]), a, int(i)))
    cands.sort()
    chosen: List[Tuple[int, int, str]] = [(a, i, "violations") for _, a, i in cands[:k]]
    diff = reference != prediction
    if known is not None:
        diff &= known
    dis = _per_slice(diff, axis0)
    taken = {(a, i) for a, i, _ in chosen}
    if len(chosen) < k:
        order = sorted((-int(dis[i]), int(i)) for i in np.flatnonzero(dis))
        for _, i in order:
            if len(chosen) >= k:
                break
            if (axis0, i) not in taken:
                chosen.append((axis0, i, "disagreement"))
                taken.add((axis0, i))
    if len(chosen) < k:
        ref_fg = reference != 0 if known is None else (reference != 0) & known
        fg = _per_slice(ref_fg | (prediction != 0), axis0)
        for _, i in sorted((-int(fg[i]), int(i)) for i in np.flatnonzero(fg)):
            if len(chosen) >= k:
                break
            if (axis0, i) not in taken:
                chosen.append((axis0, i, "foreground"))
                taken.add((axis0, i))
    if not chosen:
        chosen = [(axis0, reference.shape[axis0] // 2, "empty")]
    out = []
    for a, i, why in chosen:
        per_rule = {name: int(np.count_nonzero(np.take(v, i, axis=a))) for name, v in vmaps.items()}
        out.append({"axis": int(a), "index": int(i) + int(origin[a]), "violating": int(sum(per_rule.values())),
                    "per_rule": per_rule,
                    "disagreement": int(np.count_nonzero(np.take(diff, i, axis=a))), "reason": why})
    return out, chosen[0][2]


def _label_colour(i: int) -> str:
    from matplotlib import colormaps

    return colormaps["tab10"]((int(i) - 1) % 10)


def _pred_colour(i: int):
    """The prediction's contour colour of a label: its reference colour, darker (distinct where both coincide)."""
    r, g, b, a = _label_colour(i)
    return (0.5 * r, 0.5 * g, 0.5 * b, a)


def _block_any(m: np.ndarray, step: int) -> np.ndarray:
    """Subsample a 2D bool mask by ``step`` keeping a pixel when any voxel of its block is set (so a violation never
    disappears when a large slice is drawn smaller)."""
    if step <= 1:
        return m
    h, w = m.shape
    hp, wp = -(-h // step) * step, -(-w // step) * step
    p = np.zeros((hp, wp), bool)
    p[:h, :w] = m
    return p.reshape(hp // step, step, wp // step, step).any(axis=(1, 3))


def _contours(mask2d: np.ndarray):
    from skimage.measure import find_contours

    if not mask2d.any():
        return []
    padded = np.pad(mask2d.astype(np.float32), 1)
    return [c - 1 for c in find_contours(padded, 0.5)]


def _crop_box(reference: np.ndarray, prediction: np.ndarray, axis: int, margin: int = 6):
    """In-plane box (rows, cols) around the foreground of reference and prediction over the whole case."""
    fg = (reference != 0) | (prediction != 0)
    proj = fg.any(axis=axis)
    if not proj.any():
        return (0, proj.shape[0]), (0, proj.shape[1])
    rows, cols = np.flatnonzero(proj.any(1)), np.flatnonzero(proj.any(0))
    return ((max(0, int(rows[0]) - margin), min(proj.shape[0], int(rows[-1]) + 1 + margin)),
            (max(0, int(cols[0]) - margin), min(proj.shape[1], int(cols[-1]) + 1 + margin)))


def draw_slices(path: str, case: str, slices: Sequence[dict], reference: np.ndarray, prediction: np.ndarray,
                vmaps: Mapping[str, np.ndarray], spec: TopologySpec, label_ids: Sequence[int],
                label_names: Mapping[int, str], spacing: Sequence[float], image: Optional[np.ndarray] = None,
                ignored: Optional[np.ndarray] = None, origin: Sequence[int] = (0, 0, 0)) -> Tuple[int, int]:
    """One PNG, one panel per slice (``slices`` from :func:`choose_slices`, whole-image indices; ``origin``: the
    index of the arrays' first voxel when they are a crop); returns its ``(width, height)`` in pixels. The panels
    show the in-plane box around the case's foreground; a box larger than ``MAX_PANEL_PIXELS`` is subsampled for
    drawing (labels by taking every n-th voxel, violations by keeping a pixel when any voxel of its block
    violates)."""
    from matplotlib.colors import to_rgba
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    Figure, _ = _matplotlib()
    rule_names = list(vmaps)
    W = PANEL_W * len(slices)
    # two legends: the contours (one column per label: reference above prediction), the rules below
    n_lab, n_other = len(label_ids), len(rule_names) + (1 if ignored is not None else 0)
    ncol_c = max([d for d in range(1, max(n_lab, 1) + 1) if max(n_lab, 1) % d == 0 and d * 160 <= W] or [1])
    rows_c = 2 * int(math.ceil(n_lab / ncol_c))
    ncol_r = max(1, min(n_other, W // 340))
    rows_r = int(math.ceil(n_other / ncol_r))
    legend_h = LEGEND_ROW_H * (rows_c + rows_r) + 16
    H = PANEL_H + legend_h
    fig = Figure(figsize=(W / 100, H / 100), dpi=100)
    fig.subplots_adjust(left=0.03 / len(slices) * 3, right=1 - 0.02 / len(slices) * 3, top=1 - 62 / H,
                        bottom=(legend_h + 18) / H, wspace=0.12)
    boxes: Dict[int, Any] = {}
    for j, s in enumerate(slices):
        ax = fig.add_subplot(1, len(slices), j + 1)
        a = s["axis"]
        idx = s["index"] - int(origin[a])
        if a not in boxes:
            boxes[a] = _crop_box(reference, prediction, a)
        (r0, r1), (c0, c1) = boxes[a]
        o_r, o_c = (int(o) for k, o in enumerate(origin) if k != a)
        step = max(1, int(math.ceil(max(r1 - r0, c1 - c0) / MAX_PANEL_PIXELS)))

        def cut(arr):
            return np.take(arr, idx, axis=a)[r0:r1, c0:c1]
        ref2, pred2 = cut(reference), cut(prediction)
        if step > 1:
            ref2, pred2 = ref2[::step, ::step], pred2[::step, ::step]
        in_plane = [float(sp) for k, sp in enumerate(spacing) if k != a]
        R0, C0 = r0 + o_r, c0 + o_c  # whole-image indices of the box's first row and column
        extent = (C0 - 0.5, C0 - 0.5 + ref2.shape[1] * step, R0 - 0.5 + ref2.shape[0] * step, R0 - 0.5)
        if image is not None:
            im = (image[(a, s["index"])][r0:r1, c0:c1] if isinstance(image, Mapping) else cut(image)).astype(np.float32)
            im = im[::step, ::step] if step > 1 else im
            lo, hi = (np.percentile(im, [1, 99]) if im.size else (0.0, 1.0))
            ax.imshow(im, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, extent=extent,
                      interpolation="nearest")
        else:
            fill = np.ones(ref2.shape + (4,), np.float32)
            for lab in label_ids:
                fill[ref2 == lab] = to_rgba(_label_colour(lab), 0.18)
            ax.imshow(fill, extent=extent, interpolation="nearest")
        if ignored is not None:
            ig = _block_any(cut(ignored), step)
            rgba = np.zeros(ig.shape + (4,), np.float32)
            rgba[ig] = (0.5, 0.5, 0.5, 0.55)
            ax.imshow(rgba, extent=extent, interpolation="nearest")
        # one marker per violating voxel (per drawn pixel), a shape per rule, so that a voxel violating two rules
        # shows both; markers scale with the drawn pixel size
        px_pt = 0.84 * PANEL_W / 100 * 72 / max(ref2.shape[1], ref2.shape[0] * in_plane[0] / in_plane[1], 1)
        for k, name in enumerate(rule_names):
            v = _block_any(cut(vmaps[name]), step)
            if v.any():
                rr, cc = np.nonzero(v)
                marker, scale = _RULE_MARKERS[k % len(_RULE_MARKERS)]
                ax.scatter(C0 + (cc + 0.5) * step - 0.5, R0 + (rr + 0.5) * step - 0.5, s=(scale * px_pt) ** 2,
                           marker=marker, color=_RULE_COLOURS[k % len(_RULE_COLOURS)], linewidths=1.2,
                           edgecolors="black" if marker == "s" else None, zorder=5)
        for lab in label_ids:
            for m2, style, col, lw in ((ref2 == lab, "-", _label_colour(lab), 2.4),
                                       (pred2 == lab, "--", _pred_colour(lab), 1.3)):
                for c in _contours(m2):
                    ax.plot(C0 - 0.5 + (c[:, 1] + 0.5) * step, R0 - 0.5 + (c[:, 0] + 0.5) * step, style, color=col,
                            linewidth=lw)
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_aspect(in_plane[0] / in_plane[1])
        ax.tick_params(labelsize=7)
        what = {"violations": f"{s['violating']} violating voxel(s)", "disagreement":
                f"no violation; {s['disagreement']} voxel(s) differ", "foreground": "no violation, no voxel differs",
                "empty": "empty"}[s["reason"]]
        sub = f" (drawn 1:{step})" if step > 1 else ""
        per = ", ".join(f"R{k + 1}: {s['per_rule'][n]}" for k, n in enumerate(rule_names)) if rule_names else "no rules"
        ax.set_title(f"{case}  axis {a} slice {s['index']}{sub}\n{what}\n{per}", fontsize=9)
    handles, others = [], []
    for lab in label_ids:
        handles.append(Line2D([], [], color=_label_colour(lab), linestyle="-", linewidth=2.4,
                              label=f"{label_names.get(lab, lab)} reference"))
        handles.append(Line2D([], [], color=_pred_colour(lab), linestyle="--", linewidth=1.3,
                              label=f"{label_names.get(lab, lab)} prediction"))
    for k, name in enumerate(rule_names):
        marker, _ = _RULE_MARKERS[k % len(_RULE_MARKERS)]
        others.append(Line2D([], [], linestyle="none", marker=marker, markersize=8, markeredgewidth=1.5,
                              color=_RULE_COLOURS[k % len(_RULE_COLOURS)],
                              markeredgecolor="black" if marker == "s" else None, label=f"R{k + 1} violates {name}"))
    if ignored is not None:
        others.append(Patch(facecolor=(0.5, 0.5, 0.5, 0.55), label="ignored (unknown) reference voxels"))
    if handles:
        fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, (LEGEND_ROW_H * rows_r + 6) / H),
                   ncol=ncol_c, fontsize=8, frameon=False)
    if others:
        fig.legend(handles=others, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=ncol_r, fontsize=8,
                   frameon=False)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------ Betti plot
def draw_betti(path: str, case: str, reference: np.ndarray, prediction: np.ndarray, spec: TopologySpec,
               label_names: Mapping[int, str], label_ids: Sequence[int],
               ignored: Optional[np.ndarray] = None, origin: Sequence[int] = (0, 0, 0),
               num_slices: Optional[int] = None) -> Tuple[Tuple[int, int], dict]:
    """Per-slice ``(b0, b1)`` of prediction and reference per structure with a ``betti_2d`` prior (every foreground
    label without a prior when the dataset has none), the prior's allowed values as lines (a band between the
    smallest and largest allowed value when several are allowed). Returns ``((width, height), info)`` with ``info``
    = ``{structure: {"slices_off_prior_pred": [...], "slices_off_prior_ref": [...]}}``. For a crop: ``origin`` (its
    first voxel's index) and ``num_slices`` (the whole image's slices along ``betti_2d.axis``; outside the crop
    every slice is empty)."""
    from nnunet_topo.metrics.topology import betti_numbers_per_slice

    Figure, _ = _matplotlib()
    axis = int(spec.betti_2d_axis)
    if spec.betti_2d:
        items = [(name, tuple(spec.betti_structures[name].label_ids), allowed_betti_2d(prior))
                 for name, prior in spec.betti_2d.items()]
    else:
        items = [(str(label_names.get(lab, lab)), (int(lab),), None) for lab in label_ids]
    n = reference.shape[axis] if num_slices is None else int(num_slices)
    off = int(origin[axis])

    def full(values: np.ndarray) -> np.ndarray:  # per-slice values of the crop -> the whole image's slices
        out = np.zeros((n,) + values.shape[1:], values.dtype)
        out[off:off + len(values)] = values
        return out
    unknown_slices = None
    if ignored is not None and ignored.any():
        unknown_slices = full(_per_slice(ignored, axis) > 0)
    rows = len(items)
    W, H = 1000, 60 + 200 * rows
    fig = Figure(figsize=(W / 100, H / 100), dpi=100)
    fig.subplots_adjust(left=0.07, right=0.76, top=1 - 50 / H, bottom=40 / H, hspace=0.6, wspace=0.25)
    x = np.arange(n)
    info = {}
    for r, (name, ids, allowed) in enumerate(items):
        mr, mp = _mask(reference, ids), _mask(prediction, ids)
        br, bp = full(betti_numbers_per_slice(mr, axis)), full(betti_numbers_per_slice(mp, axis))
        pres_r, pres_p = full(_per_slice(mr, axis) > 0), full(_per_slice(mp, axis) > 0)
        off_p = off_r = []
        if allowed is not None:
            ok = set(allowed)
            off_p = [int(i) for i in np.flatnonzero(pres_p) if tuple(int(v) for v in bp[i]) not in ok]
            off_r = [int(i) for i in np.flatnonzero(pres_r) if tuple(int(v) for v in br[i]) not in ok
                     and not (unknown_slices is not None and unknown_slices[i])]
        info[name] = {"slices_off_prior_pred": off_p, "slices_off_prior_ref": off_r,
                      "allowed": None if allowed is None else [list(v) for v in allowed]}
        for c in range(2):
            ax = fig.add_subplot(rows, 2, 2 * r + c + 1)
            ref_vals = br[:, c].astype(float)
            if unknown_slices is not None:
                ref_vals[unknown_slices] = np.nan
            if allowed is not None:
                vals = sorted({v[c] for v in allowed})
                if len(vals) > 1:
                    ax.axhspan(vals[0] - 0.15, vals[-1] + 0.15, color="tab:green", alpha=0.15, linewidth=0,
                               label="allowed range")
                for k, v in enumerate(vals):
                    ax.axhline(v, color="tab:green", linestyle=":", linewidth=2,
                               label="prior (allowed)" if k == 0 else None)
            ax.plot(x, ref_vals, drawstyle="steps-mid", color="black", linewidth=1.5, label="reference")
            ax.plot(x, bp[:, c], "o", color="tab:orange", markersize=4, label="prediction")
            bad = [i for i in off_p]
            if bad:
                ax.plot(bad, bp[bad, c], "x", color="red", markersize=9, markeredgewidth=2,
                        label="prediction off the prior")
            absent = np.concatenate([[False], ~(pres_r | pres_p), [False]]).astype(np.int8)
            edges = np.flatnonzero(np.diff(absent))  # runs of slices without the structure: one span each
            for a0, a1 in zip(edges[::2], edges[1::2]):
                ax.axvspan(a0 - 0.5, a1 - 0.5, color="0.9", linewidth=0)
            ax.set_xlim(-0.5, n - 0.5)
            top = max(2, int(np.max(br[:, c], initial=0)), int(np.max(bp[:, c], initial=0)),
                      max((v[c] for v in allowed), default=0) if allowed else 0)
            ax.set_ylim(-0.4, top + 0.6)
            ax.set_xlabel(f"slice index (axis {axis})", fontsize=8)
            ax.set_ylabel(f"b{c}", fontsize=9)
            ax.tick_params(labelsize=7)
            prior_txt = ("prior " + " or ".join(str(tuple(v)) for v in allowed)) if allowed else "no betti_2d prior"
            ax.set_title(f"{name} b{c} ({prior_txt}); prediction off prior on {len(off_p)} slice(s)"
                         if c == 0 else f"{name} b{c}", fontsize=8)
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Line2D([], [], color="tab:green", linestyle=":", linewidth=2, label="prior: allowed value(s)"),
               Patch(facecolor="tab:green", alpha=0.15, label="range of a set of\nallowed vectors"),
               Line2D([], [], color="black", linewidth=1.5, label="reference"),
               Line2D([], [], color="tab:orange", marker="o", linestyle="none", label="prediction"),
               Line2D([], [], color="red", marker="x", markeredgewidth=2, linestyle="none",
                      label="prediction off the prior"),
               Patch(facecolor="0.9", label="structure absent\nin both")]
    if unknown_slices is not None:
        handles.append(Line2D([], [], color="black", linewidth=0, label="reference gap: slice\nnot fully annotated"))
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.775, 1 - 50 / H), fontsize=8, frameon=False)
    fig.suptitle(f"{case}: per-slice Betti numbers (grey: slices without the structure; the prior is checked only "
                 "where the structure is present)", fontsize=9)
    return _save(fig, path), info


# ------------------------------------------------------------------------------------------------ meshes
def _decimate(mesh, max_faces: int):
    import trimesh

    if len(mesh.faces) <= max_faces:
        return mesh, False
    try:
        d = mesh.simplify_quadric_decimation(face_count=int(max_faces))
        d = trimesh.Trimesh(np.asarray(d.vertices), np.asarray(d.faces), process=False)
        d.remove_unreferenced_vertices()
        if len(d.faces):
            return d, True
    except Exception:  # noqa: BLE001  (fast-simplification missing or failing: fall back to a face subset)
        pass
    step = int(math.ceil(len(mesh.faces) / max_faces))
    d = trimesh.Trimesh(np.asarray(mesh.vertices), np.asarray(mesh.faces)[::step], process=False)
    d.remove_unreferenced_vertices()
    return d, True


def _winding(points: np.ndarray, mesh) -> np.ndarray:
    import torch

    from nnunet_topo.occupancy import winding_number

    points = np.asarray(points, np.float64)
    out = np.zeros(len(points))
    v = np.asarray(mesh.vertices, np.float64)
    if len(points) == 0 or len(v) == 0:
        return out
    lo, hi = v.min(0), v.max(0)
    near = np.all((points >= lo) & (points <= hi), axis=1)  # outside the bounding box the winding number is ~0
    if near.any():
        # float32 (twice as fast; a vertex within float32 rounding of the surface is within the tolerance anyway)
        w = winding_number(torch.from_numpy(points[near].astype(np.float32)), torch.from_numpy(v.astype(np.float32)),
                           torch.from_numpy(np.asarray(mesh.faces, np.int64)))
        out[near] = np.abs(w.numpy())  # either orientation
    return out


def penetrating_vertices(meshes: Mapping[str, Any], spec: TopologySpec, tol_mm: float = 0.0
                         ) -> Tuple[Dict[str, Dict[str, np.ndarray]], Dict[str, str]]:
    """Vertices of the meshes that lie where a rule forbids them.

    For an exclusion ``(A, B)``: the vertices of A inside B and those of B inside A; for an inclusion ``I in O``
    (``| M``): the vertices of I outside O (and outside M). Inside = exact generalised winding number
    (:func:`nnunet_topo.occupancy.winding_number`, the occupancy of the mesh TVS) above 1/2, and a vertex counts
    only when it is more than ``tol_mm`` from the other surface (:func:`nnunet_topo.metrics.mesh.
    point_to_surface_distance`), so surfaces that coincide (an inner and an outer mesh sharing a cap) are not
    flagged. The rules are the mesh-level rules in force (:func:`nnunet_topo.topology_spec.mesh_rules_in_force`: the
    dataset's ``mesh_rules`` and the voxel rules whose structures are mesh structures), as in the mesh evaluation.

    Returns ``({rule: {mesh name: bool (V,)}}, {rule: why it was skipped})``.
    """
    from nnunet_topo.metrics.mesh import point_to_surface_distance

    def deep(flags: np.ndarray, pts: np.ndarray, other) -> np.ndarray:
        if tol_mm > 0 and flags.any():
            idx = np.flatnonzero(flags)
            d = point_to_surface_distance(pts[idx], other)
            flags = flags.copy()
            flags[idx[d <= tol_mm]] = False
        return flags

    rules, not_on_meshes = mesh_rules_in_force(spec)
    out: Dict[str, Dict[str, np.ndarray]] = {}
    skipped: Dict[str, str] = {r: why for r, why in not_on_meshes.items() if "no mesh structure" in why}
    for rule in rules:
        lack = [m for m in mesh_rule_meshes(rule) if m not in meshes]
        if lack:
            skipped[rule.name] = "no mesh for " + ", ".join(lack)
            continue
        if isinstance(rule, MeshExclusionRule):
            res = {}
            for x, y in ((rule.a, rule.b), (rule.b, rule.a)):
                pts = np.asarray(meshes[x].vertices, np.float64)
                res[x] = deep(_winding(pts, meshes[y]) > 0.5, pts, meshes[y])
            out[rule.name] = res
        else:
            allowed = [meshes[rule.outer]] + [meshes[m] for m in rule.may_touch if m in meshes]
            pts = np.asarray(meshes[rule.inner].vertices, np.float64)
            flags = np.ones(len(pts), bool)
            for m in allowed:
                flags &= _winding(pts, m) <= 0.5
            for m in allowed:
                flags = deep(flags, pts, m)
            out[rule.name] = {rule.inner: flags}
    return out, skipped


def render_meshes(path: str, case: str, meshes: Mapping[str, Any], spec: TopologySpec, tol_mm: float = 0.0,
                  mesh_tvs: Optional[float] = None, max_faces: int = MAX_RENDER_FACES) -> Tuple[Tuple[int, int], dict]:
    """Offscreen render (mplot3d ``Poly3DCollection``, two views) of a case's meshes with the vertices of
    :func:`penetrating_vertices` and the faces that use them in red. Meshes above ``max_faces`` faces are decimated
    first (for the render and the vertex test; said in the title). Returns ``((width, height), info)``."""
    from matplotlib.colors import to_rgba
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection  # registers the 3d projection

    Figure, _ = _matplotlib()
    shown, decimated = {}, []
    for name, m in meshes.items():
        d, was = _decimate(m, max_faces)
        shown[name] = d
        if was:
            decimated.append(f"{name} {len(m.faces)}->{len(d.faces)}")
    flags, skipped = penetrating_vertices(shown, spec, tol_mm)
    bad_v = {n: np.zeros(len(m.vertices), bool) for n, m in shown.items()}
    counts = {}
    for rule, per in flags.items():
        counts[rule] = {n: int(f.sum()) for n, f in per.items()}
        for n, f in per.items():
            bad_v[n] |= f
    W, H = 1100, 560
    fig = Figure(figsize=(W / 100, H / 100), dpi=100)
    fig.subplots_adjust(left=0.0, right=1.0, top=0.86, bottom=0.12, wspace=0.0)
    allv = np.concatenate([np.asarray(m.vertices) for m in shown.values()]) if shown else np.zeros((1, 3))
    lo, hi = allv.min(0), allv.max(0)
    centre, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-6)
    for j, (elev, azim) in enumerate(((20, -60), (20, 120))):
        ax = fig.add_subplot(1, 2, j + 1, projection="3d")
        for k, (name, m) in enumerate(shown.items()):
            v, f = np.asarray(m.vertices), np.asarray(m.faces)
            face_bad = bad_v[name][f].any(axis=1)
            col = np.tile(np.asarray(to_rgba(_MESH_COLOURS[k % len(_MESH_COLOURS)], 0.28)), (len(f), 1))
            col[face_bad] = (1.0, 0.0, 0.0, 0.9)
            ax.add_collection3d(Poly3DCollection(v[f], facecolors=col, edgecolors="none"))
            if bad_v[name].any():
                p = v[bad_v[name]]
                ax.scatter(p[:, 0], p[:, 1], p[:, 2], color="red", s=4, depthshade=False)
        ax.set_xlim(centre[0] - half, centre[0] + half)
        ax.set_ylim(centre[1] - half, centre[1] + half)
        ax.set_zlim(centre[2] - half, centre[2] + half)
        ax.set_box_aspect((1, 1, 1))
        ax.view_init(elev=elev, azim=azim)
        ax.set_xlabel("x mm", fontsize=7)
        ax.set_ylabel("y mm", fontsize=7)
        ax.set_zlabel("z mm", fontsize=7)
        ax.tick_params(labelsize=6)
    total = sum(int(b.sum()) for b in bad_v.values())
    per_rule = "; ".join(f"{r}: " + ", ".join(f"{n} {c}" for n, c in cs.items()) for r, cs in counts.items())
    title = (f"{case}: meshes (world mm, ITK/LPS); {total} penetrating vertices (red)"
             + (f"; mesh TVS {_fmt(mesh_tvs, 4)}" if mesh_tvs is not None else "")
             + (f"\n{per_rule}" if per_rule else "\nno rule between these meshes")
             + (f"\ndecimated for drawing: {', '.join(decimated)}" if decimated else ""))
    fig.suptitle(title, fontsize=9)
    handles = [Patch(facecolor=to_rgba(_MESH_COLOURS[k % len(_MESH_COLOURS)], 0.5), label=n)
               for k, n in enumerate(shown)]
    handles.append(Line2D([], [], marker="o", color="red", linestyle="none", label="penetrating vertex / face"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    size = _save(fig, path)
    return size, {"penetrating_vertices": counts, "penetrating_total": total, "skipped_rules": skipped,
                  "decimated": decimated, "tolerance_mm": tol_mm}


# ------------------------------------------------------------------------------------------------ ordering, page
def sort_cases(entries: Sequence[Mapping]) -> List[Mapping]:
    """Worst first: TVS descending, then Betti error 3D descending, then case (reference file) name; cases whose
    TVS is undefined come after all others (then by Betti error), as do undefined Betti errors within a TVS."""
    def key(e):
        t = e["topology"]
        tvs, be = t.get("TVS"), t.get("betti_error_3d")
        return (_isnan(tvs), -(0.0 if _isnan(tvs) else float(tvs)), _isnan(be), -(0.0 if _isnan(be) else float(be)),
                os.path.basename(e["reference_file"]))
    return sorted(entries, key=key)


_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 12px; margin-bottom: 1em; }
th, td { border: 1px solid #bbb; padding: 3px 6px; text-align: right; }
th { background: #eee; vertical-align: bottom; max-width: 11em; }
td.name, th.name { text-align: left; }
tr.mean td { font-weight: bold; background: #f4f4f4; }
td.bad { background: #fde0e0; }
section.case { border-top: 2px solid #888; margin-top: 2em; padding-top: 0.5em; }
img { display: block; margin: 0.5em 0; border: 1px solid #ccc; max-width: 100%; height: auto; }
.note { color: #555; font-size: 12px; }
.warn { color: #a00; font-size: 12px; }
"""


def _td(text: str, bad: bool = False) -> str:
    return ('<td class="bad">' if bad else "<td>") + html.escape(text) + "</td>"


def _cell(v, p=3, bad=False) -> str:
    return _td(_fmt(v, p), bad)


def _img(src: str, meta: dict, alt: str, data: str = "") -> str:
    return (f'<img src="{html.escape(urllib.parse.quote(src))}" width="{meta["width"]}" height="{meta["height"]}" '
            f'alt="{html.escape(alt)}"{data}>')


def _page(summary: dict, rows: List[dict], spec: TopologySpec, label_ids: Sequence[int],
          label_names: Mapping[int, str], has_mesh: bool, ctx: dict) -> str:
    rules = [r.name for r in spec.rules]
    e = html.escape
    head = ["#", "case"] + [f"Dice {label_names.get(i, i)}" for i in label_ids] + ["TVS"] + \
        [f"violating voxels {r}" for r in rules] + ["Betti error 3D", "prior Betti error 3D"] + \
        (["mesh TVS"] if has_mesh else [])
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>nnunet-topo QC report: {e(ctx['title'])}</title>", f"<style>{_CSS}</style></head><body>",
           "<h1>Topology QC report</h1>",
           f'<p class="note">reference: {e(ctx["ref_folder"])}<br>prediction: {e(ctx["pred_folder"])}'
           + (f'<br>meshes: {e(ctx["mesh_folder"])}' if ctx.get("mesh_folder") else "")
           + (f'<br>images: {e(ctx["image_folder"])}' if ctx.get("image_folder") else "")
           + f'<br>written {e(ctx["written"])} by nnunet-topo {e(ctx["version"])}; numbers from '
             '<a href="summary_topology.json">summary_topology.json</a> (nnUNetv2_topo_evaluate_folder), figure '
             'metadata in <a href="report.json">report.json</a>; definitions in documentation/metrics.md</p>',
           f"<p><b>Cases sorted worst first: by TVS (descending), then by Betti error 3D (descending), then by name; "
           f"cases with undefined TVS last.</b> {len(rows)} case(s); figures for the first "
           f"{ctx['num_with_figures']}.</p>"]
    if ctx.get("not_evaluated"):
        out.append(f'<p class="warn">reference case(s) without prediction, not evaluated (--chill): '
                   f'{e(", ".join(ctx["not_evaluated"]))}</p>')
    out.append("<table><thead><tr>" + "".join(f'<th class="name">{e(h)}</th>' if h == "case" else f"<th>{e(h)}</th>"
                                            for h in head) + "</tr></thead><tbody>")
    t = summary["topology_mean"]
    mean_cells = [f"<td></td><td class=\"name\">mean ({t['num_cases']} cases)</td>"]
    for i in label_ids:
        mean_cells.append(_cell(summary["mean"].get(str(i), {}).get("Dice")))
    mean_cells.append(_cell(t.get("TVS"), 5))
    for r in rules:
        mean_cells.append(_cell(nanmean(x["entry"]["topology"]["violating_voxels"].get(r) for x in rows), 1))
    mean_cells.append(_cell(t.get("betti_error_3d"), 2))
    mean_cells.append(_cell(t.get("betti_prior_error_3d"), 2))
    if has_mesh:
        mean_cells.append(_cell(summary.get("mesh_topology_mean", {}).get("TVS"), 5))
    out.append('<tr class="mean">' + "".join(mean_cells) + "</tr>")
    for rank, row in enumerate(rows, 1):
        en, case = row["entry"], row["case"]
        topo = en["topology"]
        worst = set(topo.get("worst_case", {}).get("rules", []))
        name = (f'<a href="#{_slug(case)}">{e(case)}</a>' if row.get("figures") else e(case))
        cells = [f"<td>{rank}</td>", f'<td class="name">{name}</td>']
        for i in label_ids:
            cells.append(_cell(en["metrics"].get(str(i), {}).get("Dice")))
        tvs = topo.get("TVS")
        cells.append(_cell(tvs, 5, bad=not _isnan(tvs) and tvs > 0))
        for r in rules:
            v = topo["violating_voxels"].get(r)
            txt = _fmt(v) + (" (worst case)" if r in worst else "")
            cells.append(_td(txt, bool(v) or r in worst))
        be = topo.get("betti_error_3d")
        cells.append(_cell(be, 0, bad=not _isnan(be) and be > 0))
        cells.append(_cell(topo.get("betti_prior_error_3d"), 0))
        if has_mesh:
            cells.append(_cell(en.get("mesh_topology", {}).get("TVS"), 5))
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    out.append('<p class="note">TVS: violating voxels of all rules / reference foreground voxels (TPM Eq. 13); '
               "\"worst case\": the rule holds only because the prediction lacks one of its structures, and its TVS "
               "is the reference volume of its structures. Mean row: the evaluator's means; the violating-voxel "
               "mean is the mean of the per-case counts shown. Betti error 3D: sum over labels of "
               "|b(pred) - b(ref)|.</p>")
    for rank, row in enumerate(rows, 1):
        if not row.get("figures"):
            continue
        case, en, fig = row["case"], row["entry"], row["figures"]
        out.append(f'<section class="case" id="{_slug(case)}"><h2>{rank}. {e(case)}</h2>')
        out.append(f'<p class="note">TVS {e(_fmt(en["topology"].get("TVS"), 5))}; Betti error 3D '
                   f'{e(_fmt(en["topology"].get("betti_error_3d")))}; per label: '
                   + e("; ".join(f"{label_names.get(i, i)} Dice {_fmt(en['metrics'][str(i)].get('Dice'))}, "
                                f"Betti 3D pred {en['metrics'][str(i)].get('betti_3d_pred')} ref "
                                f"{en['metrics'][str(i)].get('betti_3d_ref')}" for i in label_ids if str(i) in
                                en["metrics"]))
                   + f"; drawn in {row['seconds']:.1f} s</p>")
        for w in en["topology"].get("warnings", []):
            out.append(f'<p class="warn">{e(w)}</p>')
        sl = fig["slices"]
        picked = ", ".join(f"axis {s['axis']} slice {s['index']} ({s['violating']} violating)" for s in sl["slices"])
        alt = f"{case}: slices {picked}"
        data = (f' data-slice-axis="{sl["slices"][0]["axis"]}" data-slices="'
                + ",".join(str(s["index"]) for s in sl["slices"]) + f'" data-selection="{sl["selection"]}"')
        crit = {"violations": "the slices with the most violating voxels", "disagreement":
                "no violations: the slices where reference and prediction disagree most", "foreground":
                "no violations and prediction = reference: the slices with the most foreground",
                "empty": "no foreground"}[sl["selection"]]
        out.append(f"<h3>Slices ({e(crit)})</h3>")
        out.append('<p class="note">solid: reference contour, dashed (darker): prediction contour, per label; '
                   "markers: violating voxels of the prediction, one shape and colour per rule (R1, R2, ... in the "
                   "legend; the evaluator's violation maps).</p>")
        out.append(_img(sl["file"], sl, alt, data))
        b = fig["betti"]
        out.append("<h3>Per-slice Betti numbers</h3>")
        out.append(_img(b["file"], b, f"{case}: per-slice Betti numbers, prediction vs reference and prior"))
        if "mesh" in fig:
            m = fig["mesh"]
            out.append("<h3>Meshes</h3>")
            out.append(_img(m["file"], m, f"{case}: meshes, {m['penetrating_total']} penetrating vertices"))
            if m.get("skipped_rules"):
                out.append('<p class="note">rules without meshes: '
                           + e("; ".join(f"{k}: {v}" for k, v in m["skipped_rules"].items())) + "</p>")
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ main
def _prepare_dir(report_dir: str) -> bool:
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
        _image_files(image_folder, fe, cases)
    if mesh_folder is not None:
        spec = spec_from_dataset_json(dataset_json)
        _check_mesh_folder(mesh_folder, cases, list(spec.mesh_structures))


def write_report(ref_folder: str, pred_folder: str, dataset_json: Union[str, os.PathLike, dict],
                 plans: Union[str, os.PathLike, dict], report_dir: str, mesh_folder: Optional[str] = None,
                 image_folder: Optional[str] = None, max_cases: Optional[int] = None, slices_per_case: int = 3,
                 num_processes: int = 1, ignore_geometry: bool = False, show_progress: bool = True) -> str:
    """Evaluate ``pred_folder`` against ``ref_folder`` (the evaluator, once; its summary goes to
    ``report_dir/summary_topology.json``, never into an input folder) and write the report. Returns the path of
    ``index.html``. Every reference case needs a prediction (no ``--chill``).

    Raises:
        ReportError / EvaluationError: see the module docstring and the evaluator (missing predictions, shape,
            spacing or geometry mismatch, unknown files, a report folder that is an input).
    """
    from nnunet_topo.evaluation import compute_topology_metrics_on_folder

    check_report_inputs(ref_folder, pred_folder, dataset_json, report_dir, mesh_folder, image_folder, max_cases,
                        slices_per_case, plans=plans)
    dataset_json = load_json_arg(dataset_json, "dataset.json")
    plans = load_json_arg(plans, "plans file")
    created = _prepare_dir(report_dir)
    try:
        summary = compute_topology_metrics_on_folder(
            ref_folder, pred_folder, dataset_json, plans, output_file=os.path.join(report_dir, "summary_topology.json"),
            num_processes=num_processes, chill=False, show_progress=show_progress, mesh_folder=mesh_folder,
            ignore_geometry=ignore_geometry)
    except BaseException:
        if created:
            shutil.rmtree(report_dir, ignore_errors=True)
        raise
    return write_report_from_summary(summary, ref_folder, pred_folder, dataset_json, plans, report_dir,
                                     mesh_folder=mesh_folder, image_folder=image_folder, max_cases=max_cases,
                                     slices_per_case=slices_per_case, show_progress=show_progress, _checked=True)


def write_report_from_summary(summary: dict, ref_folder: str, pred_folder: str,
                              dataset_json: Union[str, os.PathLike, dict], plans: Union[str, os.PathLike, dict],
                              report_dir: str, mesh_folder: Optional[str] = None, image_folder: Optional[str] = None,
                              max_cases: Optional[int] = None, slices_per_case: int = 3, show_progress: bool = True,
                              _checked: bool = False) -> str:
    """The report of an evaluator summary (``compute_topology_metrics_on_folder``'s result, e.g. after
    ``nnUNetv2_topo_evaluate_folder --report DIR``): reads each case's files named in the summary to draw it and
    checks that the violation maps give the summary's voxel counts. Returns the path of ``index.html``."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_topo import __version__
    from nnunet_topo.label_maps import check_geometry, image_geometry
    from nnunet_topo.violations import violation_maps_numpy

    if not _checked:
        check_report_inputs(ref_folder, pred_folder, dataset_json, report_dir, mesh_folder, image_folder, max_cases,
                            slices_per_case, plans=plans)
        _prepare_dir(report_dir)
    dataset_json = load_json_arg(dataset_json, "dataset.json")
    plans = load_json_arg(plans, "plans file")
    spec = spec_from_dataset_json(dataset_json)
    fe = dataset_json["file_ending"]
    entries = list(summary.get("metric_per_case", []))
    if not entries:
        raise ReportError("the summary holds no evaluated case")
    label_ids = [int(i) for i in PlansManager(plans).get_label_manager(dataset_json).foreground_labels]
    label_names = {int(v): k for k, v in spec.labels.items()}
    ignore_label = ignore_label_of(dataset_json)
    rules_in_summary = list(summary.get("rules", [r.name for r in spec.rules]))
    if rules_in_summary != [r.name for r in spec.rules]:
        raise ReportError(f"the summary was computed with the rules {rules_in_summary}, dataset.json has "
                          f"{[r.name for r in spec.rules]}; evaluate again with this dataset.json")
    ref_cases = sorted(f[: -len(fe)] for f in os.listdir(ref_folder) if f.endswith(fe))
    evaluated = [_case_name(e, fe) for e in entries]
    not_evaluated = [c for c in ref_cases if c not in set(evaluated)]
    images = _image_files(image_folder, fe, ref_cases, evaluated) if image_folder is not None else {}
    ordered = sort_cases(entries)
    n_fig = len(ordered) if max_cases is None else min(int(max_cases), len(ordered))
    rw = None
    has_mesh = mesh_folder is not None and "mesh_mean" in summary
    rows: List[dict] = []
    meta_cases = []
    it = list(enumerate(ordered))
    bar = None
    if show_progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=n_fig, desc="QC report")
        except ImportError:  # pragma: no cover
            bar = None
    cases_dir = os.path.join(report_dir, "cases")
    for rank, entry in it:
        case = _case_name(entry, fe)
        row = {"case": case, "entry": entry, "seconds": 0.0}
        rows.append(row)
        if rank >= n_fig:
            meta_cases.append({"case": case, "rank": rank + 1, "figures": None})
            continue
        if rw is None:  # nnU-Net's reader choice (it reads the example file once; not part of a case's time)
            rw = determine_reader_writer_from_dataset_json(dataset_json, entry["reference_file"], verbose=False)()
        t0 = time.perf_counter()
        ref, ref_props = _read_seg(rw, entry["reference_file"])
        pred, pred_props = _read_seg(rw, entry["prediction_file"])
        spacing = [float(s) for s in ref_props["spacing"]]
        if ref.shape != pred.shape:
            raise ReportError(f"shape mismatch: {entry['reference_file']} has shape {ref.shape}, "
                              f"{entry['prediction_file']} has {pred.shape} (the files changed after evaluation?)")
        full_shape = ref.shape
        ref, pred = _as_labels(ref), _as_labels(pred)
        # everything below runs on the box around the foreground of both (+ a margin of background): the violation
        # maps are exact there (outside an array is no structure), the rest of the image is background in both
        box = _foreground_box(ref, pred, _CROP_MARGIN, ignore_label)
        origin = [b.start for b in box]
        ref, pred = ref[box], pred[box]
        ignored = (ref == ignore_label) if ignore_label is not None else None
        if ignored is not None and not ignored.any():
            ignored = None
        image = None
        vmaps = violation_maps_numpy(pred, spec)
        counts = {k: int(np.count_nonzero(v)) for k, v in vmaps.items()}
        expected = {k: int(v) for k, v in entry["topology"]["violating_voxels"].items()}
        if counts != expected:
            raise ReportError(f"case {case}: the violation maps of {entry['prediction_file']} count {counts} voxels, "
                              f"the summary says {expected}; the summary belongs to other files or another "
                              "dataset.json; evaluate again")
        slices, selection = choose_slices(vmaps, spec, ref, pred, int(slices_per_case),
                                          None if ignored is None else ~ignored, origin)
        if case in images:  # only the drawn slices of the image are read (inside the box) where the reader can
            image = _image_slices(rw, images[case], box, slices, full_shape, spacing, ref_props,
                                  entry["reference_file"], check_geometry, image_geometry)
        figs: Dict[str, dict] = {}
        fn = f"{case}_slices.png"
        w, h = draw_slices(os.path.join(cases_dir, fn), case, slices, ref, pred, vmaps, spec, label_ids,
                           label_names, spacing, image, ignored, origin)
        figs["slices"] = {"file": f"cases/{fn}", "width": w, "height": h, "slices": slices, "selection": selection}
        fn = f"{case}_betti.png"
        (w, h), binfo = draw_betti(os.path.join(cases_dir, fn), case, ref, pred, spec, label_names, label_ids,
                                   ignored, origin, full_shape[int(spec.betti_2d_axis)])
        figs["betti"] = {"file": f"cases/{fn}", "width": w, "height": h, "axis": int(spec.betti_2d_axis),
                         "structures": binfo}
        if has_mesh and entry.get("mesh_files"):
            from nnunet_topo.mesh_evaluation import mesh_tvs_grid_step
            from nnunet_topo.meshes import read_mesh

            meshes = {}
            for s, p in entry["mesh_files"].items():
                try:
                    meshes[s] = read_mesh(p)
                except (ValueError, OSError) as err:
                    raise ReportError(f"case {case}, structure {s!r}: cannot read {p}: {err}") from err
            tol = 0.5 * mesh_tvs_grid_step(spacing)
            fn = f"{case}_mesh.png"
            (w, h), minfo = render_meshes(os.path.join(cases_dir, fn), case, meshes, spec, tol,
                                          entry.get("mesh_topology", {}).get("TVS"))
            figs["mesh"] = {"file": f"cases/{fn}", "width": w, "height": h, **minfo}
        row["figures"] = figs
        row["seconds"] = time.perf_counter() - t0
        meta_cases.append({"case": case, "rank": rank + 1, "figures": figs, "seconds": row["seconds"],
                           "shape": list(full_shape), "crop": [[b.start, b.stop] for b in box]})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    ctx = {"title": os.path.basename(os.path.normpath(pred_folder)), "ref_folder": os.path.abspath(ref_folder),
           "pred_folder": os.path.abspath(pred_folder),
           "mesh_folder": mesh_folder and os.path.abspath(mesh_folder),
           "image_folder": image_folder and os.path.abspath(image_folder),
           "written": time.strftime("%Y-%m-%d %H:%M:%S"), "version": __version__, "num_with_figures": n_fig,
           "not_evaluated": not_evaluated}
    page = _page(summary, rows, spec, label_ids, label_names, has_mesh, ctx)
    with open(os.path.join(report_dir, "summary_topology.json"), "w") as f:
        json.dump(to_builtin(summary), f, indent=2, sort_keys=True)
    with open(os.path.join(report_dir, "report.json"), "w") as f:
        json.dump(to_builtin({"order": "TVS descending, then betti_error_3d descending, then name; undefined TVS last",
                              "cases": meta_cases, "not_evaluated": not_evaluated,
                              "slices_per_case": int(slices_per_case), "max_cases": max_cases}), f, indent=2)
    index = os.path.join(report_dir, "index.html")
    with open(index, "w", encoding="utf-8") as f:
        f.write(page)
    return index


def report_entry(argv: Optional[Sequence[str]] = None) -> None:
    """``nnUNetv2_topo_report``."""
    import argparse

    from nnunet_topo.cli import _fail
    from nnunet_topo.mesh_evaluation import MeshEvaluationError
    from nnunet_topo.topology_spec import TopologySpecError

    parser = argparse.ArgumentParser(
        prog="nnUNetv2_topo_report",
        description="Evaluate predictions as nnUNetv2_topo_evaluate_folder does and write a static visual QC report "
                    "(REPORT_DIR/index.html, no server needed): the metric table, cases sorted worst first (TVS, "
                    "then Betti error), per case the slices with the most violating voxels, per-slice Betti numbers "
                    "against the priors and (with --mesh_folder) a render of the meshes with penetrating vertices "
                    "in red. Never writes into an input folder.")
    parser.add_argument("ref_folder", help="folder with reference segmentations (e.g. labelsTs)")
    parser.add_argument("pred_folder", help="folder with predicted segmentations")
    parser.add_argument("-djfile", required=True, help="dataset.json file (its 'topology' block holds the rules)")
    parser.add_argument("-pfile", required=True, help="plans.json file")
    parser.add_argument("-o", required=True, metavar="REPORT_DIR",
                        help="report folder (new, or one an earlier report wrote; never an input folder)")
    parser.add_argument("--mesh_folder", default=None,
                        help="folder with predicted meshes (nnUNetv2_topo_predict_meshes output): mesh metrics and a "
                             "mesh render per case")
    parser.add_argument("--image_folder", default=None,
                        help="images (imagesTs-style CASE_0000<file_ending>) drawn in grey under the contours")
    parser.add_argument("--max_cases", type=int, default=None,
                        help="figures for the N worst cases only (the table lists all)")
    parser.add_argument("--slices_per_case", type=int, default=3, help="slices drawn per case (default 3)")
    parser.add_argument("-np", type=int, default=1, help="processes for the evaluation (default 1)")
    parser.add_argument("--ignore_geometry", action="store_true",
                        help="evaluate even where origin or direction of a prediction differ from its reference")
    args = parser.parse_args(argv)
    try:
        index = write_report(args.ref_folder, args.pred_folder, args.djfile, args.pfile, args.o,
                             mesh_folder=args.mesh_folder, image_folder=args.image_folder, max_cases=args.max_cases,
                             slices_per_case=args.slices_per_case, num_processes=args.np,
                             ignore_geometry=args.ignore_geometry)
    except (TopologySpecError, EvaluationError, MeshEvaluationError, FileNotFoundError, *USER_ERRORS) as e:
        _fail(str(e))
    print(f"wrote {index}")
