"""The QC report's page: the static ``index.html`` (metric table, cases worst first by :func:`sort_cases`, the
figures of each case; no JavaScript, relative links only)."""
from __future__ import annotations

import html
import math
import os
import re
import urllib.parse
from typing import Any, List, Mapping, Sequence

import numpy as np

from nnunet_topo.summary_io import nanmean
from nnunet_topo.topology_spec import TopologySpec


def format_value(v: Any, p: int = 3) -> str:
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
    return _td(format_value(v, p), bad)


def _img(src: str, meta: dict, alt: str, data: str = "") -> str:
    return (f'<img src="{html.escape(urllib.parse.quote(src))}" width="{meta["width"]}" height="{meta["height"]}" '
            f'alt="{html.escape(alt)}"{data}>')


def render_page(summary: dict, rows: List[dict], spec: TopologySpec, label_ids: Sequence[int],
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
            txt = format_value(v) + (" (worst case)" if r in worst else "")
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
        out.append(f'<p class="note">TVS {e(format_value(en["topology"].get("TVS"), 5))}; Betti error 3D '
                   f'{e(format_value(en["topology"].get("betti_error_3d")))}; per label: '
                   + e("; ".join(f"{label_names.get(i, i)} Dice {format_value(en['metrics'][str(i)].get('Dice'))}, "
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
