"""Tests of nnunet_topo.occupancy_triton: the Triton kernels against the torch reference of occupancy.py.

There is no GPU here: the kernels run on the CPU under the Triton interpreter. ``TRITON_INTERPRET=1``
must be set before triton is imported, so every comparison runs in ONE subprocess that executes this
file as a script (``python tests/test_occupancy_triton.py`` with the variable set) and prints a JSON
report of measured errors; the tests below assert on that report. The in-process tests cover backend
selection (default, env var, ``"auto"``), the clear error for ``"triton"`` on CPU tensors without the
interpreter, importing without triton, and that the kernels compile for an sm_90 (H100/H200) target
with Triton's bundled ptxas (no GPU needed).

Meshes: icospheres of 80 and 320 faces (42 / 162 vertices), a second batch entry scaled, shifted and
jittered; 61 query points (no multiple of any block size); float32 unless stated.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Tolerances asserted below; measured values (interpreter, float32) are in documentation/occupancy.md.
VALUE_ATOL = 1e-5          # |w_triton - w_torch| (float32 reference)
VALUE_RTOL = 1e-4
GRAD_TOL = 1e-5            # max |g_triton - g_torch| / max |g_torch|, float32 and float64 references
FD_TOL = 2e-2              # float32 central difference vs the analytic directional derivative (relative)


# ----------------------------------------------------------------------------------------------------
# the interpreter run (executed in a subprocess with TRITON_INTERPRET=1)
# ----------------------------------------------------------------------------------------------------

def _meshes(subdivisions: int, dtype=torch.float32):
    import trimesh
    mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=1.0)
    v = torch.tensor(mesh.vertices, dtype=torch.float64)
    f = torch.tensor(mesh.faces, dtype=torch.long)
    g = torch.Generator().manual_seed(subdivisions)
    v2 = 0.8 * v + torch.tensor([0.1, -0.05, 0.02], dtype=torch.float64) + 0.01 * torch.randn(v.shape, generator=g,
                                                                                          dtype=torch.float64)
    return torch.stack([v, v2]).to(dtype), f


def _points(kind: str, n: int, seed: int, vertices=None, min_vertex_distance: float = 0.0):
    """(2, n, 3) float64 points: "uniform" in [-1.5, 1.5]^3, "inside" (r < 0.6), "outside" (r > 1.3)
    or "shell" (0.7 < r < 1.3)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    while sum(len(x) for x in out) < 2 * n:
        if kind == "uniform":
            p = torch.rand(4 * n, 3, generator=g, dtype=torch.float64) * 3.0 - 1.5
        else:
            u = torch.randn(4 * n, 3, generator=g, dtype=torch.float64)
            u = u / u.norm(dim=1, keepdim=True)
            t = torch.rand(4 * n, 1, generator=g, dtype=torch.float64)
            r = {"inside": 0.6 * t, "outside": 1.3 + 0.5 * t, "shell": 0.7 + 0.6 * t}[kind]
            p = u * r
        if min_vertex_distance > 0:
            dist = torch.cdist(p, vertices.double().reshape(-1, 3)).amin(dim=1)
            p = p[dist > min_vertex_distance]
        out.append(p)
    return torch.cat(out)[: 2 * n].reshape(2, n, 3)


