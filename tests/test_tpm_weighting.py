"""L_TPM weighted as the paper weighs it (TPM Eq. 10-12, issue 21 item 3), checked against naive per-point loops.

L_TPM is one BCE with 1/N over the whole query set of a mesh: the standard points of L_occ plus the critical
points. So with no critical point it *is* L_occ, a critical point weighs what a standard point weighs, and the term
fades to L_occ as the violations vanish. MIE keeps its ρ share of critical points inside one mean in the same way.

Geometry: LV and RV balls separated by a MYO wall (the septum) in an anisotropic patch (2 x 1 x 1 mm), as in
tests/test_tpm_penetration.py.
"""
import pytest
import torch

from nnunet_topo.frames import normalized_to_mm, voxel_to_mm
from nnunet_topo.losses.mesh_targets import (critical_point_masks, critical_point_targets, sample_query_points,
                                             source_union)
from nnunet_topo.losses.mie import MIELoss, mix_points
from nnunet_topo.losses.tpm import TPMLoss
from nnunet_topo.occupancy import DEFAULT_EPS, occupancy_bce, winding_number

# the septum scene of the penetration tests: labels, spec, patch, the reference, spheres in the patch frame
from test_tpm_penetration import NAMES, SHAPE, SPACING, SPEC, reference, sphere  # noqa: E402
from test_tpm_penetration import correct_logits as logits_of  # noqa: E402

SMOOTHING = 1.0


def missing_septum(ref):
    """The prediction: the reference with the MYO between the balls (x 15..17 mm) labelled LV / RV."""
    pred = ref.clone()
    wall = pred[0, :, :, 15:18] == 3
    pred[0, :, :, 15:17][wall[..., :2]] = 1
    pred[0, :, :, 17:18][wall[..., 2:]] = 2
    return pred


def meshes_at(lv_x, rv_x, radius=6.5):
    (vl, fl), (vr, fr) = sphere((lv_x, 12.0, 15.0), radius), sphere((rv_x, 12.0, 15.0), radius)
    return [vl[None].clone().requires_grad_(True), vr[None].clone().requires_grad_(True)], [fl, fr]


def naive_bce(v_mm, f, p_mm, t):
    """BCE of the clamped smoothed-dipole occupancy at ONE point (the naive per-point reference)."""
    w = winding_number(p_mm[None], v_mm, f, method="dipole", smoothing=SMOOTHING)[0]
    o = w.clamp(DEFAULT_EPS, 1 - DEFAULT_EPS)
    return -(t * torch.log(o) + (1 - t) * torch.log1p(-o))


def grads(value, meshes):
    return torch.autograd.grad(value, meshes, retain_graph=True)


