"""Exact mesh violation volumes (issue 25 item 1): booleans against analytic volumes, the grid method within its
stated tolerance of them, the validity check (open, inside out, self-intersecting) and the evaluator's fallback."""
import math

import numpy as np
import pytest
import trimesh

from nnunet_topo.mesh_booleans import (MeshNotValidError, exact_violating_volume_mm3, mesh_invalid_reason,
                                       self_intersecting_faces)
from nnunet_topo.mesh_evaluation import mesh_rule_volumes, violating_volume_mm3
from nnunet_topo.topology_spec import parse_topology


def sphere(r, centre=(0.0, 0.0, 0.0), sub=4):
    m = trimesh.creation.icosphere(sub, radius=r)
    m.apply_translation(centre)
    return m


def lens_volume(r1, r2, d):
    """Volume of the intersection of two balls of radii r1, r2 whose centres are d apart (|r1 - r2| < d < r1 + r2)."""
    return math.pi * (r1 + r2 - d) ** 2 * (d * d + 2 * d * (r1 + r2) - 3 * (r1 - r2) ** 2) / (12 * d)


def test_overlap_of_two_spheres_equals_the_analytic_lens():
    a, b = sphere(10.0, sub=6), sphere(8.0, (13.0, 0.4, -0.3), sub=6)
    d = float(np.linalg.norm([13.0, 0.4, -0.3]))
    exact = exact_violating_volume_mm3(a, [b], exclusion=True, check=False)
    assert exact == pytest.approx(lens_volume(10.0, 8.0, d), rel=1e-3)
    # far from the origin (world mm of a CT): the same volume (coordinates are shifted before manifold3d)
    far = [m.copy() for m in (a, b)]
    for m in far:
        m.apply_translation([-250.0, 310.0, 1200.0])
    assert exact_violating_volume_mm3(far[0], [far[1]], True, check=False) == pytest.approx(exact, rel=1e-6)
    assert exact_violating_volume_mm3(a, [sphere(5.0, (40.0, 0, 0))], True, check=False) == 0.0  # apart


def test_inner_sphere_poking_out_of_the_outer_one():
    outer, inner = sphere(10.0, sub=6), sphere(4.0, (8.5, 0.0, 0.0), sub=6)
    inside = lens_volume(10.0, 4.0, 8.5)
    expected = 4 / 3 * math.pi * 4.0 ** 3 - inside
    assert exact_violating_volume_mm3(inner, [outer], exclusion=False, check=False) == \
        pytest.approx(expected, rel=1e-3)
    # an allowed opening (may_touch) covering the part outside: nothing violates
    outer, inner = sphere(10.0), sphere(4.0, (8.5, 0.0, 0.0))  # checked (the default): valid closed manifolds
    opening = sphere(6.0, (12.0, 0.0, 0.0))
    assert exact_violating_volume_mm3(inner, [outer, opening], False) == pytest.approx(0.0, abs=1e-6)
    assert exact_violating_volume_mm3(sphere(3.0), [outer], False) == pytest.approx(0.0, abs=1e-6)  # fully inside


@pytest.mark.parametrize("exclusion", [True, False])
def test_grid_method_is_within_its_stated_tolerance_of_the_exact_volume(exclusion):
    """The grid counts a cell by its centre, so only cells the violating region's boundary passes through can be
    wrong: |grid - exact| <= sqrt(3) h area(boundary) (documentation/metrics.md); and it converges as h shrinks."""
    import manifold3d

    a = sphere(10.0)
    b = sphere(7.0, (12.3, 0.2, -0.1)) if exclusion else sphere(6.0, (5.5, 0.0, 0.0))
    first, second = (a, b) if exclusion else (b, a)
    exact = exact_violating_volume_mm3(first, [second], exclusion)
    mf = [manifold3d.Manifold(manifold3d.Mesh(vert_properties=np.asarray(m.vertices, np.float32),
                                              tri_verts=np.asarray(m.faces, np.uint32))) for m in (first, second)]
    region = (mf[0] ^ mf[1]) if exclusion else (mf[0] - mf[1])
    area = region.surface_area()
    errors = []
    for h in (1.0, 0.5, 0.25):
        grid = violating_volume_mm3(first, [second], exclusion, h)
        errors.append(abs(grid - exact))
        assert errors[-1] <= math.sqrt(3) * h * area
    assert errors[-1] < errors[0] and errors[-1] / exact < 0.02


def brute_force_crossings(v, f):
    """Independent reference: every face pair (loops), intersecting iff the two triangles share a point that is not
    a shared vertex, found by sampling each triangle densely and testing closeness to the other's plane patch."""
    out = []
    tri = v[f]
    for i in range(len(f)):
        for j in range(i + 1, len(f)):
            if len(set(f[i]) & set(f[j])) >= 2:
                continue
            if _triangles_cross(tri[i], tri[j], set(f[i]) & set(f[j]), v):
                out.append((i, j))
    return out


