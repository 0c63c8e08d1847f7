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

from nnunet_topo.meshes import ImageGeometry, index_to_normalized, index_to_world, mesh_from_mask, world_to_index
from nnunet_topo.mesh_prediction import (
    NO_MESH_HEAD,
    MeshPredictionError,
    check_mesh_network,
    network_input_padding,
    predict_meshes_case,
    predict_meshes_entry,
    predict_meshes_folder,
    preprocessed_shape,
    preprocessed_to_original_index,
)
from nnunet_topo.occupancy import winding_number
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


def test_network_input_padding():
    padded, before = network_input_padding((5, 30, 33), [2, 4, 4], [8, 32, 16])
    assert padded == (8, 32, 36) and before == (1, 1, 1)


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


# ------------------------------------------------------------------------------ prediction core

def _mesh_network(templates):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from nnunet_topo.mesh_head.network import MeshAugmentedNetwork

    unet = PlainConvUNet(1, 3, [4, 8, 16], torch.nn.Conv3d, 3, STRIDES, 1, 4, 1, conv_bias=True,
                         norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    torch.manual_seed(0)
    return MeshAugmentedNetwork(unet, templates)


@pytest.mark.parametrize("oblique", [False, True])
def test_predict_meshes_case_oracle_templates(tmp_path, oblique):
    """An untrained head outputs its templates bit for bit; templates = meshes of the preprocessed reference, written
    in the normalised frame of the padded input, must come back on the original labels in world space."""
    from nnunet_topo.mesh_head.templates import Template

    img_file, seg_file, dj, seg = _case(tmp_path, oblique)
    plans = _plans_for(dj, img_file)
    pm, cm, data, seg_pre, props = _preprocess(img_file, seg_file, dj, plans)
    strides = np.prod(np.array(cm.pool_op_kernel_sizes), axis=0).astype(int).tolist()
    padded, before = network_input_padding(seg_pre.shape, strides, cm.patch_size)
    labels = labels_for("acdc")
    templates, direct = [], {}
    for name, lab_names in STRUCTURES.items():
        ids = [labels[n] for n in lab_names]
        m = mesh_from_mask(np.isin(seg_pre, ids))
        zyx = np.asarray(m.vertices)[:, ::-1] + np.asarray(before)
        templates.append(Template(index_to_normalized(zyx, padded), np.asarray(m.faces), name=name))
        direct[name] = _preprocessed_world_mesh(seg_pre, ids, props, pm, cm)
    net = _mesh_network(templates)
    meshes = predict_meshes_case(net, data, props, pm, cm, device="cpu", case="c0")
    assert list(meshes) == list(STRUCTURES)
    geometry = ImageGeometry.from_nnunet_properties(props)
    for name, mesh in meshes.items():
        assert mesh.volume > 0 and mesh.is_watertight
        # float32 template coordinates: agreement to ~1e-4 mm
        np.testing.assert_allclose(mesh.vertices, direct[name].vertices, atol=1e-3)
    # (the direct meshes overlay the labels: test_round_trip_overlays_original_labels); one overlay check here
    ids = [labels[n] for n in STRUCTURES["LV_epi"]]
    assert _overlay_fraction(meshes["LV_epi"], seg, ids, geometry) >= 0.95


def test_predict_meshes_case_sphere_template_and_errors(tmp_path):
    from nnunet_topo.mesh_head.templates import sphere_template

    img_file, seg_file, dj, seg = _case(tmp_path, False)
    plans = _plans_for(dj, img_file)
    pm, cm, data, seg_pre, props = _preprocess(img_file, seg_file, dj, plans)
    net = _mesh_network([sphere_template(2, name="blob")])
    meshes = predict_meshes_case(net, data, props, pm, cm, case="c0")
    assert list(meshes) == ["blob"] and meshes["blob"].volume > 0
    # NaN vertices: error names case and structure
    net.forward_with_meshes = lambda x: (None, [torch.full((1, 162, 3), float("nan"))])
    with pytest.raises(MeshPredictionError, match=r"case c0, structure 'blob'.*NaN"):
        predict_meshes_case(net, data, props, pm, cm, case="c0")


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
    with pytest.raises(MeshPredictionError, match="must differ from the input"):
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
