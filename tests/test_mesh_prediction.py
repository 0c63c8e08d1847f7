"""Mesh prediction: preprocessed (network) frame -> original image -> world, through nnU-Net's own preprocessor.

The plans are a minimal hand-built nnU-Net plans dict (no planning run needed): a non-trivial
``transpose_forward``, a target spacing that resamples every axis, and a 3-stage PlainConvUNet.
"""
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import trimesh

from nnunet_topo.frames import ImageGeometry, index_to_normalized, index_to_world, world_to_index
from nnunet_topo.surfaces import mesh_from_mask
from nnunet_topo.cli.predict_meshes import predict_meshes_entry
from nnunet_topo.mesh_prediction import (
    NO_MESH_HEAD,
    EmptyPredictionError,
    MeshPredictionError,
    NoMeshError,
    RoiDoesNotFitError,
    check_mesh_network,
    mesh_roi,
    predict_meshes_case,
    predict_meshes_folder,
    preprocessed_shape,
    preprocessed_to_original_index,
)
from nnunet_topo.occupancy import winding_number
from nnunet_topo.roi import centered_window_start, structure_box
from nnunet_topo.synthetic import labels_for, write_dataset

STRUCTURES = {"LV_endo": ["LV"], "LV_epi": ["LV", "MYO"], "RV": ["RV"]}
STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2]]
PATCH = [8, 32, 32]


def make_plans(transpose_forward, target_spacing, patch_size=PATCH):
    tb = np.argsort(transpose_forward).tolist()
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[3, 3, 3]] * 3, "strides": STRIDES, "n_conv_per_stage": [1, 1, 1],
                        "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    resampling = {"resampling_fn_data": "resample_data_or_seg_to_shape",
                  "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                  "resampling_fn_seg": "resample_data_or_seg_to_shape",
                  "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                  "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                  "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                         "force_separate_z": None}}
    cfg = {"data_identifier": "test_3d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
           "patch_size": list(patch_size), "median_image_size_in_voxels": list(patch_size),
           "spacing": list(target_spacing), "normalization_schemes": ["ZScoreNormalization"],
           "use_mask_for_norm": [False], "batch_dice": False, "architecture": arch, **resampling}
    return {"dataset_name": "Dataset001_Test", "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": list(target_spacing),
            "original_median_shape_after_transp": list(patch_size), "image_reader_writer": "SimpleITKIO",
            "transpose_forward": list(transpose_forward), "transpose_backward": tb,
            "configurations": {"3d_fullres": cfg}, "experiment_planner_used": "ExperimentPlanner",
            "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": {"mean": 0.0, "std": 1.0, "percentile_00_5": -1,
                                                                  "percentile_99_5": 1, "max": 1, "min": -1,
                                                                  "median": 0}}}


def managers(plans):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    return pm, pm.get_configuration("3d_fullres")


# ------------------------------------------------------------------------------ synthetic properties

def test_preprocessed_to_original_index_synthetic():
    plans = make_plans([2, 0, 1], [1.0, 1.0, 1.0])
    pm, cm = managers(plans)
    # original array (Z, Y, X) = (10, 20, 30), spacing (z, y, x) = (2, 1, 0.5); transposed order (X, Z, Y)
    props = {"spacing": [2.0, 1.0, 0.5], "shape_before_cropping": (30, 10, 20),
             "bbox_used_for_cropping": [[4, 24], [1, 9], [3, 19]],
             "shape_after_cropping_and_before_resampling": (20, 8, 16)}
    # transposed spacing (0.5, 2, 1) -> target 1 mm: new shape (10, 16, 16)
    assert preprocessed_shape(props, pm, cm) == (10, 16, 16)
    p = np.array([[0.0, 0.0, 0.0], [9.0, 15.0, 15.0], [4.5, 7.5, 7.5]])
    got = preprocessed_to_original_index(p, props, pm, cm)
    # by hand: cropped transposed index = (i + 0.5) * n_orig / n_new - 0.5
    scale = np.array([20 / 10, 8 / 16, 16 / 16])
    t = (p + 0.5) * scale - 0.5 + np.array([4, 1, 3])  # transposed (x, z, y) index
    expected = t[:, [1, 2, 0]]  # original (z, y, x)
    np.testing.assert_allclose(got, expected)
    # voxel corners: the first preprocessed voxel's low edge (-0.5) maps to the crop box's low edge
    np.testing.assert_allclose(preprocessed_to_original_index(np.full((1, 3), -0.5), props, pm, cm),
                               [[1 - 0.5, 3 - 0.5, 4 - 0.5]])
    # explicit shape = recomputed shape
    np.testing.assert_allclose(preprocessed_to_original_index(p, props, pm, cm, (10, 16, 16)), got)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        preprocessed_to_original_index(np.zeros((3, 2)), props, pm, cm)


# ------------------------------------------------------------------------------ nnU-Net round trip

def _case(tmp_path, oblique):
    root = write_dataset(tmp_path / "raw", 1, preset="acdc", num_training=5, num_test=0, seed=3,
                         shape=(8, 40, 40), oblique=oblique)
    dj = json.loads((root / "dataset.json").read_text())
    case = sorted((root / "labelsTr").glob("*.nii.gz"))[0]
    name = case.name[: -len(".nii.gz")]
    img_file = root / "imagesTr" / f"{name}_0000.nii.gz"
    # zero the image outside a box around the labels, so nnU-Net crops (bbox offset is exercised)
    img = sitk.ReadImage(str(img_file))
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(case)))
    arr = sitk.GetArrayFromImage(img)
    nz = np.nonzero(seg)
    keep = np.zeros_like(arr, dtype=bool)
    keep[:, max(nz[1].min() - 2, 0): nz[1].max() + 3, max(nz[2].min() - 3, 0): nz[2].max() + 2] = True
    arr = np.where(keep, arr + 1000.0, 0.0).astype(np.float32)  # +1000: no accidental zeros inside
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    new_img = tmp_path / f"{name}_0000.nii.gz"
    sitk.WriteImage(out, str(new_img))
    return str(new_img), str(case), dj, seg


