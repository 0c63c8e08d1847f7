"""Visual QC report (nnunet_topo.report): page, links, images, slice choice, order, mesh penetration, errors."""
import dataclasses
import hashlib
import json
import os
import urllib.parse
from html.parser import HTMLParser

import numpy as np
import pytest
import SimpleITK as sitk
import trimesh
from PIL import Image

from nnunet_topo import synthetic as syn
from nnunet_topo.cli.report import report_entry
from nnunet_topo.report import (PANEL_W, ReportError, allowed_betti_2d, choose_slices, draw_betti, draw_slices,
                                penetrating_vertices, render_meshes, write_report)
from nnunet_topo.topology_spec import parse_topology
from nnunet_topo.summary_io import EvaluationError
from nnunet_topo.violations import violation_maps_numpy


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.ids, self.imgs, self.rows = [], set(), [], []
        self._row = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for k in ("src", "href"):
            if k in a:
                self.refs.append(a[k])
        if tag == "img":
            self.imgs.append(a)
        if tag == "tr":
            self._row = []
        if tag == "td" and self._row is not None:
            self._row.append("")

    def handle_data(self, data):
        if self._row:
            self._row[-1] += data

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            if self._row:
                self.rows.append(self._row)
            self._row = None


def _parse(index):
    p = _Refs()
    p.feed(open(index, encoding="utf-8").read())
    return p


def _write_like(arr, like_path, out_path):
    like = sitk.ReadImage(str(like_path))
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.CopyInformation(like)
    sitk.WriteImage(img, str(out_path))