def _near_surface(v: torch.Tensor, f: torch.Tensor, n: int, seed: int, offset: float = 1e-3) -> torch.Tensor:
    """(1, n, 3) float64 points ``offset`` from random points of random faces of mesh ``v[0]``, along the face
    normal, alternately outside and inside."""
    g = torch.Generator().manual_seed(seed)
    v = v[0].double()
    tri = v[f[torch.randint(len(f), (n,), generator=g)]]                # (n, 3 corners, 3)
    bary = torch.rand(n, 3, generator=g, dtype=torch.float64)
    bary = bary / bary.sum(dim=1, keepdim=True)
    normal = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal = normal / normal.norm(dim=1, keepdim=True)
    side = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(n // 2 + 1)[:n, None]
    return ((bary[:, :, None] * tri).sum(dim=1) + offset * side * normal)[None]


def _max_err(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.detach().double(), b.detach().double()
    diff = (a - b).abs()
    return {"abs": float(diff.max()), "rel_to_max": float(diff.max() / b.abs().max().clamp_min(1e-30)),
            "allclose_excess": float((diff - VALUE_RTOL * b.abs()).max()),
            "finite": bool(torch.isfinite(a).all())}


def _interpreter_report() -> dict:
    import nnunet_topo.occupancy_triton as ot
    from nnunet_topo.occupancy import _vertex_moments, occupancy_bce, winding_number
    from occupancy_bce_module import OccupancyBCELoss

    rep: dict = {"interpreter_active": ot.interpreter_active(), "triton_available": ot.triton_available()}
    v, f = _meshes(2)                                            # (2, 162, 3), (320, 3)
    n = 61

    # --- dipole values, sigma > 0 and sigma = 0 away from the vertices
    for name, sigma, pts in (("dipole_sigma", 0.3, _points("uniform", n, 1)),
                             ("dipole_plain", 0.0, _points("uniform", n, 2, v, min_vertex_distance=0.1))):
        p = pts.float()
        wt = winding_number(p, v, f, method="dipole", smoothing=sigma, backend="triton")
        w32 = winding_number(p, v, f, method="dipole", smoothing=sigma, backend="torch")
        w64 = winding_number(p.double(), v.double(), f, method="dipole", smoothing=sigma, backend="torch")
        rep[name] = {"vs_float32": _max_err(wt, w32), "vs_float64": _max_err(wt, w64),
                     "torch32_vs_float64": _max_err(w32, w64), "dtype": str(wt.dtype)}

    # --- exact values: inside, outside, near the surface (both sides), face centres (w = 1/2)
    vs = v[:1]
    for kind in ("inside", "outside", "near", "uniform"):
        p = (_near_surface(vs, f, n, 3) if kind == "near" else _points(kind, n, 3)[:1]).float()
        wt = winding_number(p, vs, f, method="exact", backend="triton")
        w32 = winding_number(p, vs, f, method="exact", backend="torch")
        w64 = winding_number(p.double(), vs.double(), f, method="exact", backend="torch")
        rep[f"exact_{kind}"] = {"vs_float32": _max_err(wt, w32), "vs_float64": _max_err(wt, w64),
                                "same_side": bool(((wt > 0.5) == (w64 > 0.5)).all()),
                                "min_w": float(wt.min()), "max_w": float(wt.max())}
    centres = vs[0][f[:50]].mean(dim=1)[None]                    # on faces: principal value 1/2
    wt = winding_number(centres, vs, f, method="exact", backend="triton")
    rep["exact_face_centres"] = {"max_dev_from_half": float((wt - 0.5).abs().max()),
                                 "vs_float32": _max_err(wt, winding_number(centres, vs, f, method="exact"))}
    # batch of two different meshes
    p = _points("shell", n, 4).float()
    rep["exact_batch"] = {"vs_float32": _max_err(winding_number(p, v, f, method="exact", backend="triton"),
                                                 winding_number(p, v, f, method="exact", backend="torch"))}

    # --- gradients of sum(c * w) wrt points and vertices (the vertices through m as well)
    gen = torch.Generator().manual_seed(5)
    c = torch.randn(2, n, generator=gen, dtype=torch.float64)

    def grads(p, vv, sigma, backend):
        p = p.clone().requires_grad_()
        vv = vv.clone().requires_grad_()
        w = winding_number(p, vv, f, method="dipole", smoothing=sigma, backend=backend)
        (w * c[..., : w.shape[-1]].to(w.dtype)).sum().backward()
        return p.grad, vv.grad

    for name, sigma, pts in (("grad_sigma", 0.3, _points("shell", n, 6)),
                             ("grad_plain", 0.0, _points("uniform", n, 7, v, min_vertex_distance=0.1))):
        gp_t, gv_t = grads(pts.float(), v, sigma, "triton")
        gp_32, gv_32 = grads(pts.float(), v, sigma, "torch")
        gp_64, gv_64 = grads(pts, v.double(), sigma, "torch")
        rep[name] = {"points_vs_float32": _max_err(gp_t, gp_32), "points_vs_float64": _max_err(gp_t, gp_64),
                     "vertices_vs_float32": _max_err(gv_t, gv_32), "vertices_vs_float64": _max_err(gv_t, gv_64),
                     "torch32_points_vs_float64": _max_err(gp_32, gp_64),
                     "torch32_vertices_vs_float64": _max_err(gv_32, gv_64)}

    # --- finite-difference directional derivative (float32, Triton forward) against the Triton gradient
    pts = _points("shell", n, 8).float()
    gp_t, gv_t = grads(pts, v, 0.3, "triton")
    gen = torch.Generator().manual_seed(9)
    du, dp = torch.randn(v.shape, generator=gen), torch.randn(pts.shape, generator=gen)
    h = 1e-2

    def loss(pp, vv):
        with torch.no_grad():
            return float((winding_number(pp, vv, f, method="dipole", smoothing=0.3, backend="triton")
                          * c.float()).double().sum())

    fd_v = (loss(pts, v + h * du) - loss(pts, v - h * du)) / (2 * h)
    fd_p = (loss(pts + h * dp, v) - loss(pts - h * dp, v)) / (2 * h)
    an_v, an_p = float((gv_t.double() * du.double()).sum()), float((gp_t.double() * dp.double()).sum())
    rep["finite_difference"] = {"vertices": {"fd": fd_v, "analytic": an_v, "rel": abs(fd_v - an_v) / abs(an_v)},
                                "points": {"fd": fd_p, "analytic": an_p, "rel": abs(fd_p - an_p) / abs(an_p)}}

    # --- ragged tiles: block sizes that divide neither N = 61 nor V = 162 nor F = 320 (and blocks > N)
    p = _points("uniform", n, 10).float()
    pc, vc = p - v.mean(dim=1, keepdim=True), v - v.mean(dim=1, keepdim=True)
    m = _vertex_moments(vc, f)
    ref_w = winding_number(p, v, f, method="dipole", smoothing=0.3, backend="torch")
    ref_e = winding_number(p, v, f, method="exact", backend="torch")
    ragged = {}
    from nnunet_topo.occupancy import _ChunkedWinding, _dipole_kernel
    # the GPU default tiles (dipole DIPOLE_BLOCK_N x DIPOLE_BLOCK_V, exact EXACT_BLOCK_N x EXACT_BLOCK_F), then
    # others; under the interpreter the defaults are INTERPRETER_BLOCK_* (fewer interpreted steps)
    launches = [("gpu-default", None, None, None, None, None)] + [
        (f"{bn}x{bk}/{sp}", bn, bk, bn, bk, sp) for bn, bk, sp in ((16, 32, None), (32, 64, 3), (128, 256, 1),
                                                                  (64, 64, 64))]
    for key, bn, bk, ebn, ebk, splits in launches:
        if key == "gpu-default":
            bn, bk, ebn, ebk = ot.DIPOLE_BLOCK_N, ot.DIPOLE_BLOCK_V, ot.EXACT_BLOCK_N, ot.EXACT_BLOCK_F
        pp, vv, mm = pc.clone().requires_grad_(), vc.clone().requires_grad_(), m.detach().clone().requires_grad_()
        w = ot.dipole_winding(pp, vv, mm, 0.3, block_n=bn, block_v=bk, splits=splits)
        (w * c.float()).sum().backward()
        pr, vr, mr = pc.clone().requires_grad_(), vc.clone().requires_grad_(), m.detach().clone().requires_grad_()
        wr = _ChunkedWinding.apply(_dipole_kernel(0.3), vr.shape[1], 2 ** 22, pr, vr, mr)
        (wr * c.float()).sum().backward()
        we = ot.exact_winding(pc, vc, f, block_n=ebn, block_f=ebk, splits=splits)
        ragged[key] = {
            "dipole": _max_err(w, ref_w), "exact": _max_err(we, ref_e),
            "grad_points": _max_err(pp.grad, pr.grad), "grad_vertices": _max_err(vv.grad, vr.grad),
            "grad_moments": _max_err(mm.grad, mr.grad)}
    try:
        ot.dipole_forward(pc, vc, m, 0.3, block_n=48)
        rep["block_not_power_of_two"] = "no error"
    except ValueError as err:
        rep["block_not_power_of_two"] = str(err)
    rep["ragged"] = ragged

    # --- shared (N, 3) points against a (2, V, 3) batch: the point gradient sums over the batch
    p1 = _points("shell", n, 11)[0].float()
    outs = {}
    for backend in ("triton", "torch"):
        pp, vv = p1.clone().requires_grad_(), v.clone().requires_grad_()
        w = winding_number(pp, vv, f, method="dipole", smoothing=0.3, backend=backend)
        (w * c.float()).sum().backward()
        outs[backend] = (w, pp.grad, vv.grad)
    rep["broadcast"] = {"shape": list(outs["triton"][0].shape), "values": _max_err(outs["triton"][0], outs["torch"][0]),
                        "grad_points": _max_err(outs["triton"][1], outs["torch"][1]),
                        "grad_vertices": _max_err(outs["triton"][2], outs["torch"][2])}

    # --- a list of meshes of different sizes (the per-mesh loop)
    v1, f1 = _meshes(1)
    lv, lf = [v1[0], v[1]], [f1, f]
    p = _points("uniform", n, 12).float()
    rep["list"] = {kind: _max_err(winding_number(p, lv, lf, method=kind, smoothing=s, backend="triton"),
                                  winding_number(p, lv, lf, method=kind, smoothing=s, backend="torch"))
                   for kind, s in (("dipole", 0.3), ("exact", 0.0))}

    # --- BCE and the loss module through the Triton backend
    p = _points("shell", n, 13).float()
    t = (p.norm(dim=-1) < 0.9).float()
    res = {}
    for backend in ("triton", "torch"):
        vv = v.clone().requires_grad_()
        loss_f = occupancy_bce(p, vv, f, t, method="dipole", smoothing=0.3, backend=backend)
        loss_f.backward()
        mod = OccupancyBCELoss(method="dipole", smoothing=0.3, backend=backend)
        res[backend] = (loss_f.detach(), vv.grad, mod(p, v, f, t).detach())
    rep["bce"] = {"loss": _max_err(res["triton"][0], res["torch"][0]),
                  "grad_vertices": _max_err(res["triton"][1], res["torch"][1]),
                  "module": _max_err(res["triton"][2], res["torch"][2])}

    # --- fallbacks: exact with gradients and float64 inputs use torch (bit-identical)
    p = _points("uniform", n, 14).float()
    vv = v.clone().requires_grad_()
    we_t = winding_number(p, vv, f, method="exact", backend="triton")
    we_r = winding_number(p, v, f, method="exact", backend="torch")
    we_t.sum().backward()
    rep["fallback_exact_grad"] = {"equal": bool(torch.equal(we_t.detach(), we_r)), "has_grad": vv.grad is not None}
    p64 = p.double()
    rep["fallback_float64"] = {
        "equal": bool(torch.equal(winding_number(p64, v.double(), f, method="dipole", smoothing=0.3, backend="triton"),
                                  winding_number(p64, v.double(), f, method="dipole", smoothing=0.3))),
        "dtype": str(winding_number(p64, v.double(), f, method="dipole", backend="triton").dtype)}

    # --- sigma = 0 with a point exactly on a vertex: finite values and gradients, as the torch code
    p = v[:, :5].clone()
    g_tr = grads(p, v, 0.0, "triton")
    g_to = grads(p, v, 0.0, "torch")
    rep["on_vertex"] = {"values": _max_err(winding_number(p, v, f, method="dipole", backend="triton"),
                                           winding_number(p, v, f, method="dipole", backend="torch")),
                        "grad_points": _max_err(g_tr[0], g_to[0]), "grad_vertices": _max_err(g_tr[1], g_to[1])}
    return rep


# ----------------------------------------------------------------------------------------------------
# the subprocess and the tests on its report
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def report():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "NNUNET_TOPO_OCCUPANCY_BACKEND": ""}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"interpreter run failed ({proc.returncode})\n--- stdout ---\n{proc.stdout[-6000:]}"
                             f"\n--- stderr ---\n{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_close(err: dict, what: str, atol: float = VALUE_ATOL) -> None:
    assert err["finite"], what
    assert err["allclose_excess"] <= atol, f"{what}: {err}"


def test_interpreter_is_used(report):
    assert report["interpreter_active"] and report["triton_available"]


@pytest.mark.parametrize("name", ["dipole_sigma", "dipole_plain"])
def test_dipole_values_match_torch(report, name):
    r = report[name]
    assert r["dtype"] == "torch.float32"
    _assert_close(r["vs_float32"], name)
    # against float64, Triton is as good as the float32 torch code (up to a few rounding units)
    assert r["vs_float64"]["abs"] <= max(4 * r["torch32_vs_float64"]["abs"], VALUE_ATOL), r


@pytest.mark.parametrize("kind", ["inside", "outside", "near", "uniform"])
def test_exact_values_match_torch(report, kind):
    r = report[f"exact_{kind}"]
    _assert_close(r["vs_float32"], kind)
    assert r["vs_float64"]["abs"] <= VALUE_ATOL, r
    assert r["same_side"], r


def test_exact_face_centres_and_batch(report):
    assert report["exact_face_centres"]["max_dev_from_half"] <= VALUE_ATOL
    _assert_close(report["exact_face_centres"]["vs_float32"], "face centres")
    _assert_close(report["exact_batch"]["vs_float32"], "batch of two meshes")


@pytest.mark.parametrize("name", ["grad_sigma", "grad_plain"])
def test_dipole_gradients_match_torch_float32_and_float64(report, name):
    r = report[name]
    for key in ("points_vs_float32", "points_vs_float64", "vertices_vs_float32", "vertices_vs_float64"):
        assert r[key]["finite"], (key, r[key])
        assert r[key]["rel_to_max"] <= GRAD_TOL, (key, r[key])


def test_finite_difference_directional_derivative(report):
    for what, r in report["finite_difference"].items():
        assert r["rel"] <= FD_TOL, (what, r)


@pytest.mark.parametrize("launch", ["gpu-default", "16x32/None", "32x64/3", "128x256/1", "64x64/64"])
def test_ragged_tiles_and_splits(report, launch):
    """The GPU default tiles and others; none divides N = 61, V = 162 or F = 320 (and blocks larger than N);
    the element loop cut into 1, 3, the default, or more splits than tiles."""
    r = report["ragged"][launch]
    _assert_close(r["dipole"], "dipole")
    _assert_close(r["exact"], "exact")
    for key in ("grad_points", "grad_vertices", "grad_moments"):
        assert r[key]["rel_to_max"] <= GRAD_TOL, (key, r[key])


def test_block_sizes_must_be_powers_of_two(report):
    assert "power of two" in report["block_not_power_of_two"]


def test_broadcast_lists_and_bce(report):
    r = report["broadcast"]
    assert r["shape"] == [2, 61]
    _assert_close(r["values"], "broadcast values")
    assert r["grad_points"]["rel_to_max"] <= GRAD_TOL and r["grad_vertices"]["rel_to_max"] <= GRAD_TOL, r
    for kind, err in report["list"].items():
        _assert_close(err, f"list {kind}")
    b = report["bce"]
    assert b["loss"]["rel_to_max"] <= VALUE_RTOL and b["module"]["rel_to_max"] <= VALUE_RTOL, b
    assert b["grad_vertices"]["rel_to_max"] <= GRAD_TOL, b


def test_fallbacks_and_vertex_singularity(report):
    assert report["fallback_exact_grad"] == {"equal": True, "has_grad": True}
    assert report["fallback_float64"] == {"equal": True, "dtype": "torch.float64"}
    r = report["on_vertex"]
    for key in ("values", "grad_points", "grad_vertices"):
        assert r[key]["finite"] and r[key]["rel_to_max"] <= GRAD_TOL, (key, r[key])


# ----------------------------------------------------------------------------------------------------
# in-process: backend selection, errors, import without triton, compilation for sm_90
# ----------------------------------------------------------------------------------------------------

def _small():
    from nnunet_topo.occupancy import winding_number  # noqa: F401
    v, f = _meshes(1)
    return _points("uniform", 7, 0)[:1].float(), v[:1], f


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs under the Triton interpreter")
    from nnunet_topo.occupancy import occupancy, winding_number
    from occupancy_bce_module import OccupancyBCELoss
    p, v, f = _small()
    for method in ("dipole", "exact"):
        with pytest.raises(ValueError, match="backend='triton'.*(CUDA|Triton is not importable)"):
            winding_number(p, v, f, method=method, backend="triton")
    with pytest.raises(ValueError, match="backend='triton'"):
        occupancy(p, v, f, backend="triton")
    monkeypatch.setenv("NNUNET_TOPO_OCCUPANCY_BACKEND", "triton")
    with pytest.raises(ValueError, match="backend='triton'"):
        winding_number(p, v, f)
    with pytest.raises(ValueError, match="backend must be one of"):
        winding_number(p, v, f, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        OccupancyBCELoss(backend="fast")


def test_default_is_torch_and_auto_picks_torch_on_cpu(monkeypatch):
    import nnunet_topo.occupancy as occ
    assert occ.DEFAULT_BACKEND == "torch"
    monkeypatch.delenv(occ.BACKEND_ENV_VAR, raising=False)
    cpu = torch.device("cpu")
    assert occ._resolve_backend(None, cpu) == "torch"
    assert occ._resolve_backend("auto", cpu) == "torch"
    assert occ._resolve_backend("torch", cpu) == "torch"
    monkeypatch.setenv(occ.BACKEND_ENV_VAR, "auto")
    assert occ._resolve_backend(None, cpu) == "torch"
    monkeypatch.setenv(occ.BACKEND_ENV_VAR, "gpu")
    with pytest.raises(ValueError, match="NNUNET_TOPO_OCCUPANCY_BACKEND='gpu'"):
        occ._resolve_backend(None, cpu)
    monkeypatch.delenv(occ.BACKEND_ENV_VAR)

    # "auto" on CPU tensors computes exactly what "torch" computes (the Triton entry points are not called)
    import nnunet_topo.occupancy_triton as ot

    def boom(*args, **kwargs):
        raise AssertionError("Triton called for CPU tensors with backend='auto'")

    monkeypatch.setattr(ot, "dipole_winding", boom)
    monkeypatch.setattr(ot, "exact_winding", boom)
    p, v, f = _small()
    for method, s in (("dipole", 0.2), ("exact", 0.0)):
        assert torch.equal(occ.winding_number(p, v, f, method=method, smoothing=s, backend="auto"),
                           occ.winding_number(p, v, f, method=method, smoothing=s, backend="torch"))
    from occupancy_bce_module import OccupancyBCELoss
    loss = OccupancyBCELoss(method="dipole", smoothing=0.2, backend="auto")
    assert "backend='auto'" in repr(loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_picks_triton_on_cuda_and_matches_torch():  # pragma: no cover - no GPU on the dev machine
    pytest.importorskip("triton")
    import nnunet_topo.occupancy as occ
    assert occ._resolve_backend("auto", torch.device("cuda")) == "triton"
    p, v, f = (x.cuda() for x in _small())
    for method, s in (("dipole", 0.2), ("exact", 0.0)):
        torch.testing.assert_close(occ.winding_number(p, v, f, method=method, smoothing=s, backend="triton"),
                                   occ.winding_number(p, v, f, method=method, smoothing=s, backend="torch"),
                                   rtol=VALUE_RTOL, atol=VALUE_ATOL)


def test_module_imports_without_triton(monkeypatch):
    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "triton", None)               # "import triton" raises ImportError
    path = REPO / "nnunet_topo" / "occupancy_triton.py"
    spec = importlib.util.spec_from_file_location("_occupancy_triton_without_triton", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert not mod.triton_available() and not mod.interpreter_active()
    reason = mod.unavailable_reason(torch.device("cuda"))
    assert reason is not None and "not importable" in reason


def test_kernels_compile_for_sm90(tmp_path):
    """The interpreter compiles nothing: build the kernels for an sm_90 target (PTX and cubin, no GPU
    needed), and check that the default tiles do not spill registers."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs under the Triton interpreter")
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import nnunet_topo.occupancy_triton as ot
    f32, i32 = "*fp32", "i32"
    common = {"B": i32, "N": i32, "V": i32, "V_PER_SPLIT": i32, "sigma2": "fp32", "floor": "fp32",
              "scale": "fp32", "BLOCK_N": "constexpr", "BLOCK_V": "constexpr"}
    common_v = {("N_PER_SPLIT" if k == "V_PER_SPLIT" else k): t for k, t in common.items()}
    blocks = {"BLOCK_N": ot.DIPOLE_BLOCK_N, "BLOCK_V": ot.DIPOLE_BLOCK_V}
    kernels = [
        (ot._dipole_forward_kernel, {"p_ptr": f32, "v_ptr": f32, "m_ptr": f32, "w_ptr": f32, **common}, blocks),
        (ot._dipole_backward_points_kernel,
         {"p_ptr": f32, "v_ptr": f32, "m_ptr": f32, "g_ptr": f32, "gp_ptr": f32, **common}, blocks),
        (ot._dipole_backward_vertices_kernel,
         {"p_ptr": f32, "v_ptr": f32, "m_ptr": f32, "g_ptr": f32, "gv_ptr": f32, "gm_ptr": f32, **common_v}, blocks),
        (ot._exact_forward_kernel,
         {"p_ptr": f32, "v_ptr": f32, "f_ptr": "*i32", "radius_ptr": f32, "w_ptr": f32, "B": i32, "N": i32,
          "V": i32, "F": i32, "F_PER_SPLIT": i32, "tol_factor": "fp32", "tiny": "fp32", "scale": "fp32",
          "BLOCK_N": "constexpr", "BLOCK_F": "constexpr"},
         {"BLOCK_N": ot.EXACT_BLOCK_N, "BLOCK_F": ot.EXACT_BLOCK_F}),
    ]
    for fn, signature, constexprs in kernels:
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", 90, 32), options={"num_warps": ot.NUM_WARPS})
        except (FileNotFoundError, RuntimeError) as err:  # no bundled ptxas / no NVIDIA backend
            if "ptxas" in str(err) or "backend" in str(err).lower():
                pytest.skip(f"cannot build for sm_90 here: {err}")
            raise
        assert compiled.asm.get("cubin"), fn.__name__
        # The default tiles must not spill registers (ptxas -v on the generated PTX).
        ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
        if ptxas.exists():
            ptx = tmp_path / f"{fn.__name__}.ptx"
            ptx.write_text(compiled.asm["ptx"])
            out = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", str(tmp_path / "k.cubin")],
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr
            assert "0 bytes spill stores" in out.stderr, (fn.__name__, out.stderr)


if __name__ == "__main__":
    print(json.dumps(_interpreter_report()))
    sys.exit(0)