FINE = (0.5, 0.5, 0.5)       # every axis resampled 2x finer: the preprocessed label map is exact
UNEVEN = (1.25, 0.5, 0.8)    # x (first after the transpose) coarser, z 2x finer, y 1.25x finer: lossy


def _plans_for(dj, img_file, factors=FINE):
    """Plans with transpose_forward (2, 0, 1) and target spacing = transposed image spacing * factors."""
    spacing_zyx = sitk.ReadImage(img_file).GetSpacing()[::-1]
    tf = [2, 0, 1]
    sp_t = [spacing_zyx[i] for i in tf]
    return make_plans(tf, [s * f for s, f in zip(sp_t, factors)])


def _preprocess(img_file, seg_file, dj, plans):
    pm, cm = managers(plans)
    pre = cm.preprocessor_class(verbose=False)
    data, seg_pre, props = pre.run_case([img_file], seg_file, pm, cm, dj)
    return pm, cm, data, seg_pre[0], props


def _inside_points(mesh, n=2500, seed=0):
    rng = np.random.default_rng(seed)
    lo, hi = mesh.bounds
    pts = rng.uniform(lo, hi, size=(n, 3))
    w = winding_number(torch.from_numpy(pts), torch.from_numpy(np.asarray(mesh.vertices, dtype=np.float64)),
                       torch.from_numpy(np.asarray(mesh.faces, dtype=np.int64)))
    return pts[w.numpy() > 0.5]


def _overlay_fraction(mesh, label_map, ids, geometry):
    pts = _inside_points(mesh)
    assert len(pts) > 200
    idx = np.rint(world_to_index(pts, geometry)).astype(int)
    idx = np.clip(idx, 0, np.array(label_map.shape) - 1)
    return float(np.isin(label_map[tuple(idx.T)], ids).mean())


def _preprocessed_world_mesh(seg_pre, ids, props, pm, cm):
    m = mesh_from_mask(np.isin(seg_pre, ids))  # vertices: (x, y, z) index of the preprocessed array
    orig = preprocessed_to_original_index(np.asarray(m.vertices)[:, ::-1], props, pm, cm, seg_pre.shape)
    world = index_to_world(orig, ImageGeometry.from_nnunet_properties(props))
    mesh = trimesh.Trimesh(world, np.asarray(m.faces), process=False)
    if mesh.volume < 0:
        mesh = trimesh.Trimesh(world, np.asarray(m.faces)[:, ::-1], process=False)
    return mesh


@pytest.mark.parametrize("oblique", [False, True])
def test_round_trip_overlays_original_labels(tmp_path, oblique):
    """Meshes of nnU-Net's preprocessed label map, mapped back, overlay the original label map in world space."""
    img_file, seg_file, dj, seg = _case(tmp_path, oblique)
    plans = _plans_for(dj, img_file, FINE)
    pm, cm, data, seg_pre, props = _preprocess(img_file, seg_file, dj, plans)
    assert tuple(seg_pre.shape) == preprocessed_shape(props, pm, cm)
    assert any(b[0] > 0 for b in props["bbox_used_for_cropping"])  # the crop offset matters
    geometry = ImageGeometry.from_nnunet_properties(props)
    labels = labels_for("acdc")
    for name, lab_names in STRUCTURES.items():
        ids = [labels[n] for n in lab_names]
        mesh = _preprocessed_world_mesh(seg_pre, ids, props, pm, cm)
        frac = _overlay_fraction(mesh, seg, ids, geometry)
        assert frac >= 0.95, (name, frac)
        # the volume is kept within the resampling error
        ref_vol = np.isin(seg, ids).sum() * geometry.voxel_volume
        assert abs(mesh.volume - ref_vol) / ref_vol < 0.05, (name, mesh.volume, ref_vol)


@pytest.mark.parametrize("oblique", [False, True])
def test_round_trip_lossy_resampling_is_unbiased(tmp_path, oblique):
    """With lossy (non-integer, partly coarser) resampling the label map itself changes, so the overlay is weaker
    (the thin RV crescent drops to ~0.88), but a wrong frame convention would shift the mesh: the centroids of mesh
    and labels agree to a small fraction of a voxel."""
    img_file, seg_file, dj, seg = _case(tmp_path, oblique)
    plans = _plans_for(dj, img_file, UNEVEN)
    pm, cm, data, seg_pre, props = _preprocess(img_file, seg_file, dj, plans)
    assert tuple(seg_pre.shape) == preprocessed_shape(props, pm, cm)
    geometry = ImageGeometry.from_nnunet_properties(props)
    labels = labels_for("acdc")
    for name, lab_names in STRUCTURES.items():
        ids = [labels[n] for n in lab_names]
        mesh = _preprocessed_world_mesh(seg_pre, ids, props, pm, cm)
        assert _overlay_fraction(mesh, seg, ids, geometry) >= 0.85, name
        centre = index_to_world(np.argwhere(np.isin(seg, ids)).astype(float), geometry).mean(0)
        shift = np.linalg.norm(mesh.center_mass - centre)
        assert shift < 0.25 * min(geometry.spacing_xyz), (name, shift)


# ------------------------------------------------------------------------------ prediction core: the heart ROI

ROI_PATCH = [48, 16, 40]  # holds the structures' box (32, 10, 34) of _case with FINE plans; multiple of the stride


def _mesh_network(templates):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from nnunet_topo.mesh_head.network import MeshAugmentedNetwork

    unet = PlainConvUNet(1, 3, [4, 8, 16], torch.nn.Conv3d, 3, STRIDES, 1, 4, 1, conv_bias=True,
                         norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    torch.manual_seed(0)
    return MeshAugmentedNetwork(unet, templates)


def _mesh_ids():
    labels = labels_for("acdc")
    return {name: [labels[n] for n in lab_names] for name, lab_names in STRUCTURES.items()}


def _all_ids():
    return sorted({i for ids in _mesh_ids().values() for i in ids})


def _oracle_network(seg_pre, patch):
    """A mesh network whose templates are the meshes of ``seg_pre`` in the normalised frame of the patch-size window
    centred on its mesh structures (the window the ROI inference cuts); an untrained head outputs its templates bit
    for bit (zero-initialised alignment and offset layers), so the predicted meshes are these meshes."""
    from nnunet_topo.mesh_head.templates import Template

    box = structure_box(seg_pre, _all_ids())
    start = np.asarray(centered_window_start(box, patch))
    templates = []
    for name, ids in _mesh_ids().items():
        m = mesh_from_mask(np.isin(seg_pre, ids))  # vertices: (x, y, z) index of the preprocessed array
        zyx = np.asarray(m.vertices)[:, ::-1] - start  # -> crop index
        templates.append(Template(index_to_normalized(zyx, patch), np.asarray(m.faces), name=name))
    return _mesh_network(templates)


def _sitk_centroid(seg_file, ids):
    """World centroid (mm) of the raw label voxels with ``ids``, by SimpleITK alone (independent of our frames)."""
    img = sitk.ReadImage(seg_file)
    zyx = np.argwhere(np.isin(sitk.GetArrayFromImage(img), ids)).mean(0)
    return np.asarray(img.TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]]))


