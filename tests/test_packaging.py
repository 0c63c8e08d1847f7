"""The installed layout (issue 8): a normal (non-editable) install exposes only ``nnunet_topo``, and nnU-Net's own
trainer lookup finds every trainer through ``nnUNet_extTrainer`` in it. The repository's top-level ``trainers/``
and ``mesh_head/`` are mapped to ``nnunet_topo.trainers`` / ``nnunet_topo.mesh_head`` (setup.cfg ``package_dir``).
"""
import ast
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: repository folder -> its package in the installed tree
PACKAGE_FOLDERS = {"nnunet_topo": "nnunet_topo", "trainers": "nnunet_topo/trainers",
                   "mesh_head": "nnunet_topo/mesh_head"}

pytestmark = pytest.mark.slow


def _trainer_names():
    """Every class defined in trainers/*.py whose name starts with nnUNetTrainer (read with ast, not imported)."""
    names = []
    for f in sorted((REPO / "trainers").glob("*.py")):
        tree = ast.parse(f.read_text())
        names += [n.name for n in tree.body if isinstance(n, ast.ClassDef) and n.name.startswith("nnUNetTrainer")]
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "--disable-pip-version-check",
                    "-w", str(out), str(REPO)], check=True, capture_output=True, text=True, timeout=900)
    wheels = list(out.glob("nnunet_topo-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def target(wheel, tmp_path_factory):
    d = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--disable-pip-version-check",
                    "--target", str(d), str(wheel)], check=True, capture_output=True, text=True, timeout=900)
    return d


def test_wheel_has_only_the_nnunet_topo_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"nnunet_topo"}, sorted(top)
    assert len(dist_info) == 1 and next(iter(dist_info)).startswith("nnunet_topo-")
    # every source file of the three package folders is in the wheel, at its mapped place
    for folder, package in PACKAGE_FOLDERS.items():
        for f in (REPO / folder).rglob("*.py"):
            rel = f.relative_to(REPO / folder).as_posix()
            assert f"{package}/{rel}" in names, f"{folder}/{rel} is missing from the wheel"


def test_non_editable_install_finds_every_trainer_through_nnunet(target, tmp_path):
    trainers = _trainer_names()
    assert {"nnUNetTrainerTopoBase", "nnUNetTrainerTPM", "nnUNetTrainerMIE", "nnUNetTrainerBetti"} <= set(trainers)
    script = f"""
import contextlib, importlib.util, io, json, os, sys
import nnunet_topo
from nnunet_topo.cli.trainer_path import trainer_path_entry
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    trainer_path_entry(["--only"])
path = buf.getvalue().strip()
os.environ["nnUNet_extTrainer"] = path
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
found = {{}}
for name in {trainers!r}:
    with contextlib.redirect_stdout(io.StringIO()):
        cls = recursive_find_trainer_class_by_name(name)
    found[name] = [cls.__name__, sys.modules[cls.__module__].__file__ if cls.__module__ in sys.modules else None]
print(json.dumps({{"package": nnunet_topo.__file__, "path": path, "found": found,
                  "trainers_top_level": importlib.util.find_spec("trainers") is not None,
                  "mesh_head_top_level": importlib.util.find_spec("mesh_head") is not None}}))
"""
    env = dict(os.environ, PYTHONPATH=str(target), nnUNet_raw=str(tmp_path), nnUNet_preprocessed=str(tmp_path),
               nnUNet_results=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=str(tmp_path), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["package"].startswith(str(target)), r["package"]  # the installed copy, not the repository
    assert r["path"] == os.path.join(str(target), "nnunet_topo", "trainers")
    assert not r["trainers_top_level"] and not r["mesh_head_top_level"]
    for name, (cls_name, _) in r["found"].items():
        assert cls_name == name


def test_trainer_files_are_thin():
    """Trainer files hold nnU-Net wiring only (issue 8: about 200 lines at most; the largest, nnUNetTrainerMesh,
    carries the template/plans wiring); the library and mesh_head hold the rest."""
    sizes = {f.name: len(f.read_text().splitlines()) for f in (REPO / "trainers").glob("*.py")}
    assert max(sizes.values()) <= 230, sizes
