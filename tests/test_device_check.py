"""benchmarks/device_check.sh --dry-run: every step of the GPU device check passes on the CPU at tiny sizes.

The check itself is meant for one run on a rented GPU machine; this test proves it beforehand (same steps, same
output files, ``-device cpu``). The parsers of the benchmark scripts' printed tables are tested on their own.
"""
import importlib.util
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "device_check.sh"


def _module():
    spec = importlib.util.spec_from_file_location("device_check", REPO / "benchmarks" / "device_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_parsers_read_the_printed_tables():
    dc = _module()
    speed = dc.parse_trainer_speed(
        "device: NVIDIA H200; torch 2.14\n"
        "dataset 979, 3d_fullres, plans nnUNetPlansWholeVolume, patch [12, 64, 64], batch 2, 10 iterations x 3 rounds\n"
        "trainer                         ms/iter (median)  ratio (median of rounds)        min..max\n"
        "nnUNetTrainer                               31.5                     1.000   1.000..1.000\n"
        "nnUNetTrainerTPM                           120.0                     3.810   3.500..4.100\n")
    assert speed["device"].startswith("NVIDIA H200") and speed["patch"] == [12, 64, 64] and speed["batch"] == 2
    assert [r["trainer"] for r in speed["rows"]] == ["nnUNetTrainer", "nnUNetTrainerTPM"]
    assert speed["rows"][1]["ratio"] == pytest.approx(3.81) and speed["rows"][1]["ratio_max"] == pytest.approx(4.1)

    occ = dc.parse_occupancy(
        "machine: x; device cuda: NVIDIA H200\n"
        "method     points      pairs  chunk_size      pass         ms  Mpairs/s  peak MiB\n"
        "exact      100000   5.12e+08     4194304       fwd       12.5   40960.0       310\n"
        "dipole     100000   2.56e+08     4194304   fwd+bwd       30.1    8505.0       620\n")
    assert [(r["method"], r["pass"], r["peak_MiB"]) for r in occ["rows"]] == [("exact", "fwd", 310),
                                                                            ("dipole", "fwd+bwd", 620)]
    # a backend column (bench_occupancy.py --backends) is read by name, wherever it is
    occ = dc.parse_occupancy(
        "backend method     points      pairs  chunk_size      pass         ms  Mpairs/s\n"
        "torch   exact         500   4.00e+04     4194304       fwd       72.4       0.6\n"
        "triton  dipole        500   2.10e+04           -   fwd+bwd      851.7       0.0\n"
        "\n"
        "torch vs triton (torch: fastest chunk size; ratio = torch / triton, > 1 means Triton is faster)\n"
        "form:pass        n_points   torch_ms  triton_ms   ratio    max|dw|   grad_rel\n"
        "exact:fwd             500      72.39    1433.65    0.05    2.4e-07          -\n"
        "dipole:fwd+bwd        500      72.78     851.68    0.09    3.6e-07    4.0e-07\n")
    assert [(r["backend"], r["chunk_size"], r["ms"]) for r in occ["rows"]] == [("torch", 4194304, 72.4),
                                                                             ("triton", "-", 851.7)]
    assert [(r["form:pass"], r["ratio"], r["grad_rel"]) for r in occ["comparison"]] == [
        ("exact:fwd", 0.05, "-"), ("dipole:fwd+bwd", 0.09, 4.0e-07)]


def test_step_selection_brings_requirements():
    dc = _module()
    assert dc.DeviceCheck._select(["evaluate"]) == [
        "machine", "prepare", "smoke:nnUNetTrainerTPM", "predict", "predict_meshes", "evaluate"]
    assert dc.DeviceCheck._select(["occupancy"]) == ["machine", "occupancy"]


def test_markdown_of_a_partial_run_keeps_every_row():
    dc = _module()
    res = {"mode": "gpu", "device": "cuda", "gpu_name": "NVIDIA H200", "started": "2026-12-02T10:00:00+00:00",
           "finished": None, "elapsed_s": 12.0, "settings": {"iterations": 3, "parallel": 3}, "git": {},
           "steps": {n: {"status": "pending", "seconds": None} for n in dc.STEP_ORDER}}
    res["steps"]["smoke:nnUNetTrainerMIE"].update(status="failed", seconds=3.0, error="exit code 1",
                                                 stderr_tail="Traceback ...\nRuntimeError: CUDA | oops")
    md = dc.render_markdown(res)
    assert md.startswith("## GPU: NVIDIA H200\n") and "unfinished" in md
    assert "| nnUNetTrainerMIE | nnUNetPlansWholeVolume | failed | 3.0 |" in md and "CUDA \\| oops" in md


@pytest.mark.slow
def test_dry_run_passes_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), str(out), "--dry-run"], capture_output=True, text=True,
                          timeout=900, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seconds = time.monotonic() - t0
    assert (out / "device_check.json").is_file() and (out / "device_check.md").is_file(), proc.stderr[-3000:]
    res = json.loads((out / "device_check.json").read_text())
    dc = _module()
    assert res["mode"] == "dry_run" and res["gpu_name"] == "CPU (dry run)" and res["finished"]
    assert list(res["steps"]) == dc.STEP_ORDER
    bad = {n: (s["status"], s.get("error"), (s.get("stderr_tail") or "")[-1500:])
           for n, s in res["steps"].items() if s["status"] != "ok"}
    assert not bad, json.dumps(bad, indent=1)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert all(isinstance(s["seconds"], float) for s in res["steps"].values())

    md = (out / "device_check.md").read_text()
    assert md.startswith("## GPU: CPU (dry run)\n")
    for trainer, _, plans in dc.SMOKE_TRAINERS:
        assert f"| {trainer} | {plans} | ok |" in md
    speed = res["steps"]["trainer_speed"]["rows"]
    assert [r["trainer"] for r in speed] == ["nnUNetTrainer"] + dc.MODES["dry"]["speed_trainers"]
    for r in speed:
        assert f"| {r['trainer']} | {r['ms_per_iter']:.1f} |" in md
    occ = res["steps"]["occupancy"]["rows"]
    assert {(r["method"], r["pass"]) for r in occ} == {(m, p) for m in ("exact", "dipole") for p in ("fwd", "fwd+bwd")}
    if res["steps"]["occupancy"]["backends_option"]:  # bench_occupancy.py --backends: triton under its interpreter
        assert any(r["backend"] == "triton" for r in occ) and res["steps"]["occupancy"]["comparison"]
    betti = res["steps"]["betti_cost"]["rows"]
    assert betti and all(r["ms_per_step"] > 0 for r in betti)
    assert res["steps"]["predict"]["cases"] == 2 and res["steps"]["predict_meshes"]["mesh_files"] == 6
    # the scratch folder is gone, the logs stay
    assert not (out / "work").exists() and any((out / "logs").iterdir())
    print(f"dry run: {seconds:.0f} s")  # shown with pytest -s
    assert seconds < 600, f"the dry run took {seconds:.0f} s"