def _check_on_reference(meshes, seg_pre, seg_file, props, pm, cm, centroid_mm=0.2):
    """The ROI meshes = the reference meshes mapped directly (float32 templates: ~1e-4 mm), and their centroids lie
    within ``centroid_mm`` of the reference structures' centroids computed by SimpleITK (observed: <= 0.05 mm; the
    tolerance 0.2 mm is below a third of the finest preprocessed voxel, 0.67 mm)."""
    assert list(meshes) == list(STRUCTURES)
    for name, ids in _mesh_ids().items():
        mesh = meshes[name]
        assert mesh.volume > 0 and mesh.is_watertight
        direct = _preprocessed_world_mesh(seg_pre, ids, props, pm, cm)
        np.testing.assert_allclose(mesh.vertices, direct.vertices, atol=1e-3)
        shift = np.linalg.norm(mesh.center_mass - _sitk_centroid(seg_file, ids))
        assert shift < centroid_mm, (name, shift)


def _padded_case(tmp_path, img_file, seg_file, lo_xyz, hi_xyz):
    """The case padded by (lo, hi) voxels per (x, y, z) axis, image with a non-zero constant (so nnU-Net does not crop
    the padding away), labels with 0; SimpleITK keeps the world position of every original voxel."""
    img, seg = sitk.ReadImage(img_file), sitk.ReadImage(seg_file)
    img_p = sitk.ConstantPad(img, list(lo_xyz), list(hi_xyz), 1000.0)
    seg_p = sitk.ConstantPad(seg, list(lo_xyz), list(hi_xyz), 0)
    np.testing.assert_allclose(img_p.TransformIndexToPhysicalPoint([int(v) for v in lo_xyz]),
                               img.TransformIndexToPhysicalPoint([0, 0, 0]), atol=1e-4)
    out = tmp_path / "padded"
    out.mkdir()
    sitk.WriteImage(img_p, str(out / "big_0000.nii.gz"))
    sitk.WriteImage(seg_p, str(out / "big.nii.gz"))
    return str(out / "big_0000.nii.gz"), str(out / "big.nii.gz")


@pytest.mark.parametrize("oblique", [False, True])
def test_predict_meshes_case_roi_oracle_templates(tmp_path, oblique):
    """With the preprocessed reference standing in for the prediction and templates = its meshes in the normalised
    frame of the ROI window, the world meshes are the reference meshes mapped directly, and land on the reference
    structures (centroids within 1 mm of SimpleITK's). Transpose (2, 0, 1), nnU-Net crops, every axis resampled; the
    window reaches outside the array on one axis (zero padding) and is smaller than it on another."""
    img_file, seg_file, dj, seg = _case(tmp_path, oblique)
    plans = make_plans([2, 0, 1], _plans_for(dj, img_file)["configurations"]["3d_fullres"]["spacing"], ROI_PATCH)
    pm, cm, data, seg_pre, props = _preprocess(img_file, seg_file, dj, plans)
    assert data.shape[1] < ROI_PATCH[0] and data.shape[3] > ROI_PATCH[2]  # padded on axis 0, cut on axis 2
    net = _oracle_network(seg_pre, ROI_PATCH)
    meshes = predict_meshes_case(net, data, props, pm, cm, segmentation=seg_pre, structures=_mesh_ids(),
                                 device="cpu", case="c0")
    _check_on_reference(meshes, seg_pre, seg_file, props, pm, cm)
    geometry = ImageGeometry.from_nnunet_properties(props)
    assert _overlay_fraction(meshes["LV_epi"], seg, _mesh_ids()["LV_epi"], geometry) >= 0.95
    roi = mesh_roi(seg_pre, _mesh_ids(), ROI_PATCH, cm.spacing)
    box = structure_box(seg_pre, _all_ids())
    assert roi.box == box and roi.start == centered_window_start(box, ROI_PATCH) and list(roi.size) == ROI_PATCH
    assert roi.to_dict() == {"start": list(roi.start), "size": ROI_PATCH, "box": [list(box[0]), list(box[1])],
                             "ignored_voxels": 0}
    # a stray predicted voxel far from the heart does not stretch the ROI (largest component per structure)
    stray = seg_pre.copy()
    far = [0 if lo_ > 0 else s_ - 1 for lo_, s_ in zip(box[0], stray.shape)]
    stray[tuple(far)] = _mesh_ids()["RV"][0]
    assert structure_box(stray, _all_ids()) != box
    roi2 = mesh_roi(stray, _mesh_ids(), ROI_PATCH, cm.spacing)
    assert roi2.box == box and roi2.ignored_voxels >= 1