def _triangles_cross(t1, t2, shared, v):
    """Plane-interval test (Möller 1997) written as loops: each triangle's vertices' signed distances to the other
    triangle's plane; the two intervals on the planes' common line overlap beyond a shared vertex."""
    def interval(ta, tb):
        n = np.cross(tb[1] - tb[0], tb[2] - tb[0])
        d = [float(np.dot(n, p - tb[0])) for p in ta]
        return d
    da, db = interval(t1, t2), interval(t2, t1)
    if all(x > 0 for x in da) or all(x < 0 for x in da) or all(x > 0 for x in db) or all(x < 0 for x in db):
        return False
    direction = np.cross(np.cross(t1[1] - t1[0], t1[2] - t1[0]), np.cross(t2[1] - t2[0], t2[2] - t2[0]))

    def proj(t, d):  # the triangle's interval on the common line: its vertices on the plane, its edges crossing it
        pts = [float(np.dot(direction, t[k])) for k in range(3) if d[k] == 0]
        for k, m in ((0, 1), (1, 2), (0, 2)):
            if d[k] * d[m] < 0:
                s = d[k] / (d[k] - d[m])
                pts.append(float(np.dot(direction, t[k] + s * (t[m] - t[k]))))
        return min(pts), max(pts)
    (a0, a1), (b0, b1) = proj(t1, da), proj(t2, db)
    lo, hi = max(a0, b0), min(a1, b1)
    if shared:  # they always meet at the shared vertex: crossing means an overlap longer than rounding
        return hi - lo > 1e-7 * np.linalg.norm(direction) * np.linalg.norm(t1[1] - t1[0])
    return hi >= lo


def test_self_intersections_match_a_brute_force_loop_reference():
    rng = np.random.default_rng(3)
    m = sphere(10.0, sub=1)
    assert len(self_intersecting_faces(m.vertices, m.faces)) == 0
    for trial in range(8):  # pull random vertices through the sphere: folds that cross other faces
        v = np.array(m.vertices) + rng.normal(scale=1e-3, size=m.vertices.shape)  # no exactly touching edges
        for k in rng.choice(len(v), 2, replace=False):
            v[k] = -v[k] * rng.uniform(0.3, 1.4)
        got = {tuple(p) for p in self_intersecting_faces(v, m.faces).tolist()}
        ref = set(brute_force_crossings(v, np.asarray(m.faces)))
        assert got == ref and got, trial


def test_validity_check_names_what_is_wrong():
    s = sphere(10.0, sub=3)
    assert mesh_invalid_reason(s) is None
    open_mesh = trimesh.Trimesh(s.vertices, s.faces[1:], process=False)
    assert "not a closed 2-manifold" in mesh_invalid_reason(open_mesh)
    inverted = s.copy()
    inverted.invert()
    assert "no positive volume" in mesh_invalid_reason(inverted)
    folded = s.copy()
    v = np.array(folded.vertices)
    v[0] = -1.5 * v[0]
    folded.vertices = v
    assert "intersects itself" in mesh_invalid_reason(folded)
    two = trimesh.util.concatenate([sphere(5.0), sphere(5.0, (7.0, 0, 0))])  # one mesh, two overlapping shells
    assert "intersects itself" in mesh_invalid_reason(two)
    with pytest.raises(MeshNotValidError, match="second\\[0\\] mesh: intersects itself"):
        exact_violating_volume_mm3(s, [folded], True)


def test_rule_volumes_fall_back_to_the_grid_for_an_invalid_mesh_and_say_so():
    dj = {"labels": {"background": 0, "RV": 1, "MYO": 2, "LV": 3}, "topology": {
        "mesh_structures": {"LV_endo": ["LV"], "LV_epi": ["LV", "MYO"], "RV": ["RV"]},
        "mesh_rules": [{"type": "mesh_exclusion", "meshes": ["RV", "LV_epi"]},
                       {"type": "mesh_inclusion", "inner": "LV_endo", "outer": "LV_epi"}]}}
    spec = parse_topology(dj)
    meshes = {"LV_epi": sphere(10.0), "LV_endo": sphere(6.0, (5.5, 0, 0)), "RV": sphere(7.0, (14.0, 0, 0))}
    rv = mesh_rule_volumes(meshes, spec, 0.5)
    assert set(rv["method"].values()) == {"exact"} and rv["invalid_meshes"] == {}
    exact = rv["violating_volume_mm3"]
    grid = mesh_rule_volumes(meshes, spec, 0.5, method="grid")["violating_volume_mm3"]
    for name in exact:
        assert grid[name] == pytest.approx(exact[name], rel=0.05)
    folded = meshes["RV"].copy()
    v = np.array(folded.vertices)
    c = np.array([14.0, 0.0, 0.0])
    v[0] = c - 1.5 * (v[0] - c)  # through its own centre and out the other side
    folded.vertices = v
    rv = mesh_rule_volumes(dict(meshes, RV=folded), spec, 0.5)
    excl = next(n for n in rv["method"] if "RV" in n)
    assert rv["method"][excl] == "grid" and "intersects itself" in rv["invalid_meshes"]["RV"]
    assert "not valid for exact booleans" in rv["notes"][excl]
    assert rv["method"][next(n for n in rv["method"] if n != excl)] == "exact"
    with pytest.raises(ValueError, match="method must be"):
        mesh_rule_volumes(meshes, spec, 0.5, method="voxels")
