"""Segmentation-guided placement of the mesh head from the network's hard decision (issue 21 item 2, DESIGN §7).

The head places each template at the largest component of the arg-max mask of its structure: centroid, overall
scale from the volume, axis ratios for shape, the template's own pose when the structure is absent. The
placement tests run the head with ``num_blocks=0`` (the zero-initialised alignment leaves the placed template
``B`` unchanged), so the output *is* the placed template.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from nnunet_topo.mesh_head import MeshHead, sphere_template, torus_template
from nnunet_topo.surfaces import signed_volume
from nnunet_topo.mesh_head.head import (
    PLACEMENT_SCALE_RANGE,
    _largest_component_cc3d,
    _largest_component_propagation,
    largest_component,
    mask_solid_moments,
    solid_moments,
)

SHAPE = (24, 40, 36)


# ---------------------------------------------------------------------------------------------- helpers
def _grid(shape, spacing=(1.0, 1.0, 1.0)):
    return np.meshgrid(*[np.arange(n) * sp for n, sp in zip(shape, spacing)], indexing="ij")


def _ellipsoid(shape, c, r, spacing=(1.0, 1.0, 1.0)):
    """Boolean ellipsoid, centre ``c`` and semi-axes ``r`` in (z, y, x) units of ``spacing``."""
    z, y, x = _grid(shape, spacing)
    return ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1


def _logits(labels, num_channels, spread=0.0, spread_channels=()):
    """Logits ``(B, C, Z, Y, X)`` whose softmax is: 1 - 1e-6 on the voxel's label (1e-6 shared by the other
    channels), plus ``spread`` probability on each channel of ``spread_channels`` wherever that is not
    the label (taken from the label's own probability), so the arg-max is ``labels`` everywhere."""
    labels = np.asarray(labels)
    b = labels.shape[0]
    probs = np.full((b, num_channels) + labels.shape[1:], 1e-6 / (num_channels - 1))
    for c in range(num_channels):
        probs[:, c][labels == c] = 1 - 1e-6
    for c in spread_channels:
        add = np.where(labels != c, spread, 0.0)
        probs[:, c] += add
        for own in range(num_channels):
            probs[:, own] -= np.where(labels == own, add, 0.0)
    assert np.allclose(probs.sum(1), 1.0) and probs.min() > 0
    assert np.array_equal(probs.argmax(1), labels)
    return torch.from_numpy(np.log(probs)).float()


def _voxel_volume(shape):
    return float(np.prod([2.0 / (n - 1) for n in shape]))


def _head(templates, channels, **kwargs):
    return MeshHead(templates, [4], 8, num_blocks=0, structure_channels=channels, **kwargs)


def _place(head, logits):
    b = logits.shape[0]
    feats, bottleneck = [torch.randn(b, 4, 3, 4, 5)], torch.randn(b, 8, 2, 2, 2)
    with torch.no_grad():
        return [v.numpy().astype(np.float64) for v in head(feats, bottleneck, logits)]


def _mask_centroid(mask):
    """Centroid of a (Z, Y, X) mask in the normalised (x, y, z) frame."""
    idx = np.argwhere(mask).astype(float)
    return (2 * idx / (np.array(mask.shape) - 1) - 1).mean(0)[::-1]


def _heart_labels(shape=SHAPE, centre=(11, 20, 17)):
    """LV cavity (label 1) inside a myocardial shell (label 2): LV_endo = {1}, LV_epi = {1, 2}."""
    epi = _ellipsoid(shape, centre, (7, 13, 11))
    endo = _ellipsoid(shape, centre, (5, 9, 7.5))
    lab = np.zeros(shape, np.int64)
    lab[epi] = 2
    lab[endo] = 1
    return lab, {"LV_endo": endo, "LV_epi": epi}


# ---------------------------------------------------------------------------------------------- the must-shows
def test_sharp_mask_with_stray_probability_places_each_template_at_the_mask_volume():
    """(a) A sharp mask with 1e-3 probability spread over the rest of the patch: each placed template encloses the
    mask's volume within 10 % (the soft-moment placement: x1.4-2.4 here) and sits at its centroid. The patch is the
    shape of the ACDC study's patches, (20, 56, 64)."""
    shape = (20, 56, 64)
    lab, masks = _heart_labels(shape, (10, 28, 32))
    labels = np.stack([lab, np.roll(lab, (2, -3, 4), axis=(0, 1, 2))])
    templates = [sphere_template(3, radius=0.3, name="LV_endo"), sphere_template(3, radius=0.5, name="LV_epi")]
    head = _head(templates, [[1], [1, 2]])
    out = _place(head, _logits(labels, 3, spread=1e-3, spread_channels=(1, 2)))
    for b in range(2):
        for s, (name, chs) in enumerate([("LV_endo", [1]), ("LV_epi", [1, 2])]):
            mask = np.isin(labels[b], chs)
            want = mask.sum() * _voxel_volume(shape)
            got = signed_volume(out[s][b], templates[s].faces)
            assert abs(got / want - 1) <= 0.10, (b, name, got / want)
            c, _ = solid_moments(out[s][b], templates[s].faces)
            np.testing.assert_allclose(c, _mask_centroid(mask), atol=1e-4)


def test_a_false_positive_blob_far_away_changes_neither_size_nor_centre():
    """(b) One false-positive blob of the structure far from it: placed size within 10 %, centre on the main
    component."""
    lab, masks = _heart_labels()
    blob = lab.copy()
    blob[19:23, 1:5, 30:34] = 1  # 64 voxels of "LV cavity" in a far corner
    templates = [sphere_template(3, radius=0.3, name="LV_endo")]
    head = _head(templates, [[1]])
    out = _place(head, _logits(np.stack([lab, blob]), 3))[0]
    clean, with_blob = (signed_volume(out[b], templates[0].faces) for b in range(2))
    assert abs(with_blob / clean - 1) < 0.10
    c, _ = solid_moments(out[1], templates[0].faces)
    np.testing.assert_allclose(c, _mask_centroid(masks["LV_endo"]), atol=1e-4)


def test_absent_or_tiny_structure_keeps_the_template_pose():
    """(c) A structure not in the arg-max (only stray probability everywhere), or with fewer voxels than
    min_alignment_voxels, keeps the template's own pose; a present one in the same batch is placed."""
    lab, masks = _heart_labels()
    tiny = np.zeros(SHAPE, np.int64)
    tiny[5:7, 5:7, 5] = 1  # 4 voxels < min_alignment_voxels = 8
    absent = np.zeros(SHAPE, np.int64)
    templates = [sphere_template(3, radius=0.3, center=(0.1, -0.2, 0.05), name="LV_endo")]
    head = _head(templates, [[1]], min_alignment_voxels=8)
    out = _place(head, _logits(np.stack([absent, tiny, lab]), 3, spread=1e-3, spread_channels=(1,)))[0]
    for b in range(2):
        np.testing.assert_allclose(out[b], templates[0].vertices, atol=1e-6)
    assert not np.allclose(out[2], templates[0].vertices, atol=1e-2)


def test_anisotropic_patch_sphere_is_placed_at_its_volume_and_round_in_mm():
    """(d) A sphere of R = 30 mm in a patch of spacing (10, 4.5, 4.5) mm (an ellipsoid in the normalised frame;
    stray probability 1e-3 elsewhere): the placed template encloses the sphere's volume in mm within 10 % and is
    round in mm (per-axis std within 10 % of each other)."""
    spacing = np.array([10.0, 4.5, 4.5])
    shape = (16, 64, 64)
    radius = 30.0
    mask = _ellipsoid(shape, (72.0, 140.0, 150.0), (radius,) * 3, spacing)
    template = sphere_template(3, radius=0.4, name="LV_epi")  # round in the normalised frame, not in mm
    head = _head([template], [[1]])
    out = _place(head, _logits(mask[None].astype(np.int64), 2, spread=1e-3, spread_channels=(1,)))[0][0]
    mm_per_unit = (np.array(shape) - 1) * spacing / 2.0  # (z, y, x)
    vertices_mm = (out + 1.0) * mm_per_unit[::-1]  # (x, y, z) in mm
    volume_mm = signed_volume(vertices_mm, template.faces)
    sphere = 4.0 / 3.0 * np.pi * radius**3
    mask_mm = mask.sum() * spacing.prod()
    assert abs(volume_mm / mask_mm - 1) <= 0.10, volume_mm / mask_mm
    assert abs(volume_mm / sphere - 1) <= 0.10, volume_mm / sphere
    _, std_mm = solid_moments(vertices_mm, template.faces)
    assert std_mm.max() / std_mm.min() <= 1.10, std_mm


# ---------------------------------------------------------------------------------------------- the parts
def test_placement_formula_volume_axis_ratios_and_clip():
    """The placed scales are g r: g = (V / V_T)^(1/3) within PLACEMENT_SCALE_RANGE, r the per-axis std ratios
    normalised to product 1 (so an ellipsoid mask on a round template gets the ellipsoid's proportions)."""
    shape = (30, 30, 30)
    mask = _ellipsoid(shape, (14.5, 14.5, 14.5), (5, 8, 11))
    template = sphere_template(4, radius=0.3, name="s")
    head = _head([template], [[1]])
    centres, scales = head.placement(_logits(mask[None].astype(np.int64), 2), 1)
    v_t, _, std_t = (np.asarray(a, dtype=np.float64) for a in head._placement_constants(torch.device("cpu")))
    volume, _, std = (a.double().numpy() for a in mask_solid_moments(torch.from_numpy(mask)[None]))
    g = (volume[0] / v_t[0]) ** (1 / 3)
    r = std[0] / std_t[0]
    r = r / np.prod(r) ** (1 / 3)
    np.testing.assert_allclose(scales[0, 0].numpy(), g * r, rtol=1e-4)
    np.testing.assert_allclose(np.prod(scales[0, 0].numpy()), volume[0] / v_t[0], rtol=1e-4)
    assert scales[0, 0, 0] > scales[0, 0, 1] > scales[0, 0, 2]  # (x, y, z): x > y > z, as the semi-axes
    # a structure far larger than the template: the overall scale stops at the clip
    big = _head([sphere_template(2, radius=0.02, name="s")], [[1]])
    _, scales = big.placement(_logits(mask[None].astype(np.int64), 2), 1)
    np.testing.assert_allclose(np.prod(scales[0, 0].numpy()) ** (1 / 3), PLACEMENT_SCALE_RANGE[1], rtol=1e-5)


def test_torus_template_on_a_ring_mask_encloses_its_volume():
    """Genus 1 is placed alike (volume, not surface, decides the size)."""
    z, y, x = _grid(SHAPE)
    ring = (np.sqrt((y - 20.0) ** 2 + (x - 18.0) ** 2) - 10) ** 2 + (z - 12.0) ** 2 <= 16
    template = torus_template(0.3, 0.1, 24, 12, name="MYO")
    head = _head([template], [[2]])
    out = _place(head, _logits(np.where(ring, 2, 0)[None], 3, spread=1e-3, spread_channels=(2,)))[0][0]
    got = signed_volume(out, template.faces)
    assert abs(got / (ring.sum() * _voxel_volume(SHAPE)) - 1) <= 0.10


def test_mask_solid_moments_against_a_box_mesh_and_a_naive_loop():
    """Volume, centroid and std of the voxel solid equal a box mesh's (each voxel a box of the grid's cell), and a
    naive loop over voxels (centres' variance + w^2/12)."""
    import trimesh

    shape = (6, 9, 11)
    mask = np.zeros(shape, bool)
    mask[1:4, 2:8, 3:6] = True
    volume, c, std = (a[0].double().numpy() for a in mask_solid_moments(torch.from_numpy(mask)[None]))
    w = 2.0 / (np.array(shape[::-1]) - 1)  # (x, y, z) cell widths
    lo = np.array([3, 2, 1]) * w - 1 - w / 2
    hi = np.array([5, 7, 3]) * w - 1 + w / 2
    box = trimesh.creation.box(bounds=[lo, hi])
    np.testing.assert_allclose(volume, box.volume, rtol=1e-5)
    c_box, std_box = solid_moments(box.vertices, box.faces)
    np.testing.assert_allclose(c, c_box, atol=1e-6)
    np.testing.assert_allclose(std, std_box, rtol=1e-5)

    rng = np.random.default_rng(0)
    m = rng.random((2, 5, 7, 6)) > 0.6
    volume, c, std = (a.double().numpy() for a in mask_solid_moments(torch.from_numpy(m)))
    w = np.array([2 / 5, 2 / 6, 2 / 4])  # x, y, z
    for b in range(2):
        pts = []
        for zz in range(5):
            for yy in range(7):
                for xx in range(6):
                    if m[b, zz, yy, xx]:
                        pts.append([2 * xx / 5 - 1, 2 * yy / 6 - 1, 2 * zz / 4 - 1])
        pts = np.array(pts)
        np.testing.assert_allclose(volume[b], len(pts) * w.prod(), rtol=1e-6)
        np.testing.assert_allclose(c[b], pts.mean(0), atol=1e-6)
        np.testing.assert_allclose(std[b], np.sqrt(pts.var(0) + w**2 / 12), rtol=1e-5)
    empty = mask_solid_moments(torch.zeros(1, 3, 3, 3, dtype=torch.bool))
    assert [float(a.abs().sum()) for a in empty] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"\(N, Z, Y, X\)"):
        mask_solid_moments(torch.zeros(3, 3, 3, dtype=torch.bool))