@pytest.mark.parametrize("oblique", [False, True])
def test_predict_meshes_case_larger_than_patch(tmp_path, oblique):
    """A case several patches long (x padded by 80 voxels on one side, y by 30 on the other: the structures sit far
    off-centre, preprocessed array (240, 16, 140) for a (48, 16, 40) patch): the meshes still land on the reference,
    since only the window around the structures is seen (the whole-case path stretched such a case into the
    normalised frame)."""
    img_file, seg_file, dj, _ = _case(tmp_path, oblique)
    big_img, big_seg = _padded_case(tmp_path, img_file, seg_file, (0, 30, 0), (80, 0, 0))
    plans = make_plans([2, 0, 1], _plans_for(dj, img_file)["configurations"]["3d_fullres"]["spacing"], ROI_PATCH)
    pm, cm, data, seg_pre, props = _preprocess(big_img, big_seg, dj, plans)
    assert data.shape[1] >= 4 * ROI_PATCH[0] and data.shape[3] >= 3 * ROI_PATCH[2], data.shape
    box = structure_box(seg_pre, _all_ids())
    centre = (np.asarray(box[0]) + np.asarray(box[1])) / 2
    assert abs(centre[0] - data.shape[1] / 2) > ROI_PATCH[0] and abs(centre[2] - data.shape[3] / 2) > ROI_PATCH[2] / 2
    net = _oracle_network(seg_pre, ROI_PATCH)
    meshes = predict_meshes_case(net, data, props, pm, cm, segmentation=seg_pre, structures=_mesh_ids(), case="big")
    _check_on_reference(meshes, seg_pre, big_seg, props, pm, cm)


def test_predict_meshes_case_cropped_and_uncropped_agree(tmp_path):
    """One network (templates from the large case's window), two versions of the same case: the large one and a copy
    cropped physically with SimpleITK slicing (same world geometry; nnU-Net's crop box, preprocessed shape, ROI start
    all change; smaller than the patch on axis 0, so the window is zero-padded there). Their world meshes agree to
    1e-3 mm: with 2x resampling the two preprocessed grids coincide, so the two ROI windows cover the same anatomy and
    only float32 rounding is left (a non-integer resampling would move a window by up to one voxel)."""
    img_file, seg_file, dj, _ = _case(tmp_path, True)
    big_img, big_seg = _padded_case(tmp_path, img_file, seg_file, (0, 30, 0), (80, 0, 0))
    small_img, small_seg = str(tmp_path / "small_0000.nii.gz"), str(tmp_path / "small.nii.gz")
    crop = (slice(6, 28), slice(25, 70), slice(0, 8))  # (x, y, z): cuts into the non-zero padding on y
    sitk.WriteImage(sitk.ReadImage(big_img)[crop], small_img)
    sitk.WriteImage(sitk.ReadImage(big_seg)[crop], small_seg)
    plans = make_plans([2, 0, 1], _plans_for(dj, img_file)["configurations"]["3d_fullres"]["spacing"], ROI_PATCH)
    pm, cm, data_b, seg_b, props_b = _preprocess(big_img, big_seg, dj, plans)
    _, _, data_s, seg_s, props_s = _preprocess(small_img, small_seg, dj, plans)
    assert data_s.shape[1] < ROI_PATCH[0] < data_b.shape[1] and data_s.shape != data_b.shape
    assert props_s["bbox_used_for_cropping"] != props_b["bbox_used_for_cropping"]
    net = _oracle_network(seg_b, ROI_PATCH)
    big = predict_meshes_case(net, data_b, props_b, pm, cm, segmentation=seg_b, structures=_mesh_ids(), case="big")
    small = predict_meshes_case(net, data_s, props_s, pm, cm, segmentation=seg_s, structures=_mesh_ids(),
                                case="small")
    assert mesh_roi(seg_s, _mesh_ids(), ROI_PATCH).start != mesh_roi(seg_b, _mesh_ids(), ROI_PATCH).start
    for name in STRUCTURES:
        np.testing.assert_allclose(small[name].vertices, big[name].vertices, atol=1e-3)
    _check_on_reference(small, seg_b, small_seg, props_b, pm, cm)  # (both equal the big case's direct meshes)


def test_predict_meshes_case_roi_errors(tmp_path):
    """Structures larger than the patch and an empty prediction: a clear message (case, sizes in voxels and mm, the
    patch), no mesh. Missing arguments and structures that are not the templates' are refused."""
    img_file, seg_file, dj, _ = _case(tmp_path, False)
    plans = _plans_for(dj, img_file)  # patch (8, 32, 32): the box (32, 10, 34) does not fit
    pm, cm, data, seg_pre, props = _preprocess(img_file, seg_file, dj, plans)
    net = _oracle_network(seg_pre, ROI_PATCH)
    ids = _mesh_ids()
    with pytest.raises(RoiDoesNotFitError, match=r"case c0: the predicted mesh structures span \[32, 10, 34\] "
                                                   r"voxels, more than the patch \[8, 32, 32\]") as e:
        predict_meshes_case(net, data, props, pm, cm, segmentation=seg_pre, structures=ids, case="c0")
    msg = str(e.value)
    assert "box spans [21.5, 34.7, 22.8] mm, the patch [5.4, 111.2, 21.5] mm" in msg, msg
    assert "no mesh is written rather than a rescaled one" in msg and e.value.box == structure_box(seg_pre, _all_ids())
    assert isinstance(e.value, NoMeshError) and isinstance(e.value, MeshPredictionError)
    with pytest.raises(EmptyPredictionError, match=r"case c0: empty prediction: .*none of the mesh structures' "
                                                   r"labels \(LV_endo: labels \[3\], LV_epi: labels \[2, 3\], "
                                                   r"RV: labels \[1\]\)"):
        predict_meshes_case(net, data, props, pm, cm, segmentation=np.zeros_like(seg_pre), structures=ids, case="c0")
    with pytest.raises(EmptyPredictionError):  # labels outside the mesh structures do not make an ROI
        predict_meshes_case(net, data, props, pm, cm, segmentation=np.full_like(seg_pre, 7), structures=ids)
    with pytest.raises(TypeError, match="needs segmentation="):
        predict_meshes_case(net, data, props, pm, cm)
    with pytest.raises(TypeError, match="needs structures="):
        predict_meshes_case(net, data, props, pm, cm, segmentation=seg_pre)
    with pytest.raises(MeshPredictionError, match=r"are not the structures of the model's templates"):
        predict_meshes_case(net, data, props, pm, cm, segmentation=seg_pre, structures={"LV": [3]})
    with pytest.raises(MeshPredictionError, match="does not match the preprocessed data"):
        predict_meshes_case(net, data, props, pm, cm, segmentation=seg_pre[:, :5], structures=ids)


