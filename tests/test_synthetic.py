"""Tests of nnunet_topo.synthetic: phantom presets, their topology guarantees, planted defects, dataset writing.

Everything the generator promises is checked here with implementations that are independent of the module's own
(shifted-array neighbour tests for the rules, ``skimage.measure.euler_number`` for b1, ``scipy.ndimage.label``
with 26-/6-connectivity in 3D and 8-/4-connectivity in 2D for components and holes).
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import euler_number

from nnunet_topo import synthetic as syn
from nnunet_topo.metrics.topology import betti_numbers_2d

S26 = ndimage.generate_binary_structure(3, 3)
S6 = ndimage.generate_binary_structure(3, 1)
S8 = ndimage.generate_binary_structure(2, 2)
S4 = ndimage.generate_binary_structure(2, 1)

TINY = {"acdc": (8, 40, 40), "wholeheart": (32, 40, 40)}


# ----------------------------------------------------------------------------------------------- independent helpers
def betti3d(mask: np.ndarray) -> tuple[int, int, int]:
    """(b0, b1, b2): 26-connected foreground, 6-connected background, outside = background."""
    if not mask.any():
        return (0, 0, 0)
    m = np.pad(mask.astype(bool), 1)
    _, b0 = ndimage.label(m, S26)
    _, nbg = ndimage.label(~m, S6)
    b2 = nbg - 1
    b1 = b0 + b2 - int(euler_number(m, connectivity=3))
    return (int(b0), int(b1), int(b2))


def betti2d(mask2d: np.ndarray) -> tuple[int, int]:
    """(b0, b1): 8-connected components, holes = 4-connected background components not touching the border."""
    if not mask2d.any():
        return (0, 0)
    m = np.pad(mask2d.astype(bool), 1)
    _, b0 = ndimage.label(m, S8)
    bg, nbg = ndimage.label(~m, S4)
    return (int(b0), int(nbg - 1))


def _shift(a: np.ndarray, offset: tuple[int, int, int]) -> np.ndarray:
    """``out[p] = a[p + offset]`` with zeros outside the array."""
    out = np.zeros_like(a)
    src = tuple(slice(max(o, 0), a.shape[i] + min(o, 0)) for i, o in enumerate(offset))
    dst = tuple(slice(max(-o, 0), a.shape[i] + min(-o, 0)) for i, o in enumerate(offset))
    out[dst] = a[src]
    return out


def _neighbourhood(a: np.ndarray, in_plane: bool) -> np.ndarray:
    """Voxels with a face neighbour in ``a`` (6-neighbourhood, or the in-plane 4 of axis-0 slices)."""
    offs = [(0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)] + ([] if in_plane else [(1, 0, 0), (-1, 0, 0)])
    out = np.zeros_like(a)
    for o in offs:
        out |= _shift(a, o)
    return out


def violations(label: np.ndarray, rule: dict, labels: dict) -> np.ndarray:
    """DESIGN §4 violation voxels, written with shifts (independent of the module)."""
    def region(names):
        names = [names] if isinstance(names, str) else names
        return np.isin(label, [labels[n] for n in names])

    in_plane = rule.get("mode", "3d") == "2d"
    assert rule.get("axis", 0) == 0
    if rule["type"] == "exclusion":
        a, b = region(rule["a"]), region(rule["b"])
        return (a & _neighbourhood(b, in_plane)) | (b & _neighbourhood(a, in_plane))
    inner = region(rule["inner"])
    allowed = region(list(rule["outer"]) + list(rule.get("may_touch", [])))
    return (inner & _neighbourhood(~allowed, in_plane)) | (_neighbourhood(inner, in_plane) & ~allowed)


def expected_rule_name(rule: dict) -> str:
    j = lambda x: x if isinstance(x, str) else "+".join(x)  # noqa: E731
    if rule["type"] == "exclusion":
        name = f"exclusion({j(rule['a'])},{j(rule['b'])})"
    else:
        name = f"inclusion({j(rule['inner'])} in {j(rule['outer'])}"
        name += f" | may_touch {j(rule['may_touch'])})" if rule.get("may_touch") else ")"
    return name + (" [2d axis 0]" if rule.get("mode") == "2d" else "")


def assert_valid_reference(ph: syn.Phantom) -> None:
    topo = syn.topology_block(ph.preset)
    label, labels = ph.label, ph.labels
    assert set(np.unique(label).tolist()) == set(labels.values())
    for rule in topo["rules"]:
        assert not violations(label, rule, labels).any(), expected_rule_name(rule)
    for name, prior in topo["betti"].items():
        assert betti3d(label == labels[name]) == tuple(prior), name
        if name != "MYO":  # cavities are even 6-connected; a 1-voxel septum may be joined by edges only
            _, n6 = ndimage.label(label == labels[name], S6)
            assert n6 == 1, f"{name} is not one 6-connected component"
    b2 = dict(topo.get("betti_2d", {}))
    b2.pop("axis", None)
    for name, prior in b2.items():
        for z in range(label.shape[0]):
            m = label[z] == labels[name]
            if m.any():
                assert betti2d(m) == tuple(prior), (name, z)
    fg = label != 0
    assert not (fg[[0, -1]].any() or fg[:, [0, -1]].any() or fg[:, :, [0, -1]].any())


# ----------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("preset", ["acdc", "wholeheart"])
def test_labels_shape_dtype_and_spacing(preset):
    ph = syn.make_phantom(preset, 0)
    p = syn.PRESETS[preset]
    assert ph.image.shape == ph.label.shape == p.default_shape
    assert ph.image.dtype == np.float32 and ph.label.dtype == np.uint8
    assert np.isfinite(ph.image).all()
    assert ph.labels == syn.labels_for(preset) == p.labels
    assert set(np.unique(ph.label).tolist()) == set(p.labels.values())
    assert len(ph.spacing) == 3 and ph.spacing[1] == ph.spacing[2]
    for s, (lo, hi) in zip(ph.spacing, p.spacing_range):
        assert lo <= s <= hi
    assert len(ph.origin) == 3 and len(ph.direction) == 9
    assert ph.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def test_label_orders():
    assert syn.labels_for("acdc") == {"background": 0, "RV": 1, "MYO": 2, "LV": 3}
    assert syn.labels_for("wholeheart") == {"background": 0, "LV": 1, "MYO": 2, "RV": 3, "LA": 4, "RA": 5, "AO": 6}


def test_spacing_anisotropy():
    for seed in range(5):
        a = syn.make_phantom("acdc", seed, TINY["acdc"])
        assert 6.0 <= a.spacing[0] <= 10.0 and 1.3 <= a.spacing[1] <= 1.8
        w = syn.make_phantom("wholeheart", seed, TINY["wholeheart"])
        assert max(w.spacing) / min(w.spacing) < 1.3 and 0.9 <= min(w.spacing) and max(w.spacing) <= 1.5


@pytest.mark.parametrize("preset", ["acdc", "wholeheart"])
def test_deterministic_per_seed_and_seeds_differ(preset):
    a = syn.make_phantom(preset, 11, TINY[preset])
    b = syn.make_phantom(preset, 11, TINY[preset])
    c = syn.make_phantom(preset, 12, TINY[preset])
    np.testing.assert_array_equal(a.label, b.label)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.spacing == b.spacing and a.origin == b.origin
    assert not np.array_equal(a.label, c.label)
    assert not np.array_equal(a.image, c.image)
    g = syn.make_phantom(preset, np.random.default_rng(11), TINY[preset])
    assert g.label.shape == TINY[preset]


@pytest.mark.parametrize("preset,shape,seeds", [
    ("acdc", None, range(12)),
    ("acdc", TINY["acdc"], range(12)),
    ("acdc", (6, 32, 32), range(6)),
    ("wholeheart", None, range(5)),
    ("wholeheart", TINY["wholeheart"], range(8)),
])
def test_rules_and_priors_hold_on_many_seeds(preset, shape, seeds):
    for seed in seeds:
        ph = syn.make_phantom(preset, seed, shape)
        assert_valid_reference(ph)
        assert syn.check_reference(ph.label, preset) == []


@pytest.mark.parametrize("preset", ["acdc", "wholeheart"])
def test_septum_is_thin(preset):
    for seed in range(6):
        ph = syn.make_phantom(preset, seed, TINY[preset] if seed % 2 else None)
        lv = ph.label == ph.labels["LV"]
        rv = ph.label == ph.labels["RV"]
        dist = ndimage.distance_transform_edt(~rv)  # voxel units
        d = dist[lv].min()
        assert 1.0 < d <= 3.0, f"seed {seed}: LV-RV distance {d} voxels"


def test_acdc_myo_rings_and_lv_discs():
    for seed in range(8):
        ph = syn.make_phantom("acdc", seed, TINY["acdc"] if seed % 2 else None)
        lab = ph.labels
        lv_slices = [z for z in range(ph.label.shape[0]) if (ph.label[z] == lab["LV"]).any()]
        myo_slices = [z for z in range(ph.label.shape[0]) if (ph.label[z] == lab["MYO"]).any()]
        rv_slices = [z for z in range(ph.label.shape[0]) if (ph.label[z] == lab["RV"]).any()]
        assert lv_slices == myo_slices and len(lv_slices) >= 3
        assert set(rv_slices) <= set(lv_slices)
        for z in lv_slices:
            assert betti2d(ph.label[z] == lab["MYO"]) == (1, 1)
            assert betti2d(ph.label[z] == lab["LV"]) == (1, 0)
        # through-plane the LV touches background at base and apex (so the 3D inclusion rule is not a rule)
        inc3d = {"type": "inclusion", "inner": "LV", "outer": ["LV", "MYO"]}
        assert violations(ph.label, inc3d, lab).any()


def test_wholeheart_openings():
    ph = syn.make_phantom("wholeheart", 3)
    lab = ph.labels
    lv = ph.label == lab["LV"]
    touched = set(np.unique(ph.label[_neighbourhood(lv, False) & ~lv]).tolist())
    assert touched == {lab["MYO"], lab["LA"], lab["AO"]}


def test_generation_is_fast():
    import time

    for preset in ("acdc", "wholeheart"):
        syn.make_phantom(preset, 0)
        t = time.perf_counter()
        syn.make_phantom(preset, 1)
        assert time.perf_counter() - t < 1.0


# ----------------------------------------------------------------------------------------------- topology block
@pytest.mark.parametrize("preset", ["acdc", "wholeheart"])
def test_topology_block(preset):
    topo = syn.topology_block(preset)
    assert json.loads(json.dumps(topo)) == topo
    assert topo["connectivity"] == 6
    names = set(syn.labels_for(preset))
    for rule in topo["rules"]:
        for key in ("a", "b", "inner", "outer", "may_touch"):
            if key in rule:
                vals = [rule[key]] if isinstance(rule[key], str) else rule[key]
                assert set(vals) <= names
        assert syn.rule_name(rule) == expected_rule_name(rule)
    topo["rules"].clear()
    assert syn.topology_block(preset)["rules"], "topology_block must return a fresh copy"


def test_topology_block_contents():
    acdc = syn.topology_block("acdc")
    assert {"type": "exclusion", "a": "LV", "b": "RV"} in acdc["rules"]
    assert {"type": "inclusion", "inner": "LV", "outer": ["LV", "MYO"], "mode": "2d", "axis": 0} in acdc["rules"]
    assert acdc["betti"]["MYO"] == [1, 1, 0]  # ring stack open at base and apex: a tube
    assert acdc["betti_2d"]["MYO"] == [1, 1] and acdc["betti_2d"]["axis"] == 0
    wh = syn.topology_block("wholeheart")
    names = [syn.rule_name(r) for r in wh["rules"]]
    assert names == ["exclusion(LV,RV)", "exclusion(LA,RA)", "exclusion(LV,RA)", "exclusion(RV,LA)",
                     "inclusion(LV in LV+MYO | may_touch LA+AO)"]


def test_topology_block_parses_with_rules_module():
    rules = pytest.importorskip("nnunet_topo.topology_spec")
    for preset in ("acdc", "wholeheart"):
        spec = rules.parse_topology({"labels": syn.labels_for(preset), "topology": syn.topology_block(preset)})
        assert [r.name for r in spec.rules] == [syn.rule_name(r) for r in syn.topology_block(preset)["rules"]]


# ----------------------------------------------------------------------------------------------- planted defects
def _check_defect(label: np.ndarray, new: np.ndarray, d: syn.PlantedDefect, labels: dict, topo: dict) -> None:
    """Every metric change of the defect, recomputed independently, equals ``d.expected`` (and nothing else)."""
    np.testing.assert_array_equal(d.mask, new != label)
    assert d.slices == tuple(int(z) for z in np.flatnonzero(d.mask.any(axis=(1, 2))))
    exp = d.expected
    betti_changes, cce, slice_changes = {}, {}, {}
    for name, i in labels.items():
        if i == 0:
            continue
        b, a = betti3d(label == i), betti3d(new == i)
        if a != b:
            betti_changes[name] = a
            assert exp["betti_error_3d"][name] == sum(abs(x - y) for x, y in zip(a, b))
        if a[0] != b[0]:
            cce[name] = abs(a[0] - b[0])
        per = {z: betti2d(new[z] == i) for z in range(label.shape[0])
               if betti2d(new[z] == i) != betti2d(label[z] == i)}
        if per:
            slice_changes[name] = per
    assert exp["betti_3d"] == betti_changes
    assert exp["cce_3d"] == cce
    assert exp["betti_2d_slices"] == slice_changes
    violated = []
    for rule in topo["rules"]:
        v = violations(new, rule, labels)
        assert not violations(label, rule, labels).any()
        if v.any():
            name = expected_rule_name(rule)
            violated.append(name)
            assert exp["violation_voxels"][name] == int(v.sum())
            assert exp["violation_slices"][name] == tuple(int(z) for z in np.flatnonzero(v.any(axis=(1, 2))))
            # violations appear only next to the planted change
            assert not (v & ~ndimage.binary_dilation(d.mask, S26)).any()
    assert exp["violated_rules"] == violated


@pytest.mark.parametrize("preset", ["acdc", "wholeheart"])
@pytest.mark.parametrize("kind", ["septal_hole", "bridge", "wall_hole", "extra_component"])
def test_planted_defects(preset, kind):
    topo = syn.topology_block(preset)
    for seed in range(3):
        ph = syn.make_phantom(preset, seed, TINY[preset] if seed % 2 else None)
        lab = ph.labels
        before = ph.label.copy()
        new, d = syn.plant_defect(ph.label, kind, lab, seed)
        np.testing.assert_array_equal(ph.label, before)  # input untouched
        assert new.dtype == ph.label.dtype and d.kind == kind and d.mask.any()
        _check_defect(ph.label, new, d, lab, topo)
        excl = "exclusion(LV,RV)"
        incl = syn.rule_name(topo["rules"][-1])
        if kind in ("septal_hole", "bridge"):
            assert d.structure == ("LV" if kind == "septal_hole" else "RV")
            assert len(d.slices) == 1
            assert excl in d.expected["violated_rules"]
            assert set(np.unique(ph.label[d.mask]).tolist()) == {lab["MYO"]}
            assert set(np.unique(new[d.mask]).tolist()) == {lab[d.structure]}
        elif kind == "wall_hole":
            (z,) = d.slices
            assert d.structure == "MYO"
            assert betti2d(ph.label[z] == lab["MYO"]) == (1, 1) or preset == "wholeheart"
            b = betti2d(ph.label[z] == lab["MYO"])
            assert d.expected["betti_2d_slices"]["MYO"][z] == (b[0], b[1] - 1)
            assert d.expected["violated_rules"] == [incl]
            assert excl not in d.expected["violated_rules"]
            assert set(np.unique(new[d.mask]).tolist()) == {0}
        else:
            s = d.structure
            b = betti3d(ph.label == lab[s])
            assert d.expected["betti_3d"][s] == (b[0] + 1, b[1], b[2])
            assert d.expected["cce_3d"] == {s: 1}
            assert set(np.unique(ph.label[ndimage.binary_dilation(d.mask, S26)]).tolist()) == {0}
            if s == "LV":
                assert d.expected["violated_rules"] == [incl]
            else:
                assert d.expected["violated_rules"] == []


def test_planted_defect_acdc_expected_values():
    """The documented effects on an ACDC phantom, spelled out."""
    ph = syn.make_phantom("acdc", 0)
    lab = ph.labels
    _, d = syn.plant_defect(ph.label, "wall_hole", lab, 0)
    (z,) = d.slices
    assert d.expected["betti_2d_slices"] == {"MYO": {z: (1, 0)}}
    assert d.expected["violated_rules"] == ["inclusion(LV in LV+MYO) [2d axis 0]"]
    assert d.expected["violation_slices"] == {"inclusion(LV in LV+MYO) [2d axis 0]": (z,)}
    lv_slices = np.flatnonzero((ph.label == lab["LV"]).any(axis=(1, 2)))
    interior = lv_slices[0] < z < lv_slices[-1]
    # a cut between two intact ring slices is a window in the tube: one more tunnel; at an end it is a notch
    assert d.expected.get("betti_3d", {}).get("MYO", (1, 1, 0)) == ((1, 2, 0) if interior else (1, 1, 0))
    _, d = syn.plant_defect(ph.label, "extra_component", lab, 0, structure="RV")
    assert d.expected["betti_3d"] == {"RV": (2, 0, 0)} and d.expected["cce_3d"] == {"RV": 1}
    assert d.expected["violated_rules"] == []


def test_planted_defects_agree_with_metrics_and_violations_modules():
    topology = pytest.importorskip("nnunet_topo.metrics.topology")
    violations_mod = pytest.importorskip("nnunet_topo.violations")
    rules = pytest.importorskip("nnunet_topo.topology_spec")
    for preset in ("acdc", "wholeheart"):
        ph = syn.make_phantom(preset, 5, TINY[preset])
        spec = rules.parse_topology({"labels": ph.labels, "topology": syn.topology_block(preset)})
        assert not any(v.any() for v in violations_mod.violation_maps_numpy(ph.label, spec).values())
        for kind in syn.DEFECT_KINDS:
            new, d = syn.plant_defect(ph.label, kind, ph.labels, 5)
            vm = violations_mod.violation_maps_numpy(new, spec)
            assert [n for n, v in vm.items() if v.any()] == d.expected["violated_rules"]
            for name, b in d.expected["betti_3d"].items():
                assert topology.betti_numbers_3d(new == ph.labels[name]) == b


def test_plant_defect_bad_arguments():
    ph = syn.make_phantom("acdc", 0, TINY["acdc"])
    with pytest.raises(ValueError, match="valid kinds"):
        syn.plant_defect(ph.label, "hole", ph.labels, 0)
    with pytest.raises(ValueError, match="LA"):
        syn.plant_defect(ph.label, "extra_component", ph.labels, 0, structure="LA")
    with pytest.raises(ValueError, match="missing"):
        syn.plant_defect(ph.label, "septal_hole", {"background": 0, "LV": 3, "MYO": 2}, 0,
                         topology={"rules": []})
    with pytest.raises(ValueError, match="topology="):
        syn.plant_defect(ph.label, "extra_component", {"background": 0, "X": 1}, 0)
    with pytest.raises(ValueError, match="no place"):  # no RV at all
        syn.plant_defect(np.where(ph.label == 1, 0, ph.label).astype(np.uint8), "bridge", ph.labels, 0)


# ----------------------------------------------------------------------------------------------- writing datasets
@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    return raw


@pytest.mark.parametrize("preset", ["acdc", "wholeheart"])
def test_write_dataset_passes_nnunet_integrity_check(nnunet_env, preset):
    sitk = pytest.importorskip("SimpleITK")
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    folder = syn.write_dataset(nnunet_env, 7, preset, num_training=5, num_test=2, seed=3, shape=TINY[preset])
    name = syn.PRESETS[preset].dataset_name
    assert folder == nnunet_env / f"Dataset007_{name}"
    verify_dataset_integrity(str(folder), 1)  # raises on any problem

    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "MRI" if preset == "acdc" else "CT"}
    assert dj["labels"] == syn.labels_for(preset)
    assert dj["numTraining"] == 5 and dj["file_ending"] == ".nii.gz"
    assert dj["topology"] == syn.topology_block(preset)
    assert "synthetic" in dj["description"].lower() and "synthetic" in dj["reference"].lower()
    p = syn.PRESETS[preset].case_prefix
    assert sorted(f.name for f in (folder / "imagesTr").iterdir()) == [f"{p}_{i:03d}_0000.nii.gz" for i in range(5)]
    assert sorted(f.name for f in (folder / "labelsTr").iterdir()) == [f"{p}_{i:03d}.nii.gz" for i in range(5)]
    assert sorted(f.name for f in (folder / "imagesTs").iterdir()) == [f"{p}_{i:03d}_0000.nii.gz" for i in (5, 6)]
    assert sorted(f.name for f in (folder / "labelsTs").iterdir()) == [f"{p}_{i:03d}.nii.gz" for i in (5, 6)]
    assert not [f for f in nnunet_env.iterdir() if f.name.startswith(".")]  # no temporary folder left

    # case i is make_phantom(seed=(seed, i)); geometry survives the round trip
    ph = syn.make_phantom(preset, np.random.default_rng((3, 6)), TINY[preset])
    img = sitk.ReadImage(str(folder / "labelsTs" / f"{p}_006.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), ph.label)
    np.testing.assert_allclose(img.GetSpacing(), ph.spacing[::-1], rtol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), ph.origin, atol=1e-4)
    im = sitk.ReadImage(str(folder / "imagesTs" / f"{p}_006_0000.nii.gz"))
    assert im.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(sitk.GetArrayFromImage(im), ph.image, rtol=1e-6)


def test_write_dataset_refuses_to_overwrite(nnunet_env):
    folder = syn.write_dataset(nnunet_env, 12, "acdc", num_training=5, num_test=0, shape=TINY["acdc"])
    keep = nnunet_env / "Dataset013_Other"
    keep.mkdir()
    (keep / "file.txt").write_text("user data")
    stamp = (folder / "dataset.json").stat().st_mtime_ns

    with pytest.raises(FileExistsError) as e:
        syn.write_dataset(nnunet_env, 12, "acdc", num_training=5, shape=TINY["acdc"])
    assert "Dataset012_SynthACDC" in str(e.value) and "overwrite=True" in str(e.value)
    with pytest.raises(FileExistsError, match="Dataset012_SynthACDC"):  # any name with that ID is refused
        syn.write_dataset(nnunet_env, 12, "wholeheart", num_training=5, shape=TINY["wholeheart"])
    assert (folder / "dataset.json").stat().st_mtime_ns == stamp

    # overwrite replaces our own dataset ...
    again = syn.write_dataset(nnunet_env, 12, "acdc", num_training=6, num_test=0, shape=TINY["acdc"],
                              overwrite=True)
    assert again == folder and json.loads((folder / "dataset.json").read_text())["numTraining"] == 6
    # ... but never a folder it did not write, nor one of the same ID under another name
    with pytest.raises(FileExistsError, match="not written by"):
        syn.write_dataset(nnunet_env, 13, "acdc", num_training=5, name="Other", shape=TINY["acdc"], overwrite=True)
    with pytest.raises(FileExistsError, match="another name"):
        syn.write_dataset(nnunet_env, 13, "acdc", num_training=5, shape=TINY["acdc"], overwrite=True)
    assert (keep / "file.txt").read_text() == "user data"
    assert sorted(f.name for f in nnunet_env.iterdir()) == ["Dataset012_SynthACDC", "Dataset013_Other"]


def test_oblique_direction_written_and_read_back(nnunet_env):
    sitk = pytest.importorskip("SimpleITK")
    folder = syn.write_dataset(nnunet_env, 21, "acdc", num_training=5, num_test=0, shape=TINY["acdc"],
                               oblique=True)
    dirs = []
    for i in range(5):
        im = sitk.ReadImage(str(folder / "imagesTr" / f"acdc_{i:03d}_0000.nii.gz"))
        lb = sitk.ReadImage(str(folder / "labelsTr" / f"acdc_{i:03d}.nii.gz"))
        d = np.array(im.GetDirection()).reshape(3, 3)
        np.testing.assert_allclose(d, np.array(lb.GetDirection()).reshape(3, 3), atol=1e-6)
        np.testing.assert_allclose(d @ d.T, np.eye(3), atol=1e-5)
        assert np.linalg.det(d) == pytest.approx(1.0, abs=1e-5)
        assert not np.allclose(d, np.eye(3), atol=1e-3)
        ph = syn.make_phantom("acdc", np.random.default_rng((0, i)), TINY["acdc"], oblique=True)
        np.testing.assert_allclose(d.ravel(), ph.direction, atol=1e-5)
        dirs.append(d)
    assert not np.allclose(dirs[0], dirs[1])
    # the default is the identity
    ph = syn.make_phantom("acdc", 0, TINY["acdc"])
    assert ph.direction == tuple(np.eye(3).ravel())


# ----------------------------------------------------------------------------------------------- bad arguments
def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="acdc, wholeheart"):
        syn.make_phantom("mri", 0)
    with pytest.raises(ValueError, match="acdc, wholeheart"):
        syn.topology_block("ct")
    with pytest.raises(ValueError, match="acdc, wholeheart"):
        syn.write_dataset(tmp_path, 1, "heart")
    with pytest.raises(ValueError, match="too small"):
        syn.make_phantom("acdc", 0, (4, 40, 40))
    with pytest.raises(ValueError, match="three integers"):
        syn.make_phantom("acdc", 0, (8, 40))
    with pytest.raises(TypeError, match="seed"):
        syn.make_phantom("acdc", "0")
    for bad_id in (0, 1000, "7", 7.0, True):
        with pytest.raises(ValueError, match="1..999"):
            syn.write_dataset(tmp_path, bad_id)
    with pytest.raises(ValueError, match="5-fold"):
        syn.write_dataset(tmp_path, 1, num_training=4)
    with pytest.raises(ValueError, match="num_test"):
        syn.write_dataset(tmp_path, 1, num_test=-1)
    with pytest.raises(ValueError, match="name"):
        syn.write_dataset(tmp_path, 1, name="bad name/..")
    with pytest.raises(ValueError, match="too small"):
        syn.write_dataset(tmp_path, 1, shape=(3, 10, 10))
    assert list(pathlib.Path(tmp_path).iterdir()) == []  # nothing written on bad arguments


def test_embedded_phantom_keeps_the_heart_in_world_space(tmp_path):
    """--canvas: the heart sits off-centre in a much larger image; same voxels, same world position, label 0 around."""
    import SimpleITK as sitk

    from nnunet_topo.synthetic import embed_phantom, make_phantom, write_dataset

    ph = make_phantom("wholeheart", 3, (32, 40, 40), oblique=True)
    big = embed_phantom(ph, (64, 96, 80), 5)
    off = big.params["heart_offset"]
    sl = tuple(slice(o, o + s) for o, s in zip(off, ph.label.shape))
    np.testing.assert_array_equal(big.label[sl], ph.label)
    assert big.label.sum() == ph.label.sum() and big.image.shape == (64, 96, 80)
    # the heart block is in a corner region: within the outer thirds of the free room on every axis
    for o, c, s in zip(off, big.label.shape, ph.label.shape):
        assert o <= (c - s) // 3 or o >= (c - s) - (c - s) // 3

    def world(p, idx):
        img = sitk.Image(p.label.shape[::-1], sitk.sitkUInt8)
        img.SetSpacing(p.spacing[::-1]), img.SetOrigin(p.origin), img.SetDirection(p.direction)
        return np.asarray(img.TransformContinuousIndexToPhysicalPoint([float(v) for v in idx[::-1]]))

    np.testing.assert_allclose(world(big, np.asarray(off) + 3.0), world(ph, np.asarray([3.0, 3.0, 3.0])), atol=1e-6)
    folder = write_dataset(tmp_path, 7, "wholeheart", num_training=5, num_test=0, shape=(32, 40, 40),
                           canvas=(48, 64, 56), spacing=(1.0, 2.0, 1.0))
    img = sitk.ReadImage(str(sorted((folder / "labelsTr").iterdir())[0]))
    assert img.GetSize() == (56, 64, 48) and img.GetSpacing() == (1.0, 2.0, 1.0)


def test_check_reference_honours_exempt_end_slices_like_the_violation_maps():
    from nnunet_topo.topology_spec import parse_topology
    from nnunet_topo.violations import violation_maps_numpy

    ph = syn.make_phantom("acdc", 0, TINY["acdc"])
    labels = ph.labels
    lab = ph.label.copy()
    lv_slices = np.flatnonzero((lab == labels["LV"]).any(axis=(1, 2)))
    for z in (lv_slices[0], lv_slices[len(lv_slices) // 2]):  # an end slice and a middle one
        lab2 = lab.copy()
        lab2[z][lab2[z] == labels["MYO"]] = 0  # the LV opens to the background in slice z
        for k, reported in ((0, True), (1, z != lv_slices[0])):
            topo = syn.topology_block("acdc")
            topo["rules"] = [dict(r, exempt_end_slices=k) if r.get("mode") == "2d" else r for r in topo["rules"]]
            rule_problems = [p for p in syn.check_reference(lab2, "acdc", topology=topo)
                             if p.startswith("inclusion(")]
            counts = violation_maps_numpy(lab2, parse_topology({"labels": labels, "topology": topo}))
            n = int(counts["inclusion(LV in LV+MYO) [2d axis 0]"].sum())
            assert bool(rule_problems) == reported == (n > 0), (z, k, rule_problems)
            if reported:
                assert rule_problems == [f"inclusion(LV in LV+MYO) [2d axis 0]: {n} violating voxels"]


def test_check_reference_accepts_an_allowed_set_of_per_slice_betti_vectors():
    ph = syn.make_phantom("acdc", 0, TINY["acdc"])
    labels = ph.labels
    lab = ph.label.copy()
    myo = labels["MYO"]
    z = int(np.flatnonzero((lab == myo).any(axis=(1, 2)))[1])
    # open the ring of slice z: remove its MYO in a 3-voxel band from the top edge down through the centre column
    col = int(np.round(np.flatnonzero((lab[z] == myo).any(axis=0)).mean()))
    band = lab[z, : lab.shape[1] // 2, col - 1:col + 2]
    band[band == myo] = 0
    assert betti_numbers_2d(lab[z] == myo) == (1, 0)  # an open "C"

    def betti2d_problems(prior):
        topo = syn.topology_block("acdc")
        topo["betti_2d"] = dict(topo["betti_2d"], MYO=prior)
        return [p for p in syn.check_reference(lab, "acdc", topology=topo) if p.startswith("2D Betti numbers of MYO")]
    assert betti2d_problems([[1, 1], [1, 0]]) == []
    for prior, shown in (([1, 1], "(1, 1)"), ([[1, 1]], "(1, 1)"), ([[1, 1], [2, 0]], "(1, 1) or (2, 0)")):
        problems = betti2d_problems(prior)
        assert problems == [f"2D Betti numbers of MYO differ from the prior {shown} on slices [{z}] (axis 0): "
                            "[(1, 0)]"], problems