def _naive_largest(mask):
    lab, _ = ndimage.label(mask, np.ones((3, 3, 3)))
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == sizes.argmax() if sizes.max() > 0 else np.zeros_like(mask)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_largest_component_both_implementations_against_scipy(seed):
    """cc3d (CPU tensors) and the torch label propagation (device tensors; run here on the CPU) keep the same
    largest 26-connected component as scipy.ndimage.label, on smooth blobs with stray voxels and an empty mask."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((5, 14, 20, 18)), (0, 2, 2, 2))
    masks = noise > np.quantile(noise, 0.8)
    masks[0] = False  # empty: stays empty
    masks[1] |= rng.random(masks[1].shape) > 0.97  # stray voxels
    want = np.stack([_naive_largest(m) for m in masks])
    t = torch.from_numpy(masks)
    for impl in (_largest_component_cc3d, _largest_component_propagation, largest_component):
        got = impl(t)
        assert got.dtype == torch.bool and got.shape == t.shape
        np.testing.assert_array_equal(got.numpy(), want, err_msg=impl.__name__)


def test_largest_component_is_26_connected():
    """Voxels touching at a corner are one component (26-connectivity), a gap of one voxel separates."""
    mask = torch.zeros(2, 5, 5, 5, dtype=torch.bool)
    mask[0, 0, 0, 0] = mask[0, 1, 1, 1] = mask[0, 2, 2, 2] = True  # a diagonal chain: one component of 3
    mask[0, 4, 4, 0] = mask[0, 4, 3, 0] = True  # 2 voxels apart
    mask[1, 0, 0, 0] = mask[1, 2, 2, 2] = mask[1, 2, 2, 3] = True  # gap: the pair wins
    for impl in (_largest_component_cc3d, _largest_component_propagation):
        got = impl(mask)
        assert got[0].sum() == 3 and got[0, 2, 2, 2] and not got[0, 4, 4, 0]
        assert got[1].sum() == 2 and not got[1, 0, 0, 0]


def test_placement_without_gradient_and_input_errors():
    lab, _ = _heart_labels()
    head = _head([sphere_template(2, radius=0.3, name="LV_endo")], [[1]])
    logits = _logits(lab[None], 3).requires_grad_(True)
    feats, bottleneck = [torch.randn(1, 4, 3, 4, 5)], torch.randn(1, 8, 2, 2, 2)
    out = head(feats, bottleneck, logits)[0]
    out.sum().backward()
    assert logits.grad is None
    with pytest.raises(ValueError, match="segmentation"):
        head(feats, bottleneck)
    with pytest.raises(ValueError, match="C>=2"):
        head(feats, bottleneck, logits[:, :1])
    with pytest.raises(ValueError, match=r"\(N, Z, Y, X\)"):
        largest_component(torch.zeros(3, 3, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------- version
def test_placement_version_is_stored_and_an_old_head_is_refused():
    """The extra state records PLACEMENT_VERSION = 2; a state without it (trained with the soft-moment placement)
    is refused by a head that places, and accepted by one that does not (its meshes do not depend on it)."""
    t = sphere_template(2, radius=0.3, name="LV_endo")
    head = _head([t], [[1]])
    state = head.state_dict()
    assert MeshHead.PLACEMENT_VERSION == 2 and state["_extra_state"]["placement_version"] == 2
    _head([t], [[1]]).load_state_dict(state, strict=True)
    old = dict(state)
    old["_extra_state"] = {"names": ["LV_endo"], "genera": [0]}  # as written before the placement version
    with pytest.raises(ValueError, match=r"soft-moment placement \(version 1\).*[Rr]etrain"):
        _head([t], [[1]]).load_state_dict(old, strict=True)
    MeshHead([t], [4], 8, num_blocks=0).load_state_dict(old, strict=True)  # no placement: same meshes
    future = dict(state)
    future["_extra_state"] = dict(state["_extra_state"], placement_version=3)
    with pytest.raises(ValueError, match="placement version 3"):
        _head([t], [[1]]).load_state_dict(future, strict=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_placement_on_cuda_equals_cpu():
    lab, _ = _heart_labels()
    blob = lab.copy()
    blob[19:23, 1:5, 30:34] = 1
    logits = _logits(np.stack([lab, blob]), 3, spread=1e-3, spread_channels=(1, 2))
    templates = [sphere_template(3, radius=0.3, name="LV_endo"), sphere_template(3, radius=0.5, name="LV_epi")]
    head = _head(templates, [[1], [1, 2]])
    cpu = head.placement(logits, 2)
    gpu = head.cuda().placement(logits.cuda(), 2)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-6)
