import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def nnunet_cli(name: str) -> str:
    """Absolute path of a console script installed beside the running interpreter."""
    path = BIN / name
    if not path.exists():
        raise RuntimeError(f"console script {name} not found in {BIN}; run scripts/setup_env.sh")
    return str(path)


def run_cli(args, env, timeout=1200, check=True):
    """Run a real command-line tool, echo its output on failure."""
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed with {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def nnunet_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    dirs = {k: root / k for k in ("raw", "preprocessed", "results", "ext_trainers")}
    for d in dirs.values():
        d.mkdir()
    return dirs


def integration_env(dirs) -> dict:
    """The environment of the CLI integration tests: the session's nnU-Net folders, one data-augmentation worker,
    no torch.compile, and nnunet-topo's trainers plus the tests' short-run trainers (``dirs["ext_trainers"]``)."""
    from nnunet_topo.trainers import TRAINER_DIR

    e = dict(os.environ)
    e.update(nnUNet_raw=str(dirs["raw"]), nnUNet_preprocessed=str(dirs["preprocessed"]),
             nnUNet_results=str(dirs["results"]), nnUNet_n_proc_DA="1", nnUNet_def_n_proc="1",
             nnUNet_extTrainer=os.pathsep.join([TRAINER_DIR, str(dirs["ext_trainers"])]))
    return e