def test_mesh_roi_window():
    """Unit check of the window on a hand-made label map: centred on the union of the structures' boxes (each
    structure's largest component; a separate structure counts, an island of one does not)."""
    seg = np.zeros((10, 20, 30), np.uint8)
    seg[2:5, 3:9, 10:14] = 1
    seg[6, 12, 20] = 2
    seg[0, 0, 0] = 9  # not a mesh structure label
    roi = mesh_roi(seg, {"a": [1], "b": [2]}, [8, 16, 16], case="u")
    assert roi.box == ((2, 3, 10), (7, 13, 21)) and roi.start == (0, 0, 7) and roi.size == (8, 16, 16)
    roi4 = mesh_roi(seg[None], {"a": [1], "b": [2]}, [8, 16, 16])
    assert roi4 == roi
    with pytest.raises(RoiDoesNotFitError, match=r"case u: .* span \[5, 10, 11\] voxels, more than the patch "
                                                   r"\[4, 16, 16\]"):
        mesh_roi(seg, {"a": [1], "b": [2]}, [4, 16, 16], case="u")
    island = mesh_roi(seg, {"a": [1], "ab": [1, 2]}, [8, 16, 16])  # label 2 is an island of structure ab
    assert island.box == ((2, 3, 10), (5, 9, 14)) and island.ignored_voxels == 1


def test_predict_meshes_case_sphere_template_and_errors(tmp_path):
    from nnunet_topo.mesh_head.templates import sphere_template

    img_file, seg_file, dj, seg = _case(tmp_path, False)
    plans = make_plans([2, 0, 1], _plans_for(dj, img_file)["configurations"]["3d_fullres"]["spacing"], ROI_PATCH)
    pm, cm, data, seg_pre, props = _preprocess(img_file, seg_file, dj, plans)
    net = _mesh_network([sphere_template(2, name="blob")])
    blob = {"blob": _all_ids()}
    meshes = predict_meshes_case(net, data, props, pm, cm, segmentation=seg_pre, structures=blob, case="c0")
    assert list(meshes) == ["blob"] and meshes["blob"].volume > 0
    # the unit sphere of the normalised crop frame is centred on the window: its world centre is the window's centre
    roi = mesh_roi(seg_pre, blob, ROI_PATCH)
    centre = np.asarray(roi.start) + (np.asarray(ROI_PATCH) - 1) / 2
    centre = index_to_world(preprocessed_to_original_index(centre[None], props, pm, cm, seg_pre.shape),
                            ImageGeometry.from_nnunet_properties(props))[0]
    assert np.linalg.norm(meshes["blob"].vertices.mean(0) - centre) < 1e-3
    # NaN vertices: error names case and structure
    net.forward_with_meshes = lambda x: (None, [torch.full((1, 162, 3), float("nan"))])
    with pytest.raises(MeshPredictionError, match=r"case c0, structure 'blob'.*NaN"):
        predict_meshes_case(net, data, props, pm, cm, segmentation=seg_pre, structures=blob, case="c0")