# ------------------------------------------------------------------------------------------ L_TPM
def test_tpm_without_critical_points_is_the_occupancy_bce_over_the_standard_points():
    """A correct segmentation and meshes that do not overlap: 0 critical points (both sources), and L_TPM equals
    the occupancy BCE over the standard points, computed point by point."""
    ref = reference()
    meshes, faces = meshes_at(10.0, 22.0, radius=5.5)
    for mesh_critical_points in (False, True):
        loss = TPMLoss(SPEC, NAMES, method="dipole", smoothing=SMOOTHING, spacing=SPACING, num_uniform=24,
                       num_surface=24, mesh_critical_points=mesh_critical_points)
        out = loss(meshes, faces, logits_of(ref), ref[:, None], generator=torch.Generator().manual_seed(3))
        assert sum(loss.last_counts.values()) == 0
        assert float(out["tpm"].detach()) == float(out["occ"].detach())
        assert torch.allclose(out["total"], out["occ"] * 1.5)
    # the naive loop over the same standard points (drawn in the same order: the critical points draw nothing)
    loss = TPMLoss(SPEC, NAMES, method="dipole", smoothing=SMOOTHING, spacing=SPACING, num_uniform=24,
                   num_surface=24, mesh_critical_points=False)
    out = loss(meshes, faces, logits_of(ref), ref[:, None], generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    per_mesh = []
    for name, v, f in zip(NAMES, meshes, faces):
        pts, tgt = sample_query_points(ref, SPEC.mesh_structures[name].label_ids, 24, 24, gen)
        v_mm = normalized_to_mm(v[0], SHAPE, SPACING)
        p_mm = voxel_to_mm(pts[0], SPACING)
        per_mesh.append(torch.stack([naive_bce(v_mm, f, p, t) for p, t in zip(p_mm, tgt[0])]).mean())
    naive = torch.stack(per_mesh).mean()
    assert float(out["tpm"].detach()) == pytest.approx(float(naive.detach()), rel=1e-5)
    for g, g_naive in zip(grads(out["tpm"], meshes), grads(naive, meshes)):
        torch.testing.assert_close(g, g_naive, rtol=1e-4, atol=1e-7)


def test_each_critical_point_weighs_a_standard_point():
    """Missing septum (label-map critical points, no random subset): L_TPM and its vertex gradients equal a naive
    loop in which every query point of a mesh, standard or critical, has the weight 1 / (|S| + |C|). The old
    weighting (a mean over the critical points alone) gives another gradient."""
    ref = reference()
    pred = missing_septum(ref)
    meshes, faces = meshes_at(10.0, 22.0)
    n_u, n_s = 16, 16
    loss = TPMLoss(SPEC, NAMES, method="dipole", smoothing=SMOOTHING, spacing=SPACING, num_uniform=n_u,
                   num_surface=n_s, max_critical_points=None, mesh_critical_points=False)
    out = loss(meshes, faces, logits_of(pred), ref[:, None], generator=torch.Generator().manual_seed(1))
    critical = critical_point_targets(pred, ref, SPEC)[0]
    assert all(critical[n][0].shape[0] > 10 for n in NAMES)
    gen = torch.Generator().manual_seed(1)
    tpm_terms, occ_terms, old_terms = [], [], []
    for name, v, f in zip(NAMES, meshes, faces):
        pts, tgt = sample_query_points(ref, SPEC.mesh_structures[name].label_ids, n_u, n_s, gen)
        v_mm = normalized_to_mm(v[0], SHAPE, SPACING)
        std = [naive_bce(v_mm, f, p, t) for p, t in zip(voxel_to_mm(pts[0], SPACING), tgt[0])]
        idx, t_crit = critical[name]
        crit = [naive_bce(v_mm, f, p, t) for p, t in zip(voxel_to_mm(idx, SPACING), t_crit)]
        n = len(std) + len(crit)
        weights = [1.0 / n] * n  # every query point of the mesh, standard or critical, the same weight
        tpm_terms.append(sum(w * b for w, b in zip(weights, std + crit)))
        occ_terms.append(sum(std) / len(std))
        old_terms.append(sum(crit) / len(crit))
    naive_tpm, naive_occ = torch.stack(tpm_terms).mean(), torch.stack(occ_terms).mean()
    assert float(out["tpm"].detach()) == pytest.approx(float(naive_tpm.detach()), rel=1e-5)
    assert float(out["occ"].detach()) == pytest.approx(float(naive_occ.detach()), rel=1e-5)
    assert float(out["tpm"].detach()) > float(out["occ"].detach())
    got = grads(out["tpm"], meshes)
    for g, g_naive in zip(got, grads(naive_tpm, meshes)):
        torch.testing.assert_close(g, g_naive, rtol=1e-4, atol=1e-7)
    old = grads(torch.stack(old_terms).mean(), meshes)
    assert not all(torch.allclose(g, g_old, rtol=1e-2, atol=1e-5) for g, g_old in zip(got, old))


def test_tpm_fades_as_the_overlap_vanishes():
    """Two meshes pushed into each other over a correct segmentation (mesh-source critical points) are moved
    apart in steps: the number of critical points and L_TPM - L_occ shrink to 0, and L_TPM with them."""
    ref = reference()
    rows = []
    for shift in (0.0, 1.0, 2.0, 3.0, 4.0):  # overlap depth 6.5 * 2 - (6 + 2 * shift) mm: 7, 5, 3, 1, -1
        meshes, faces = meshes_at(13.0 - shift, 19.0 + shift)
        loss = TPMLoss(SPEC, NAMES, method="dipole", smoothing=SMOOTHING, spacing=SPACING, num_uniform=64,
                       num_surface=64, max_critical_points=None, mesh_critical_points=True)
        out = loss(meshes, faces, logits_of(ref), ref[:, None], generator=torch.Generator().manual_seed(0))
        rows.append((loss.last_counts["meshes"], float(out["tpm"].detach()), float(out["occ"].detach())))
    counts = [r[0] for r in rows]
    excess = [tpm - occ for _, tpm, occ in rows]
    tpm = [r[1] for r in rows]
    assert counts[0] > 50 and counts[-1] == 0 and all(a > b for a, b in zip(counts, counts[1:-1]))
    assert all(a > b for a, b in zip(excess, excess[1:])) and excess[-1] == 0.0, rows
    assert all(a > b for a, b in zip(tpm, tpm[1:])), rows


# ------------------------------------------------------------------------------------------ MIE
def test_mie_critical_points_share_one_mean_with_the_random_points():
    """MIE: its round(ρ N) critical points and the random points of a mesh are one mean (1 / (B N) each),
    checked against a naive per-point loop over the same points."""
    ref = reference()
    pred = missing_septum(ref)
    meshes, faces = meshes_at(10.0, 22.0)
    n_points, rho = 40, 0.25
    loss = MIELoss(SPEC, NAMES, method="dipole", smoothing=SMOOTHING, spacing=SPACING, rho=rho, num_points=n_points,
                   lambda_lap=0.0, mesh_critical_points=False, axis=0)
    out = loss(meshes, faces, logits_of(pred), ref[:, None], generator=torch.Generator().manual_seed(2))
    assert loss.last_num_critical == 2 * round(rho * n_points)
    # the same points, drawn as MIELoss draws them
    masks = critical_point_masks(pred, ref, SPEC, mode="2d", axis=0)
    gen = torch.Generator().manual_seed(2)
    n_surface = round(0.5 * n_points)
    terms = []
    for name, v, f in zip(NAMES, meshes, faces):
        ids = SPEC.mesh_structures[name].label_ids
        rp, rt = sample_query_points(ref, ids, n_points - n_surface, n_surface, gen)
        perm = torch.randperm(n_points, generator=gen)
        p, t, k = mix_points(source_union(masks, name), ref, ids, rp[:, perm], rt[:, perm], rho, gen)
        p, t = p[0], t[0]
        assert int(k) == round(rho * n_points) < int(source_union(masks, name).sum())
        crit = {tuple(q) for q in torch.nonzero(source_union(masks, name)[0]).tolist()}
        assert all(tuple(int(c) for c in q) in crit for q in p[: int(k)])  # the first k rows are critical voxels
        v_mm = normalized_to_mm(v[0], SHAPE, SPACING)
        per_point = [naive_bce(v_mm, f, q, tt) for q, tt in zip(voxel_to_mm(p, SPACING), t)]
        terms.append(sum(b / n_points for b in per_point))  # critical (first k) and random: the same weight
    naive = torch.stack(terms).mean()
    assert float(out["mie"].detach()) == pytest.approx(float(naive.detach()), rel=1e-5)
    for g, g_naive in zip(grads(out["mie"], meshes), grads(naive, meshes)):
        torch.testing.assert_close(g, g_naive, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------------------------------ fixed-size selection
def test_select_points_takes_all_when_few_and_a_uniform_subset_when_many():
    from nnunet_topo.losses.mesh_targets import select_points

    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 4, 6, 5, generator=g) < 0.2
    mask[1] = False
    mask[1, 1, 2, 3] = True
    idx, valid = select_points(mask, 64, g)
    assert idx.shape == (2, 64, 3) and valid.shape == (2, 64)
    for b in range(2):  # at most k voxels: all of them, each once
        got = {tuple(p) for p in idx[b][valid[b]].tolist()}
        assert got == {tuple(p) for p in torch.nonzero(mask[b]).tolist()}
        assert int(valid[b].sum()) == int(mask[b].sum())
    # more than k: k distinct voxels of the mask, each about equally often (k / count) over many draws
    big = torch.zeros(1, 3, 8, 8, dtype=torch.bool)
    big[0, :, 2:6, 2:6] = True                                  # 48 voxels, k = 12: p = 1/4 each
    hits = torch.zeros(3, 8, 8)
    for _ in range(400):
        idx, valid = select_points(big, 12, g)
        assert bool(valid.all())
        sel = idx[0]
        assert len({tuple(p) for p in sel.tolist()}) == 12 and bool(big[0, sel[:, 0], sel[:, 1], sel[:, 2]].all())
        hits[sel[:, 0], sel[:, 1], sel[:, 2]] += 1
    freq = hits[big[0]] / 400
    assert float(freq.min()) > 0.15 and float(freq.max()) < 0.35  # binomial(400, 0.25): sd 0.022


def test_tpm_critical_selection_has_no_host_sync(monkeypatch):
    """The capped critical points (select_points, targets, their occupancy BCE, the 1/N means) read nothing back."""
    from nnunet_topo import occupancy
    from nnunet_topo.losses.mesh_targets import select_points, targets_at
    from nnunet_topo.voxelize import HostSyncRecorder

    monkeypatch.setattr(occupancy, "SYNC_FREE_CHECKS", True)
    ref = reference()
    meshes, faces = meshes_at(10.0, 14.0, radius=6.0)
    v = normalized_to_mm(meshes[0], SHAPE, SPACING).detach().requires_grad_()
    mask = ref == 1
    winding_number(torch.zeros(1, 3), v[0], faces[0], method="dipole", smoothing=SMOOTHING)  # faces checked once
    with HostSyncRecorder() as rec:
        idx, valid = select_points(mask, 32)
        pm = voxel_to_mm(idx, SPACING)
        per = occupancy_bce(pm, v, faces[0], targets_at(idx, ref, [1]), method="dipole", weights=valid,
                            reduction="none", smoothing=SMOOTHING)
        n = valid.sum(dim=1) + 8
        torch.where(n > 0, per.sum(dim=1) / n.clamp_min(1), 0.0).sum().backward()
    assert rec.syncs == [], rec.syncs


def test_whole_mie_loss_step_has_no_host_sync(monkeypatch):
    """MIELoss forward + backward with both sources (slice-wise label-map points over a missing septum, mesh points of
    overlapping meshes) and its Laplacian term: after the first call (the template faces' range check and edge
    structure, once per faces tensor) nothing is read back; the count stays a tensor."""
    from nnunet_topo import occupancy
    from nnunet_topo.voxelize import HostSyncRecorder

    monkeypatch.setattr(occupancy, "SYNC_FREE_CHECKS", True)
    ref = reference()
    meshes, faces = meshes_at(10.0, 14.0, radius=6.0)
    logits, target = logits_of(missing_septum(ref)), ref[:, None]
    loss = MIELoss(SPEC, NAMES, method="dipole", smoothing=SMOOTHING, spacing=SPACING, num_points=64, axis=0)
    loss(meshes, faces, logits, target)  # the template faces are range-checked once
    with HostSyncRecorder() as rec:
        out = loss(meshes, faces, logits, target)
        out["total"].backward()
    assert rec.syncs == [], rec.syncs
    assert int(loss.last_num_critical) == 2 * round(0.2 * 64)  # 2 meshes, 1 item, enough critical voxels
    assert int(loss.last_counts["prediction"]) > 0 and int(loss.last_counts["meshes"]) > 0


def test_shape_regularisers_have_no_host_sync_after_the_first_step():
    """The mesh trainers' Laplacian and edge terms (losses/mesh_regularisers.py) on the same template faces: the
    first call checks the faces and builds their edges; later steps read nothing back, and give the same values as
    a fresh computation on a copy of the faces (no stale cache)."""
    from nnunet_topo.losses.mesh_regularisers import mesh_regularisers, template_edge_lengths  # noqa: F401
    from nnunet_topo.voxelize import HostSyncRecorder

    meshes, faces = meshes_at(10.0, 14.0, radius=6.0)
    mm = [normalized_to_mm(v, SHAPE, SPACING).detach().requires_grad_() for v in meshes]
    refs = [torch.ones(int(f.shape[0] * 3 / 2)) for f in faces]  # closed meshes: E = 3F/2
    first = mesh_regularisers(mm, faces, refs)
    with HostSyncRecorder() as rec:
        again = mesh_regularisers(mm, faces, refs)
        (again["laplacian"] + again["edge"]).backward()
    assert rec.syncs == [], rec.syncs
    fresh = mesh_regularisers(mm, [f.clone() for f in faces], refs)
    for k in ("laplacian", "edge"):
        assert float(first[k]) == float(again[k]) == float(fresh[k])


def test_whole_tpm_loss_step_has_no_host_sync(monkeypatch):
    """TPMLoss forward + backward with the cap (the trainers' max_critical_points) and both sources, on meshes that
    overlap (mesh critical points) over a missing septum (label-map critical points): no op reads a device value back."""
    from nnunet_topo import occupancy
    from nnunet_topo.voxelize import HostSyncRecorder

    monkeypatch.setattr(occupancy, "SYNC_FREE_CHECKS", True)
    ref = reference()
    pred = missing_septum(ref)
    meshes, faces = meshes_at(10.0, 14.0, radius=6.0)
    logits, target = logits_of(pred), ref[:, None]
    loss = TPMLoss(SPEC, NAMES, method="dipole", smoothing=SMOOTHING, spacing=SPACING, num_uniform=32,
                   num_surface=32, max_critical_points=64)
    loss(meshes, faces, logits, target)  # the template faces are range-checked once
    with HostSyncRecorder() as rec:
        out = loss(meshes, faces, logits, target)
        out["total"].backward()
    assert rec.syncs == [], rec.syncs
    assert int(loss.last_counts["prediction"]) > 0 and int(loss.last_counts["meshes"]) > 0  # both sources ran
