"""The QC report's per-case figures (offscreen matplotlib, no pyplot): the chosen slices with contours and
violating voxels (:func:`draw_slices`) and the per-slice Betti numbers against the ``betti_2d`` prior
(:func:`draw_betti`)."""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from nnunet_topo.topology_spec import TopologySpec
from nnunet_topo.report.inputs import ReportError
from nnunet_topo.report.slices import label_mask, per_slice_counts


#: pixel size of one slice panel (width x height, title included) of ``CASE_slices.png``; legend rows below
PANEL_W, PANEL_H, LEGEND_ROW_H = 380, 430, 22


#: a slice crop larger than this (pixels, either side) is subsampled for drawing only
MAX_PANEL_PIXELS = 384


_RULE_COLOURS = ("#ff00ff", "#ffd700", "#00e5ff", "#ff7f00", "#7fff00", "#ff1493", "#1e90ff", "#ffffff")


#: marker and size (fraction of a drawn pixel) of the violating voxels of rule k
_RULE_MARKERS = (("s", 0.95), ("x", 0.7), ("+", 0.8), ("D", 0.45), ("o", 0.4), ("^", 0.5), ("v", 0.5), ("*", 0.6))


def figure_classes():
    """Offscreen matplotlib without pyplot (no global backend switch, no window): ``(Figure, FigureCanvasAgg)``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg


def save_png(fig, path: str) -> Tuple[int, int]:
    _, canvas_cls = figure_classes()
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

    Figure, _ = figure_classes()
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
    return save_png(fig, path)


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

    Figure, _ = figure_classes()
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
        unknown_slices = full(per_slice_counts(ignored, axis) > 0)
    rows = len(items)
    W, H = 1000, 60 + 200 * rows
    fig = Figure(figsize=(W / 100, H / 100), dpi=100)
    fig.subplots_adjust(left=0.07, right=0.76, top=1 - 50 / H, bottom=40 / H, hspace=0.6, wspace=0.25)
    x = np.arange(n)
    info = {}
    for r, (name, ids, allowed) in enumerate(items):
        mr, mp = label_mask(reference, ids), label_mask(prediction, ids)
        br, bp = full(betti_numbers_per_slice(mr, axis)), full(betti_numbers_per_slice(mp, axis))
        pres_r, pres_p = full(per_slice_counts(mr, axis) > 0), full(per_slice_counts(mp, axis) > 0)
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
    return save_png(fig, path), info