def _digest(folder):
    return {n: hashlib.sha1(open(os.path.join(folder, n), "rb").read()).hexdigest() for n in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three test cases of the synthetic short-axis set: a perfect prediction, one with a septal hole (LV touches RV
    in one known slice), one with an extra RV blob (a Betti error, no rule violated)."""
    root = tmp_path_factory.mktemp("report")
    ds = syn.write_dataset(root / "raw", 901, "acdc", num_training=5, num_test=3, seed=0)
    labels_ts, pred = ds / "labelsTs", root / "pred"
    pred.mkdir()
    files = sorted(os.listdir(labels_ts))
    info = {"files": files}
    for i, f in enumerate(files):
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_ts / f)))
        if i == 1:
            lab, d = syn.plant_defect(lab, "septal_hole", syn.labels_for("acdc"), rng=0)
            info["septal"] = (f[:-7], d)
        elif i == 2:
            lab, d = syn.plant_defect(lab, "extra_component", syn.labels_for("acdc"), rng=0, structure="RV")
            info["blob"] = (f[:-7], d)
        else:
            info["perfect"] = f[:-7]
        _write_like(lab, labels_ts / f, pred / f)
    (root / "plans.json").write_text("{}")
    return {"root": root, "ds": ds, "ref": str(labels_ts), "pred": str(pred), "images": str(ds / "imagesTs"),
            "dj": str(ds / "dataset.json"), "plans": str(root / "plans.json"), **info}


@pytest.fixture(scope="module")
def report(dataset):
    before = {k: _digest(dataset[k]) for k in ("ref", "pred", "images")}
    out = str(dataset["root"] / "qc")
    index = write_report(dataset["ref"], dataset["pred"], dataset["dj"], dataset["plans"], out,
                         image_folder=dataset["images"], slices_per_case=3, show_progress=False)
    after = {k: _digest(dataset[k]) for k in ("ref", "pred", "images")}
    assert before == after  # never writes into an input folder
    return {"index": index, "dir": out, "meta": json.load(open(os.path.join(out, "report.json")))}


def test_page_links_and_images(report):
    page = _parse(report["index"])
    assert page.refs
    for ref in page.refs:
        assert "://" not in ref and not ref.startswith("/"), ref  # relative links only
        if ref.startswith("#"):
            assert ref[1:] in page.ids, ref
        else:
            assert os.path.isfile(os.path.join(report["dir"], urllib.parse.unquote(ref))), ref
    assert "<script" not in open(report["index"]).read()
    assert len(page.imgs) == 6  # slices + Betti per case, no meshes
    for img in page.imgs:
        with Image.open(os.path.join(report["dir"], urllib.parse.unquote(img["src"]))) as im:
            im.load()
            assert im.size == (int(img["width"]), int(img["height"]))
    for case in report["meta"]["cases"]:
        sl, b = case["figures"]["slices"], case["figures"]["betti"]
        assert sl["width"] == 3 * PANEL_W and len(sl["slices"]) == 3
        assert (b["width"], b["height"]) == (1000, 60 + 200 * 2)  # two betti_2d structures: LV and MYO
        for fig in (sl, b):
            with Image.open(os.path.join(report["dir"], fig["file"])) as im:
                assert im.size == (fig["width"], fig["height"])


def test_worst_case_first_and_defect_slice_first(report, dataset):
    septal, d = dataset["septal"]
    blob, db = dataset["blob"]
    order = [c["case"] for c in report["meta"]["cases"]]
    assert order == [septal, blob, dataset["perfect"]]  # TVS > 0, then TVS 0 with a Betti error, then perfect
    page = _parse(report["index"])
    data_rows = [r for r in page.rows if len(r) > 2]
    assert data_rows[0][1].startswith("mean")
    assert [r[1] for r in data_rows[1:]] == order
    assert "worst first" in open(report["index"]).read()
    # the septal hole: its slice is the first one drawn, with the violating voxels the evaluator counted there
    (defect_slice,) = d.slices
    first = report["meta"]["cases"][0]["figures"]["slices"]
    assert first["selection"] == "violations"
    assert (first["slices"][0]["axis"], first["slices"][0]["index"]) == (0, defect_slice)
    exp = d.expected["violation_voxels"]
    assert first["slices"][0]["violating"] <= sum(exp.values())
    img = [i for i in page.imgs if i["src"].endswith(f"{septal}_slices.png")][0]
    assert img["data-slices"].split(",")[0] == str(defect_slice)
    assert f"axis 0 slice {defect_slice} (" in img["alt"].split(",")[0]
    # no violation but a blob: the slice where reference and prediction disagree comes first
    second = report["meta"]["cases"][1]["figures"]["slices"]
    assert second["selection"] == "disagreement" and second["slices"][0]["index"] == db.slices[0]
    assert report["meta"]["cases"][2]["figures"]["slices"]["selection"] == "foreground"


def test_rerun_replaces_own_report_and_max_cases(dataset, report):
    index = write_report(dataset["ref"], dataset["pred"], dataset["dj"], dataset["plans"], report["dir"],
                         max_cases=1, slices_per_case=2, show_progress=False)
    meta = json.load(open(os.path.join(report["dir"], "report.json")))
    assert [c["figures"] is not None for c in meta["cases"]] == [True, False, False]
    assert len(meta["cases"][0]["figures"]["slices"]["slices"]) == 2
    assert sorted(os.listdir(os.path.join(report["dir"], "cases"))) == sorted(
        f"{meta['cases'][0]['case']}_{k}.png" for k in ("betti", "slices"))
    for ref in _parse(index).refs:
        assert ref.startswith("#") or os.path.isfile(os.path.join(report["dir"], urllib.parse.unquote(ref)))


def test_refuses_report_dir_that_is_an_input(dataset, tmp_path):
    args = (dataset["ref"], dataset["pred"], dataset["dj"], dataset["plans"])
    for out in (dataset["pred"], dataset["ref"], os.path.join(dataset["ref"], "qc"), dataset["images"]):
        with pytest.raises(ReportError, match="is the|lies inside the"):
            write_report(*args, out, image_folder=dataset["images"], show_progress=False)
    with pytest.raises(ReportError, match="contains the"):
        write_report(*args, str(dataset["root"]), show_progress=False)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ReportError, match="not written by nnUNetv2_topo_report"):
        write_report(*args, str(foreign), show_progress=False)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ReportError, match="positive integer"):
        write_report(*args, str(tmp_path / "q"), slices_per_case=0, show_progress=False)


def _copy_folder(src, dst):
    os.makedirs(dst)
    for n in os.listdir(src):
        with open(os.path.join(src, n), "rb") as a, open(os.path.join(dst, n), "wb") as b:
            b.write(a.read())
    return str(dst)


def test_input_errors(dataset, tmp_path):
    dj, plans, ref = dataset["dj"], dataset["plans"], dataset["ref"]
    files = dataset["files"]
    pred = _copy_folder(dataset["pred"], tmp_path / "pred")
    out = str(tmp_path / "qc")
    # missing prediction for a reference case
    os.remove(os.path.join(pred, files[0]))
    with pytest.raises(EvaluationError, match="have no prediction"):
        write_report(ref, pred, dj, plans, out, show_progress=False)
    assert not os.path.exists(out)  # a failed first report leaves no folder behind
    # shape and spacing mismatch
    lab = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(ref, files[0])))
    sitk.WriteImage(sitk.GetImageFromArray(np.pad(lab, ((0, 0), (0, 1), (0, 0)))), os.path.join(pred, files[0]))
    with pytest.raises(EvaluationError, match="shape mismatch"):
        write_report(ref, pred, dj, plans, out, show_progress=False)
    img = sitk.ReadImage(os.path.join(ref, files[0]))
    img.SetSpacing(tuple(s * 1.5 for s in img.GetSpacing()))
    sitk.WriteImage(img, os.path.join(pred, files[0]))
    with pytest.raises(EvaluationError, match="spacing mismatch"):
        write_report(ref, pred, dj, plans, out, show_progress=False)
    _write_like(lab, os.path.join(ref, files[0]), os.path.join(pred, files[0]))
    # unknown files
    sitk.WriteImage(sitk.GetImageFromArray(lab), os.path.join(pred, "stray.nii"))
    with pytest.raises(ReportError, match="unknown file"):
        write_report(ref, pred, dj, plans, out, show_progress=False)
    os.remove(os.path.join(pred, "stray.nii"))
    images = _copy_folder(dataset["images"], tmp_path / "images")
    sitk.WriteImage(sitk.GetImageFromArray(lab), os.path.join(images, "notacase_0000.nii.gz"))
    with pytest.raises(ReportError, match="unknown file"):
        write_report(ref, pred, dj, plans, out, image_folder=images, show_progress=False)
    os.remove(os.path.join(images, "notacase_0000.nii.gz"))
    # an image missing, an image of another shape
    first_image = os.path.join(images, files[0][:-7] + "_0000.nii.gz")
    kept = sitk.ReadImage(first_image)
    os.remove(first_image)
    with pytest.raises(ReportError, match="have no image"):
        write_report(ref, pred, dj, plans, out, image_folder=images, show_progress=False)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 8, 8), np.float32)), first_image)
    with pytest.raises(ReportError, match="shape mismatch: image"):
        write_report(ref, pred, dj, plans, out, image_folder=images, show_progress=False)
    sitk.WriteImage(kept, first_image)
    assert os.path.isfile(write_report(ref, pred, dj, plans, out, image_folder=images, show_progress=False))


def test_cli_entries(dataset, tmp_path, capsys):
    from nnunet_topo.cli.evaluate_folder import evaluate_folder_entry

    out = str(tmp_path / "qc_cli")
    report_entry([dataset["ref"], dataset["pred"], "-djfile", dataset["dj"], "-pfile", dataset["plans"], "-o", out,
                  "--slices_per_case", "1"])
    assert f"wrote {os.path.join(out, 'index.html')}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        report_entry([dataset["ref"], dataset["pred"], "-djfile", dataset["dj"], "-pfile", dataset["plans"],
                      "-o", dataset["pred"]])
    assert e.value.code == 2 and "input folder" in capsys.readouterr().err
    # the evaluator writes the same report after evaluating (its summary to -o, a copy in the report)
    out2 = str(tmp_path / "qc_eval")
    summary = str(tmp_path / "summary_topology.json")
    evaluate_folder_entry([dataset["ref"], dataset["pred"], "-djfile", dataset["dj"], "-pfile", dataset["plans"],
                           "-o", summary, "--report", out2, "--report_image_folder", dataset["images"]])
    assert os.path.isfile(os.path.join(out2, "index.html"))
    assert json.load(open(summary))["topology_mean"] == \
        json.load(open(os.path.join(out2, "summary_topology.json")))["topology_mean"]
    meta = json.load(open(os.path.join(out2, "report.json")))
    assert [c["case"] for c in meta["cases"]][0] == dataset["septal"][0]
    with pytest.raises(SystemExit):  # the report folder is checked before the evaluation
        evaluate_folder_entry([dataset["ref"], dataset["pred"], "-djfile", dataset["dj"], "-pfile", dataset["plans"],
                               "-o", summary, "--report", dataset["ref"]])


# ------------------------------------------------------------------------------------------------ pieces
def test_allowed_betti_2d_single_and_sets():
    assert allowed_betti_2d((1, 1)) == ((1, 1),)
    assert allowed_betti_2d([1, 0]) == ((1, 0),)
    assert allowed_betti_2d(((1, 1), (1, 0))) == ((1, 1), (1, 0))
    assert allowed_betti_2d([[2, 0]]) == ((2, 0),)


def test_betti_plot_with_a_set_of_allowed_vectors(tmp_path):
    ph = syn.make_phantom("acdc", 0)
    spec = parse_topology({"labels": syn.labels_for("acdc"), "topology": syn.topology_block("acdc")})
    pred, d = syn.plant_defect(ph.label, "wall_hole", ph.labels, rng=0)
    (z,) = d.slices
    names = {v: k for k, v in ph.labels.items()}
    (w, h), info = draw_betti(str(tmp_path / "b.png"), "c", ph.label, pred, spec, names, [1, 2, 3])
    assert info["MYO"]["slices_off_prior_pred"] == [z] and info["MYO"]["slices_off_prior_ref"] == []
    # a set of allowed vectors (MYO may be a ring or a disk-free crescent): the cut ring (1, 0) is allowed now
    spec2 = dataclasses.replace(spec, betti_2d={**spec.betti_2d, "MYO": ((1, 1), (1, 0))})
    (w2, h2), info2 = draw_betti(str(tmp_path / "b2.png"), "c", ph.label, pred, spec2, names, [1, 2, 3])
    assert info2["MYO"]["slices_off_prior_pred"] == [] and info2["MYO"]["allowed"] == [[1, 1], [1, 0]]
    with Image.open(tmp_path / "b2.png") as im:
        assert im.size == (w2, h2) == (w, h)


def test_large_slices_are_subsampled_for_drawing_only(tmp_path):
    spec = parse_topology({"labels": {"background": 0, "A": 1, "B": 2},
                           "topology": {"rules": [{"type": "exclusion", "a": "A", "b": "B"}]}})
    ref = np.zeros((3, 900, 900), np.uint8)
    ref[:, 20:880, 20:440] = 1
    ref[:, 20:880, 460:880] = 2
    pred = ref.copy()
    pred[1, 500, 440:460] = 1  # A touches B in slice 1 only
    vmaps = violation_maps_numpy(pred, spec)
    slices, selection = choose_slices(vmaps, spec, ref, pred, k=2)
    assert selection == "violations" and slices[0]["index"] == 1 and slices[0]["violating"] == 2
    assert slices[1]["reason"] == "foreground"
    w, h = draw_slices(str(tmp_path / "s.png"), "big", slices, ref, pred, vmaps, spec, [1, 2], {1: "A", 2: "B"},
                       (2.0, 0.5, 0.5))
    with Image.open(tmp_path / "s.png") as im:
        assert im.size == (w, h) and w == 2 * PANEL_W


MESH_SPEC = {"labels": {"background": 0, "A": 1, "B": 2},
             "topology": {"rules": [{"type": "exclusion", "a": "A", "b": "B"}],
                          "mesh_structures": {"A": ["A"], "B": ["B"]}}}
INCL_SPEC = {"labels": {"background": 0, "I": 1, "M": 2},
             "topology": {"rules": [{"type": "inclusion", "inner": "I", "outer": ["I", "M"]}],
                          "mesh_structures": {"inner": ["I"], "outer": ["I", "M"]}}}


def _box(centre, size, subdivisions=2):
    m = trimesh.creation.box(extents=size)
    for _ in range(subdivisions):
        m = m.subdivide()
    m.apply_translation(centre)
    return m


def test_mesh_penetration_and_render(tmp_path):
    spec = parse_topology(MESH_SPEC)
    overlapping = {"A": _box((0, 0, 0), (10, 10, 10)), "B": _box((7, 0, 0), (10, 10, 10))}
    flags, skipped = penetrating_vertices(overlapping, spec, tol_mm=0.5)
    assert not skipped
    a_in_b = flags["exclusion(A,B)"]["A"]
    assert a_in_b.sum() > 0 and flags["exclusion(A,B)"]["B"].sum() > 0
    assert np.all(overlapping["A"].vertices[a_in_b][:, 0] > 2.0 - 1e-9)  # inside B = x > 2
    (w, h), info = render_meshes(str(tmp_path / "m.png"), "c", overlapping, spec, 0.5, mesh_tvs=0.1)
    assert info["penetrating_total"] > 0
    with Image.open(tmp_path / "m.png") as im:
        assert im.size == (w, h)
    apart = {"A": _box((0, 0, 0), (10, 10, 10)), "B": _box((12, 0, 0), (10, 10, 10))}
    (w, h), info = render_meshes(str(tmp_path / "m2.png"), "c", apart, spec, 0.5)
    assert info["penetrating_total"] == 0 and info["penetrating_vertices"]["exclusion(A,B)"] == {"A": 0, "B": 0}
    assert os.path.isfile(tmp_path / "m2.png")
    # decimation above the face limit, for drawing
    (_, _), info = render_meshes(str(tmp_path / "m3.png"), "c", overlapping, spec, 0.5, max_faces=100)
    assert info["decimated"] and info["penetrating_total"] > 0


def test_mesh_inclusion_vertices_outside_the_outer_mesh():
    spec = parse_topology(INCL_SPEC)
    inside = {"inner": _box((0, 0, 0), (6, 6, 6)), "outer": _box((0, 0, 0), (10, 10, 10))}
    assert penetrating_vertices(inside, spec, 0.5)[0]["inclusion(I in I+M)"]["inner"].sum() == 0
    out = {"inner": _box((4, 0, 0), (6, 6, 6)), "outer": _box((0, 0, 0), (10, 10, 10))}
    assert penetrating_vertices(out, spec, 0.5)[0]["inclusion(I in I+M)"]["inner"].sum() > 0
    # coincident surfaces (an inner mesh sharing the outer one's faces) are not flagged with a tolerance
    same = {"inner": _box((0, 0, 0), (10, 10, 10)), "outer": _box((0, 0, 0), (10, 10, 10))}
    assert penetrating_vertices(same, spec, 0.5)[0]["inclusion(I in I+M)"]["inner"].sum() == 0


def test_report_with_mesh_folder(tmp_path):
    """End to end with a mesh folder: two small box structures, meshes overlapping in one case, apart in the other."""
    from nnunet_topo.frames import ImageGeometry
    from nnunet_topo.mesh_io import export_mesh
    from nnunet_topo.surfaces import mesh_from_mask

    ref_dir, pred_dir, mesh_dir = (tmp_path / n for n in ("ref", "pred", "meshes"))
    for d in (ref_dir, pred_dir, mesh_dir):
        d.mkdir()
    lab = np.zeros((8, 16, 20), np.uint8)
    lab[2:6, 3:12, 2:8] = 1
    lab[2:6, 3:12, 11:17] = 2
    geom = ImageGeometry.identity()
    for case, shift in (("c0", 0), ("c1", 5)):
        img = sitk.GetImageFromArray(lab)
        sitk.WriteImage(img, str(ref_dir / f"{case}.nii.gz"))
        sitk.WriteImage(img, str(pred_dir / f"{case}.nii.gz"))
        a = mesh_from_mask(lab == 1, geom)
        a.apply_translation((shift, 0, 0))  # c1: A pushed 5 mm into B
        export_mesh(a, str(mesh_dir / f"{case}_A.vtk"))
        export_mesh(mesh_from_mask(lab == 2, geom), str(mesh_dir / f"{case}_B.vtk"))
    dj = dict(MESH_SPEC, file_ending=".nii.gz", channel_names={"0": "CT"}, numTraining=2)
    out = str(tmp_path / "qc")
    index = write_report(str(ref_dir), str(pred_dir), dj, {}, out, mesh_folder=str(mesh_dir), show_progress=False)
    meta = json.load(open(os.path.join(out, "report.json")))
    by_case = {c["case"]: c["figures"]["mesh"] for c in meta["cases"]}
    assert by_case["c1"]["penetrating_total"] > 0 and by_case["c0"]["penetrating_total"] == 0
    page = _parse(index)
    mesh_imgs = [i for i in page.imgs if i["src"].endswith("_mesh.png")]
    assert len(mesh_imgs) == 2
    for i in mesh_imgs:
        with Image.open(os.path.join(out, i["src"])) as im:
            assert im.size == (int(i["width"]), int(i["height"]))
    (mesh_dir / "c9_A.vtk").write_text("")
    with pytest.raises(ReportError, match="unknown mesh file"):
        write_report(str(ref_dir), str(pred_dir), dj, {}, out, mesh_folder=str(mesh_dir), show_progress=False)


def test_image_slices_are_the_drawn_slices_of_the_image(dataset, tmp_path):
    """Only the drawn slices of the image are read (a region inside the case's box); they equal the whole image's
    slices; an image elsewhere in patient space is refused."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunet_topo.label_maps import check_geometry, image_geometry
    from nnunet_topo.report.inputs import (foreground_box as _foreground_box, image_slices as _image_slices,
                                           read_file as _read)

    rw = SimpleITKIO()
    case = dataset["septal"][0]
    ref, props = _read(rw, os.path.join(dataset["ref"], case + ".nii.gz"))
    box = _foreground_box(ref, ref, 8)
    slices = [{"axis": 0, "index": 4}, {"axis": 0, "index": 2}]
    path = os.path.join(dataset["images"], case + "_0000.nii.gz")
    got = _image_slices(rw, path, box, slices, ref.shape, props["spacing"], props, "ref", check_geometry,
                        image_geometry)
    full = sitk.GetArrayFromImage(sitk.ReadImage(path))
    for s in slices:
        np.testing.assert_array_equal(got[(0, s["index"])], full[s["index"]][box[1], box[2]])
    moved = sitk.ReadImage(path)
    moved.SetOrigin(tuple(o + 5.0 for o in moved.GetOrigin()))
    sitk.WriteImage(moved, str(tmp_path / "moved.nii.gz"))
    with pytest.raises(EvaluationError, match="geometry mismatch"):
        _image_slices(rw, str(tmp_path / "moved.nii.gz"), box, slices, ref.shape, props["spacing"], props, "ref",
                      check_geometry, image_geometry)


def test_sparse_reference(tmp_path):
    """nnU-Net's ignore label: ignored voxels are unknown, drawn grey; they do not count as foreground (crop box,
    slice choice) or as disagreement."""
    labels = dict(syn.labels_for("acdc"), ignore=4)
    for d in ("ref", "pred"):
        (tmp_path / d).mkdir()
    ph = syn.make_phantom("acdc", 0)
    ref = ph.label.copy()
    ref[::2][ref[::2] == 0] = 4  # background of the even slices unknown
    pred, defect = syn.plant_defect(ph.label, "septal_hole", ph.labels, rng=0)
    for d, a in (("ref", ref), ("pred", pred)):
        img = sitk.GetImageFromArray(a.astype(np.uint8))
        img.SetSpacing(ph.spacing[::-1])
        sitk.WriteImage(img, str(tmp_path / d / "c0.nii.gz"))
    dj = {"labels": labels, "file_ending": ".nii.gz", "channel_names": {"0": "MRI"}, "numTraining": 1,
          "topology": syn.topology_block("acdc")}
    write_report(str(tmp_path / "ref"), str(tmp_path / "pred"), dj, {}, str(tmp_path / "qc"), show_progress=False)
    (case,) = json.load(open(tmp_path / "qc" / "report.json"))["cases"]
    sl = case["figures"]["slices"]["slices"]
    assert sl[0]["index"] == defect.slices[0] and sl[0]["reason"] == "violations"
    assert all(s["disagreement"] == 0 for s in sl[1:])  # the prediction's background on ignored voxels is no error
    fg = np.argwhere((ph.label != 0) | (pred != 0))
    crop = case["crop"]
    assert all(crop[a][0] <= fg[:, a].min() and fg[:, a].max() < crop[a][1] for a in range(3))
    assert crop[1][1] - crop[1][0] < ref.shape[1]  # not the whole image: ignored voxels are not foreground