def _constant_label_model(folder, plans, dj, label):
    """A hand-made nnU-Net model folder of nnUNetTrainerMesh whose network predicts ``label`` everywhere (last
    segmentation layer: zero weights, bias one-hot) and whose untrained head outputs its sphere templates."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_topo.mesh_head.network import (HEAD_FORMAT_VERSION, HEAD_KEY, HEAD_STATE_KEY, head_settings,
                                               mesh_network_from_configuration, store_in_configuration)
    from nnunet_topo.mesh_head.templates import sphere_template
    from nnunet_topo.trainers.nnUNetTrainerMesh import nnUNetTrainerMesh

    plans = json.loads(json.dumps(plans))
    store_in_configuration(plans["configurations"]["3d_fullres"],
                           [sphere_template(2, radius=0.3, name=n) for n in STRUCTURES],
                           dict(head_settings({}), format=HEAD_FORMAT_VERSION))
    pm = PlansManager(plans)
    conf = pm.get_configuration("3d_fullres")
    net = mesh_network_from_configuration(nnUNetTrainerMesh.build_network_architecture(pm, conf, 1, 4, False),
                                          conf.configuration)
    with torch.no_grad():
        last = net.network.decoder.seg_layers[-1]  # MeshAugmentedNetwork.network: nnU-Net's network
        last.weight.zero_()
        last.bias.copy_(torch.eye(4)[label] * 10)
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dj))
    torch.save({"network_weights": net.network.state_dict(), "trainer_name": "nnUNetTrainerMesh",
                "init_args": {"configuration": "3d_fullres"}, "inference_allowed_mirroring_axes": None,
                HEAD_STATE_KEY: {"format": HEAD_FORMAT_VERSION, "head_settings": conf.configuration[HEAD_KEY],
                                 "state_dict": net.mesh_head.state_dict()}},
               folder / "fold_0" / "checkpoint_final.pth")
    return str(folder)


def test_predict_meshes_folder_rois_and_cases_without_mesh(tmp_path, monkeypatch, capsys):
    """predict_meshes_folder and the console entry on a hand-made model folder (nnU-Net's own predictor, lookup and
    export): a case within the patch gets meshes and its ROI; a case several patches long whose prediction fills it
    gets a clear message and no mesh; an empty prediction likewise; exit code 1; existing segmentations refused."""
    from nnunet_topo.trainers import TRAINER_DIR

    monkeypatch.setenv("nnUNet_extTrainer", TRAINER_DIR)
    img_file, seg_file, dj, _ = _case(tmp_path, False)
    big_img, big_seg = _padded_case(tmp_path, img_file, seg_file, (0, 30, 0), (80, 0, 0))
    inputs = tmp_path / "in"
    inputs.mkdir()
    sitk.WriteImage(sitk.ReadImage(img_file), str(inputs / "small_0000.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(big_img), str(inputs / "big_0000.nii.gz"))
    patch = [48, 16, 48]  # the small case, (40, 16, 42) preprocessed, fits; the big one, (240, 16, 140), does not
    plans = make_plans([2, 0, 1], _plans_for(dj, img_file)["configurations"]["3d_fullres"]["spacing"], patch)

    rv = _constant_label_model(tmp_path / "model_rv", plans, dj, labels_for("acdc")["RV"])
    out = tmp_path / "out_rv"
    summary = predict_meshes_folder(rv, str(inputs), str(out), device="cpu", show_progress=False)
    assert json.loads((out / "meshes.json").read_text()) == summary
    assert summary["cases_without_mesh"] == ["big"] and summary["structures"] == list(STRUCTURES)
    small, big = summary["cases"]["small"], summary["cases"]["big"]
    assert small["roi"] == {"start": [-4, 0, -3], "size": patch, "box": [[0, 0, 0], [40, 16, 42]],
                            "ignored_voxels": 0}
    assert small["files"] == {n: f"small_{n}.vtk" for n in STRUCTURES} and small["segmentation"] == "small.nii.gz"
    assert all((out / f).is_file() for f in small["files"].values())
    assert big["files"] == {} and big["segmentation"] == "big.nii.gz" and "roi" not in big
    assert big["error"].startswith("case big: the predicted mesh structures span [240, 16, 140] voxels, more than "
                                   "the patch [48, 16, 48]")
    assert not list(out.glob("big_*")) and "no mesh: case big" in capsys.readouterr().err
    # nnU-Net's export: RV inside nnU-Net's crop box, 0 outside it (the big case's non-zero padding spans it all)
    for case, labels in (("small", {0, 1}), ("big", {1})):
        assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz"))))) == labels

    empty = _constant_label_model(tmp_path / "model_bg", plans, dj, 0)
    monkeypatch.setattr("nnunet_topo.cli.predict_meshes.model_folder_from_args", lambda args: empty)
    out = tmp_path / "out_bg"
    argv = ["-i", str(inputs), "-o", str(out), "-d", "1", "-c", "3d_fullres", "-device", "cpu"]
    with pytest.raises(SystemExit) as e:
        predict_meshes_entry(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "no mesh: case small: empty prediction" in err and "error: 2 of 2 case(s) got no mesh: big, small" in err
    listing = json.loads((out / "meshes.json").read_text())
    assert listing["cases_without_mesh"] == ["big", "small"]
    assert all("empty prediction" in c["error"] and c["files"] == {} for c in listing["cases"].values())
    assert sorted(p.name for p in out.iterdir()) == ["big.nii.gz", "meshes.json", "small.nii.gz"]
    with pytest.raises(SystemExit) as e:  # the segmentation files exist now
        predict_meshes_entry(argv)
    assert e.value.code == 2 and "big.nii.gz exists; pass --overwrite" in capsys.readouterr().err

    # --roi_from: the ROI from given label maps (here the references), the empty model's own segmentation still
    # written; both cases now get meshes, each ROI box is the reference's in the preprocessed frame
    roi_dir = tmp_path / "roi_labels"
    roi_dir.mkdir()
    sitk.WriteImage(sitk.ReadImage(seg_file), str(roi_dir / "small.nii.gz"))
    out = tmp_path / "out_roi_from"
    with pytest.raises(MeshPredictionError, match="--roi_from .*no label map for 1 case.*big.nii.gz"):
        predict_meshes_folder(empty, str(inputs), str(out), device="cpu", show_progress=False, roi_from=str(roi_dir))
    sitk.WriteImage(sitk.ReadImage(big_seg), str(roi_dir / "big.nii.gz"))
    summary = predict_meshes_folder(empty, str(inputs), str(out), device="cpu", show_progress=False,
                                    roi_from=str(roi_dir))
    assert summary["cases_without_mesh"] == [] and summary["roi_from"] == str(roi_dir)
    ids = sorted({i for n in STRUCTURES.values() for i in (labels_for("acdc")[x] for x in n)})
    for case, (img, seg) in {"small": (img_file, seg_file), "big": (big_img, big_seg)}.items():
        _, _, _, seg_pre, _ = _preprocess(img, seg, dj, plans)
        lo, hi = structure_box(seg_pre, ids)
        assert summary["cases"][case]["roi"]["box"] == [list(lo), list(hi)], case
        assert all((out / f).is_file() for f in summary["cases"][case]["files"].values())
    assert set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "small.nii.gz"))))) == {0}


def test_no_mesh_head_error():
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    unet = PlainConvUNet(1, 3, [4, 8, 16], torch.nn.Conv3d, 3, STRIDES, 1, 4, 1)
    with pytest.raises(MeshPredictionError, match="no mesh head; train with nnUNetTrainerMesh"):
        check_mesh_network(unet)
    with pytest.raises(MeshPredictionError, match="no mesh head"):
        predict_meshes_case(unet, np.zeros((1, 8, 32, 32), np.float32), {}, None, None)
    assert "nnUNetTrainerMesh/TPM/MIE" in NO_MESH_HEAD


def test_folder_argument_errors(tmp_path):
    with pytest.raises(MeshPredictionError, match="input folder not found"):
        predict_meshes_folder(str(tmp_path), str(tmp_path / "nope"), str(tmp_path / "out"))
    (tmp_path / "in").mkdir()
    with pytest.raises(MeshPredictionError, match="model folder not found"):
        predict_meshes_folder(str(tmp_path / "nomodel"), str(tmp_path / "in"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="is the input folder"):
        predict_meshes_folder(str(tmp_path), str(tmp_path / "in"), str(tmp_path / "in"))
    with pytest.raises(MeshPredictionError, match="unknown mesh format"):
        predict_meshes_folder(str(tmp_path), str(tmp_path / "in"), str(tmp_path / "out"), file_format="xyz")
    with pytest.raises(SystemExit):
        predict_meshes_entry(["-i", "a", "-o", "b", "-d", "1", "-c", "3d_fullres", "--format", "xyz"])


@pytest.mark.slow
def test_round_trip_with_real_plans(tmp_path):
    """Plans of a real nnUNetv2_plan_and_preprocess run (oblique synthetic dataset; z resampled 8 -> ~10 slices with
    nnU-Net's nearest-neighbour separate-z path, which itself moves label boundaries by up to ~0.3 slice). The mapped
    meshes must (a) overlay nnU-Net's *own* back-mapping of the preprocessed labels
    (``convert_predicted_logits_to_segmentation_with_correct_shape``, what nnUNetv2_predict exports) and (b) have the
    centroid of the preprocessed label voxels mapped back. With ~10 mm original slices, nearest-neighbour z
    resampling there and back makes whole slices disagree near the ends of each structure, so the overlay is
    weaker (0.77-0.93 on these cases, the thin RV crescent lowest) than the >= 0.95 of the 2x-resampling test above; (b) is the tight frame check."""
    import os

    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    from conftest import nnunet_cli, run_cli

    raw = tmp_path / "raw"
    root = write_dataset(raw, 994, preset="acdc", num_training=5, num_test=0, seed=1, shape=(8, 40, 40),
                         oblique=True)
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(tmp_path / "pre"),
               nnUNet_results=str(tmp_path / "res"), nnUNet_def_n_proc="1")
    run_cli([nnunet_cli("nnUNetv2_plan_and_preprocess"), "-d", "994", "-c", "3d_fullres", "-np", "1",
             "--no_pp"], env)
    plans = json.loads(next((tmp_path / "pre").glob("Dataset994_*/nnUNetPlans.json")).read_text())
    dj = json.loads((root / "dataset.json").read_text())
    labels = labels_for("acdc")
    for case in sorted((root / "labelsTr").glob("*.nii.gz"))[:2]:
        img = root / "imagesTr" / case.name.replace(".nii.gz", "_0000.nii.gz")
        pm, cm, data, seg_pre, props = _preprocess(str(img), str(case), dj, plans)
        seg_pre = np.maximum(seg_pre, 0)
        onehot = torch.from_numpy(np.stack([seg_pre == c for c in range(4)]).astype(np.float32))
        reverted = convert_predicted_logits_to_segmentation_with_correct_shape(
            onehot, pm, cm, pm.get_label_manager(dj), dict(props))
        geometry = ImageGeometry.from_nnunet_properties(props)
        for name, lab_names in STRUCTURES.items():
            ids = [labels[n] for n in lab_names]
            mesh = _preprocessed_world_mesh(seg_pre, ids, props, pm, cm)
            frac = _overlay_fraction(mesh, reverted, ids, geometry)
            print(case.name, name, "overlay with nnU-Net's back-mapped labels", round(frac, 3))
            assert frac >= 0.75, (case.name, name, frac)
            vox = np.argwhere(np.isin(seg_pre, ids)).astype(float).mean(0, keepdims=True)
            centre = index_to_world(preprocessed_to_original_index(vox, props, pm, cm, seg_pre.shape), geometry)[0]
            # marching cubes cuts corners: mesh and voxel centroids of a thin crescent differ by ~0.15 voxel
            assert np.linalg.norm(mesh.center_mass - centre) < 0.2 * min(geometry.spacing_xyz), (case.name, name)


# ------------------------------------------------------------------------------ fold ensembles

def _add_fold(folder, fold, seed=None, scale_template=None):
    """Copy fold_0's checkpoint of a hand-made model to fold_<fold>, with the head's weights perturbed (``seed``:
    every mesh head parameter + 0.05 N(0, 1); the segmentation layers stay, so the segmentation and ROI do not change)
    or the first template's vertices scaled (``scale_template``: a checkpoint with other templates)."""
    from nnunet_topo.mesh_head.network import HEAD_STATE_KEY

    ckpt = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=False)
    sd = {k: v.clone() if torch.is_tensor(v) else v for k, v in ckpt[HEAD_STATE_KEY]["state_dict"].items()}
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        for k, v in sd.items():
            if "template" not in k and torch.is_tensor(v) and v.is_floating_point():
                sd[k] = v + 0.05 * torch.randn(v.shape, generator=g)
    if scale_template is not None:
        sd["template_vertices_0"] = sd["template_vertices_0"] * scale_template
    (folder / f"fold_{fold}").mkdir()
    torch.save({**ckpt, HEAD_STATE_KEY: {**ckpt[HEAD_STATE_KEY], "state_dict": sd}},
               folder / f"fold_{fold}" / "checkpoint_final.pth")


