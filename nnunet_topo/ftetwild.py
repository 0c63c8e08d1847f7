"""fTetWild, run safely: a tetrahedral mesh of the volume a closed triangle surface encloses (issue 25 item 3).

fTetWild (Hu, Schneider, Wang, Zorin, Panozzo: *Fast Tetrahedral Meshing in the Wild*, SIGGRAPH 2020) through
pytetwild (both MPL-2.0), with three guards around it:

* **no PyVista**: pytetwild 0.4.2's ``import pytetwild`` imports its PyVista accessor, and with it PyVista (and VTK),
  although PyVista is only an optional extra; :func:`_pytetwild` imports it without (an empty stand-in module for
  the duration of the import, removed at once; the accessor then registers nothing, as on old PyVista versions);
* **no litter**: fTetWild writes a debug file ``__tracked_surface.stl`` into the working directory on every call;
* **no crash**: fTetWild has known segfaults on some inputs (fTetWild issue 75).

So :func:`tetrahedralize` runs it in a child Python process (which imports only numpy and pytetwild) whose working
directory is a private scratch folder; a crash ends the child and becomes an :class:`FTetWildError`.
"""
from __future__ import annotations

import math
import os
import sys
import time
import types
from typing import Optional, Tuple

import numpy as np

__all__ = ["FTetWildError", "DEFAULT_ENVELOPE_FRACTION", "tetrahedralize", "pytetwild_version"]

#: fTetWild's default envelope, relative to the bounding-box diagonal of the input surface
DEFAULT_ENVELOPE_FRACTION = 1e-3


class FTetWildError(ValueError):
    """fTetWild failed, crashed or returned nothing, or a parameter is out of range."""



def _pytetwild() -> types.ModuleType:
    """``import pytetwild``. pytetwild 0.4.2's package ``__init__`` imports its optional PyVista accessor, which does
    ``import pyvista`` unconditionally although PyVista is only an extra (``pytetwild[all]``). Without PyVista, the
    accessor module is imported once against an empty stand-in module (it then registers nothing, as it does on old
    PyVista versions), which is removed again at once; ``tetrahedralize`` itself never uses PyVista."""
    try:
        import pytetwild
        return pytetwild
    except ModuleNotFoundError as e:
        if e.name != "pyvista":
            raise
    for name in [k for k in sys.modules if k == "pytetwild" or k.startswith("pytetwild.")]:
        del sys.modules[name]
    sys.modules["pyvista"] = types.ModuleType("pyvista")
    try:
        import pytetwild
    finally:
        del sys.modules["pyvista"]
    return pytetwild


def pytetwild_version() -> str:
    """The installed pytetwild version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pytetwild")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


def _run_in(scratch: str) -> None:
    """The child's work: ``scratch/in.npz`` -> pytetwild's ``tetrahedralize`` -> ``scratch/out.npz``."""
    d = np.load(os.path.join(scratch, "in.npz"))
    c0 = time.process_time()
    points, tets = _pytetwild().tetrahedralize(
        np.array(d["vertices"], np.float64, order="C"), np.array(d["faces"], np.int32, order="C"),  # writable, C
        edge_length_abs=float(d["edge_mm"]), epsilon=float(d["eps"]), num_threads=int(d["threads"]),
        vtk_ordering=True, quiet=True)
    np.savez(os.path.join(scratch, "out.npz"), points=np.asarray(points, np.float64),
             tets=np.asarray(tets, np.int64), cpu=time.process_time() - c0)


def _in_child(v: np.ndarray, f: np.ndarray, edge_mm: float, eps: float,
              threads: int) -> Tuple[np.ndarray, np.ndarray, float]:
    """:func:`_run_in` in a child Python whose working directory is a new scratch folder: ``(points, tets, CPU
    seconds)``.

    Raises:
        FTetWildError: the child crashed (killed by a signal) or failed (its last line of stderr).
    """
    import subprocess
    import tempfile

    # this package's own folder last on the child's path: found even when not installed, never shadowing anything
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (f"import sys; sys.path.append({package_root!r}); from nnunet_topo.ftetwild import _run_in; "
            "_run_in(sys.argv[1])")
    with tempfile.TemporaryDirectory(prefix="ftetwild_") as scratch:
        np.savez(os.path.join(scratch, "in.npz"), vertices=v, faces=f, edge_mm=edge_mm, eps=eps, threads=threads)
        proc = subprocess.run([sys.executable, "-c", code, scratch], cwd=scratch, capture_output=True, text=True)
        if proc.returncode < 0:
            raise FTetWildError(f"fTetWild crashed (signal {-proc.returncode}); try another edge length or envelope")
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            raise FTetWildError(f"fTetWild failed: {lines[-1] if lines else f'exit code {proc.returncode}'}")
        out = np.load(os.path.join(scratch, "out.npz"))
        return out["points"], out["tets"], float(out["cpu"])


def tetrahedralize(vertices: np.ndarray, faces: np.ndarray, edge_mm: float, envelope_mm: Optional[float] = None,
                   threads: int = 0) -> Tuple[np.ndarray, np.ndarray, float, float]:
    """Tetrahedral mesh of the volume a closed triangle surface encloses (fTetWild through pytetwild).

    Runs in a child Python process whose working directory is a private scratch folder (arrays in and out as
    ``.npz`` files there), so the debug file stays there and a crash ends only the child (module docstring). No
    ``multiprocessing``: callers need no ``if __name__ == "__main__"`` guard.

    Args:
        vertices: ``(V, 3)`` surface vertices, mm.
        faces: ``(F, 3)`` triangles (several closed components are fine: a wall is an outer and an inverted inner
            shell; fTetWild keeps the tetrahedra inside by winding number).
        edge_mm: ideal edge length of the tetrahedra, mm.
        envelope_mm: how far the boundary may move from the input surface, mm; ``None``: fTetWild's default, 1e-3
            of the surface's bounding-box diagonal.
        threads: fTetWild's threads; 0 uses every core.

    Returns:
        ``(points (N, 3) float64, tets (T, 4) int64 VTK order, envelope used in mm, fTetWild's CPU seconds)``.

    Raises:
        FTetWildError: malformed input (shapes, non-finite coordinates, face indices out of range), a non-positive
            edge length or envelope, fTetWild failing or crashing, or an empty result.
    """
    if not (edge_mm > 0 and math.isfinite(edge_mm)):
        raise FTetWildError(f"edge_mm must be a positive number of mm, got {edge_mm}")
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise FTetWildError(f"expected vertices (V, 3) and faces (F >= 1, 3), got {v.shape} and {f.shape}")
    if not np.isfinite(v).all():  # fTetWild meshes around a NaN vertex without a word
        raise FTetWildError("non-finite vertex coordinates")
    if f.min() < 0 or f.max() >= len(v):  # fTetWild segfaults on these
        raise FTetWildError(f"face indices outside 0..{len(v) - 1}")
    diag = float(np.linalg.norm(v.max(axis=0) - v.min(axis=0)))
    if envelope_mm is None:
        eps = DEFAULT_ENVELOPE_FRACTION
    else:
        if not (envelope_mm > 0 and math.isfinite(envelope_mm)):
            raise FTetWildError(f"envelope_mm must be a positive number of mm, got {envelope_mm}")
        eps = float(envelope_mm) / diag
    points, tets, cpu = _in_child(v, f, float(edge_mm), eps, int(threads))
    if len(tets) == 0:
        raise FTetWildError("fTetWild returned no tetrahedra (a surface without volume?)")
    return points, tets, eps * diag, cpu