def _ensemble_setup(tmp_path):
    img_file, seg_file, dj, _ = _case(tmp_path, False)
    inputs = tmp_path / "in"
    inputs.mkdir()
    sitk.WriteImage(sitk.ReadImage(img_file), str(inputs / "small_0000.nii.gz"))
    patch = [48, 16, 48]
    plans = make_plans([2, 0, 1], _plans_for(dj, img_file)["configurations"]["3d_fullres"]["spacing"], patch)
    model = tmp_path / "model"
    _constant_label_model(model, plans, dj, labels_for("acdc")["RV"])
    return model, inputs


def test_fold_ensemble_mean_and_spread(tmp_path, monkeypatch):
    """Two folds with different head weights: the ensemble mesh is the per-vertex mean of the single-fold meshes
    (same ROI), the spread is sqrt(mean_k |x_k - mean|^2) of those meshes and reads back from the .vtk point data and
    the .npy sidecar of .ply; default folds = all fold_N with the checkpoint; a missing fold is an error."""
    from nnunet_topo.mesh_io import read_mesh, read_point_data
    from nnunet_topo.trainers import TRAINER_DIR

    monkeypatch.setenv("nnUNet_extTrainer", TRAINER_DIR)
    model, inputs = _ensemble_setup(tmp_path)
    _add_fold(model, 1, seed=1)
    (model / "fold_7").mkdir()  # no checkpoint: not found by default, an error when asked for
    ens = predict_meshes_folder(str(model), str(inputs), str(tmp_path / "ens"), device="cpu", show_progress=False)
    one = [predict_meshes_folder(str(model), str(inputs), str(tmp_path / f"f{k}"), folds=[k], device="cpu",
                                 show_progress=False) for k in (0, 1)]
    assert ens["folds"] == [0, 1] and [s["folds"] for s in one] == [[0], [1]]
    assert "spread" in ens and all("spread" not in s for s in one)
    assert ens["cases"]["small"]["roi"] == one[0]["cases"]["small"]["roi"] == one[1]["cases"]["small"]["roi"]
    assert all("spread_mm" not in s["cases"]["small"] for s in one)
    for n in STRUCTURES:
        v = [read_mesh(tmp_path / f"f{k}" / f"small_{n}.vtk").vertices for k in (0, 1)]
        assert not np.allclose(v[0], v[1], atol=1e-3)  # the folds disagree
        assert read_point_data(tmp_path / "f0" / f"small_{n}.vtk") == {}  # one fold: no point data
        mesh = read_mesh(tmp_path / "ens" / f"small_{n}.vtk")
        np.testing.assert_allclose(mesh.vertices, (v[0] + v[1]) / 2, atol=1e-9)
        assert mesh.volume > 0
        spread = read_point_data(tmp_path / "ens" / f"small_{n}.vtk")["spread_mm"]
        expect = np.sqrt(np.mean([np.sum((vk - (v[0] + v[1]) / 2) ** 2, axis=1) for vk in v], axis=0))
        np.testing.assert_allclose(spread, expect, atol=1e-9)
        np.testing.assert_allclose(spread, np.linalg.norm(v[0] - v[1], axis=1) / 2, atol=1e-9)  # K = 2
        assert spread.min() >= 0 and spread.max() > 0
        stats = ens["cases"]["small"]["spread_mm"][n]
        assert stats == pytest.approx({"max": spread.max(), "mean": spread.mean()})

    # the console entry: -f with several folds, .ply with the spread as a sidecar .npy
    monkeypatch.setattr("nnunet_topo.cli.predict_meshes.model_folder_from_args", lambda args: str(model))
    argv = ["-i", str(inputs), "-d", "1", "-c", "3d_fullres", "-device", "cpu"]
    predict_meshes_entry(argv + ["-o", str(tmp_path / "ply"), "-f", "1", "0", "--format", "ply"])  # exit code 0
    listing = json.loads((tmp_path / "ply" / "meshes.json").read_text())
    assert listing["folds"] == [1, 0]
    for n in STRUCTURES:
        assert listing["cases"]["small"]["spread_files"][n] == f"small_{n}_spread.npy"
        np.testing.assert_allclose(np.load(tmp_path / "ply" / f"small_{n}_spread.npy"),
                                   read_point_data(tmp_path / "ens" / f"small_{n}.vtk")["spread_mm"], atol=1e-9)
        np.testing.assert_allclose(read_mesh(tmp_path / "ply" / f"small_{n}.ply").vertices,
                                   read_mesh(tmp_path / "ens" / f"small_{n}.vtk").vertices, atol=1e-9)

    for folds, msg in (([7], r"fold 7: no checkpoint checkpoint_final.pth in"), ([0, 3], r"fold 3: no folder"),
                       (["x"], "neither an integer nor 'all'"), ([0, 0], "given twice")):
        with pytest.raises(MeshPredictionError, match=msg):
            predict_meshes_folder(str(model), str(inputs), str(tmp_path / "err"), folds=folds, device="cpu")
    with pytest.raises(MeshPredictionError, match="no fold_N folder with checkpoint_best.pth"):
        predict_meshes_folder(str(model), str(inputs), str(tmp_path / "err"), checkpoint="checkpoint_best.pth",
                              device="cpu")


def test_fold_ensemble_refuses_different_templates(tmp_path, monkeypatch):
    from nnunet_topo.trainers import TRAINER_DIR

    monkeypatch.setenv("nnUNet_extTrainer", TRAINER_DIR)
    model, inputs = _ensemble_setup(tmp_path)
    _add_fold(model, 2, scale_template=1.1)
    with pytest.raises(MeshPredictionError, match=r"folds 0 and 2 have different mesh templates \(structure "
                                                  r"'LV_endo': template vertices differ\)"):
        predict_meshes_folder(str(model), str(inputs), str(tmp_path / "out"), device="cpu", show_progress=False)
    assert not (tmp_path / "out").exists()  # refused before any work
    # each fold alone is fine
    s = predict_meshes_folder(str(model), str(inputs), str(tmp_path / "out2"), folds=["2"], device="cpu",
                              show_progress=False)
    assert s["folds"] == [2] and s["cases"]["small"]["files"]


def test_ensemble_meshes_naive():
    """ensemble_meshes against a loop over vertices; K = 1 gives the mesh and zero spread."""
    from nnunet_topo.mesh_prediction import ensemble_meshes

    base = trimesh.creation.icosphere(1)
    rng = np.random.default_rng(0)
    per_fold = [{"a": trimesh.Trimesh(base.vertices + 0.05 * rng.normal(size=base.vertices.shape), base.faces,
                                      process=False)} for _ in range(3)]
    meshes, spread = ensemble_meshes(per_fold)
    for v in range(len(base.vertices)):
        xs = [m["a"].vertices[v] for m in per_fold]
        mu = sum(xs) / 3
        assert np.allclose(meshes["a"].vertices[v], mu)
        assert np.isclose(spread["a"][v], np.sqrt(sum(np.sum((x - mu) ** 2) for x in xs) / 3))
    m1, s1 = ensemble_meshes(per_fold[:1])
    assert np.array_equal(m1["a"].vertices, per_fold[0]["a"].vertices) and not s1["a"].any()
    with pytest.raises(MeshPredictionError, match="different vertex counts"):
        ensemble_meshes([per_fold[0], {"a": trimesh.creation.icosphere(2)}])


@pytest.mark.parametrize("ext", ["vtk", "vtp"])
def test_point_data_round_trip(tmp_path, ext):
    """export_mesh(point_data=) writes VTK point data that read_point_data reads back bit for bit, read_mesh still
    reads the geometry; other formats and wrong shapes are refused."""
    from nnunet_topo.mesh_io import export_mesh, read_mesh, read_point_data

    m = trimesh.creation.icosphere(1)
    values = np.random.default_rng(0).random(len(m.vertices))
    p = export_mesh(m, tmp_path / f"a.{ext}", point_data={"spread_mm": values})
    back = read_mesh(p)
    assert np.array_equal(back.vertices, m.vertices) and np.array_equal(back.faces, m.faces)
    assert list(read_point_data(p)) == ["spread_mm"] and np.array_equal(read_point_data(p)["spread_mm"], values)
    assert read_point_data(export_mesh(m, tmp_path / f"b.{ext}")) == {}
    with pytest.raises(ValueError, match="one value per vertex"):
        export_mesh(m, tmp_path / f"c.{ext}", point_data={"spread_mm": values[:-1]})
    with pytest.raises(ValueError, match=r"only into \.vtk/\.vtp"):
        export_mesh(m, tmp_path / "c.ply", point_data={"spread_mm": values})
