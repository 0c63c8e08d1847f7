"""One prepared device check for a rented GPU machine (run it once; prove it on a CPU first with ``--dry-run``).

Usage::

    bash benchmarks/device_check.sh OUT_DIR             # on the GPU machine (<= 8 min, nothing is downloaded)
    bash benchmarks/device_check.sh OUT_DIR --dry-run   # the same steps on the CPU at tiny sizes (a few minutes)
    python benchmarks/device_check.py OUT_DIR [--dry-run] [--steps occupancy betti_cost] [--budget_s 470]

Writes ``OUT_DIR/device_check.json`` (every step: status, seconds, parsed numbers, the tail of stderr or of the
traceback on failure) and ``OUT_DIR/device_check.md`` (a heading ``## GPU: <name>`` and markdown tables to paste
into documentation/benchmarks.md) after *every* step, so a run that is killed keeps what it measured.
Logs of every subprocess go to ``OUT_DIR/logs/``; the scratch folder ``OUT_DIR/work/`` (synthetic dataset,
preprocessed data, checkpoints, compile caches) is removed at the end unless ``--keep_work``.

Steps (each in its own subprocess with its own timeout, capped by what is left of ``--budget_s``; a failing step
is recorded and the later steps still run; steps whose input failed are marked ``skipped``):

* ``machine``: torch / CUDA / nnU-Net versions and the GPU name (``torch.cuda.get_device_name()``).
* ``prepare``: a synthetic ACDC-like dataset (``nnUNetv2_topo_make_synthetic``, copies of its test images as
  ``imagesUnlabelled`` for nnUNetTrainerBettiSemi), ``nnUNetv2_plan_and_preprocess -c 3d_fullres``, the whole-volume
  plans of the mesh trainers (``nnUNetv2_topo_plan_whole_volume``) and nnU-Net's own 5-fold split (written once
  here, so that trainers running side by side do not race to create it).
* ``occupancy``: ``benchmarks/bench_occupancy.py`` (exact and dipole, forward and forward+backward, 10k/100k
  points x 1280/5120 faces; ``--backends torch triton`` if the script has that option when this runs).
* ``betti_cost``: ``BettiPriorLoss`` forward+backward with nnUNetTrainerBetti's defaults (``betti_factor()``,
  ``betti_workers()``, ``betti_every``) on a softmax of the planned patch and batch size on the device (the
  persistence runs on the CPU, as in training), plus two reference patches of real datasets.
* ``smoke:<trainer>``: the real ``nnUNetv2_train DATASET 3d_fullres 0 -tr <trainer>_devcheck -device cuda``
  (1 epoch, 3 iterations, 1 validation iteration, nnU-Net's final validation) for every trainer of trainers/ a
  user would run; torch.compile and autocast as nnU-Net sets them (``nnUNet_compile`` is left unset). The short
  subclasses are written to an extra ``nnUNet_extTrainer`` folder. Several trainers run side by side
  (``--parallel``): these are smoke runs, their seconds are wall times, not benchmarks.
* ``predict``, ``predict_meshes``, ``evaluate``: ``nnUNetv2_predict`` and ``nnUNetv2_topo_predict_meshes`` with the
  nnUNetTrainerTPM smoke model on 2 test cases, ``nnUNetv2_topo_evaluate_folder`` on the predicted segmentations
  (without ``--mesh_folder``: the mesh metrics run on the CPU only, ~35 s per case on 2 cores even for these tiny
  volumes (mesh TVS on a 1 mm grid), and the CPU tests cover them).
* ``trainer_speed``: ``benchmarks/bench_trainer_speed.py --device cuda --whole_volume`` (every trainer on the
  whole-volume plans, nnUNetTrainer included; ``topology_start_epoch=0`` so that the topology terms themselves,
  L_TPM included, are timed rather than the first phase of the schedule, which is plain nnU-Net); its printed
  table is parsed (the script has no machine-readable output).

``--dry-run``: the same steps on the CPU (``-device cpu``) at tiny sizes (dataset 8 x 32 x 32, 1 iteration,
occupancy 500 points x 80 faces, bench_trainer_speed on two trainers with one iteration); the output files have
the same structure. Exit code 0 when every selected step is ``ok``, else 1.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
RESULT_PREFIX = "DEVICE_CHECK_RESULT: "
SCHEMA = 1
DATASET_ID = 979
CONFIG = "3d_fullres"
PLANS = "nnUNetPlans"
WV_PLANS = "nnUNetPlansWholeVolume"
SUFFIX = "_devcheck"
WORK_MARKER = ".device_check_work"
TAIL_LINES = 25
TAIL_CHARS = 4000

#: (trainer a user runs, module in nnunet_topo.trainers, plans). BettiSemi needs every unlabelled case inside the
#: patch, the mesh trainers whole structures: they get the whole-volume plans.
SMOKE_TRAINERS = [
    ("nnUNetTrainerProjPool", "nnUNetTrainerProjPool", PLANS),
    ("nnUNetTrainerTPM", "nnUNetTrainerTPM", WV_PLANS),  # early: predict / meshes / evaluate follow it
    ("nnUNetTrainerBetti", "nnUNetTrainerBetti", PLANS),
    ("nnUNetTrainerMesh", "nnUNetTrainerMesh", WV_PLANS),
    ("nnUNetTrainerBettiSemi", "nnUNetTrainerBetti", WV_PLANS),
    ("nnUNetTrainerMIE", "nnUNetTrainerMIE", WV_PLANS),
]
PREDICT_TRAINER = "nnUNetTrainerTPM"
MESH_TRAINERS = ("nnUNetTrainerMesh", "nnUNetTrainerTPM", "nnUNetTrainerMIE")

#: sizes and timeouts (seconds) of the two modes
MODES: Dict[str, Dict[str, Any]] = {
    "gpu": dict(
        device="cuda", shape=None, num_training=6, num_test=2, iterations=3, plan_np=4, n_proc_da="4",
        def_n_proc="4", parallel=3, budget_s=470,
        occ_points=[10_000, 100_000], occ_faces=[1280, 5120], occ_repeats=5, occ_backends=["torch", "triton"],
        betti_repeats=3, betti_reference_patches=[[10, 256, 224], [128, 128, 128]], betti_reference_batch=2,
        speed_trainers=["nnUNetTrainerProjPool", "nnUNetTrainerBetti", "nnUNetTrainerMesh", "nnUNetTrainerTPM",
                        "nnUNetTrainerMIE"],
        speed_iters=10, speed_rounds=3, speed_warmup=3,
        trainer_overrides={"topology_start_epoch": 0},
        timeouts=dict(machine=60, prepare=150, occupancy=90, betti_cost=90, sync_step=60, smoke=180, predict=90,
                      predict_meshes=90, evaluate=60, trainer_speed=240),
    ),
    "dry": dict(
        device="cpu", shape=[8, 32, 32], num_training=6, num_test=2, iterations=1, plan_np=1, n_proc_da="0",
        def_n_proc="1", parallel=2, budget_s=1500,
        # triton runs under TRITON_INTERPRET=1 on the CPU (a smoke test of that path, no speed)
        occ_points=[500], occ_faces=[80], occ_repeats=1, occ_backends=["torch", "triton"],
        betti_repeats=1, betti_reference_patches=[], betti_reference_batch=2,
        speed_trainers=["nnUNetTrainerProjPool", "nnUNetTrainerMesh"],
        speed_iters=1, speed_rounds=1, speed_warmup=1,
        # fewer occupancy / critical / MIE points keep a CPU iteration of the mesh trainers short
        trainer_overrides={"topology_start_epoch": 0, "occ_num_uniform": 128, "occ_num_surface": 128,
                           "max_critical_points": 128, "mie_num_points": 256},
        timeouts=dict(machine=120, prepare=400, occupancy=200, betti_cost=200, sync_step=120, smoke=400, predict=200,
                      predict_meshes=200, evaluate=200, trainer_speed=400),
    ),
}

#: a step does not start with less than this left of the budget (it would only be killed)
MIN_START_S = {"smoke": 30, "trainer_speed": 45}

STEP_ORDER = ["machine", "prepare", "occupancy", "betti_cost", "sync_step"] + [f"smoke:{t}" for t, _, _ in SMOKE_TRAINERS] + \
    ["predict", "predict_meshes", "evaluate", "trainer_speed"]
#: what a step needs (a step whose requirement did not end ``ok`` is skipped)
REQUIRES = {"betti_cost": ["prepare"], "trainer_speed": ["prepare"], "predict": [f"smoke:{PREDICT_TRAINER}"],
            "predict_meshes": [f"smoke:{PREDICT_TRAINER}"], "evaluate": ["predict", "predict_meshes"],
            **{f"smoke:{t}": ["prepare"] for t, _, _ in SMOKE_TRAINERS}}
STEP_GROUPS = {"smoke": [s for s in STEP_ORDER if s.startswith("smoke:")] + ["predict", "predict_meshes", "evaluate"]}


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def tail(text: str, lines: int = TAIL_LINES, chars: int = TAIL_CHARS) -> str:
    t = "\n".join((text or "").rstrip().splitlines()[-lines:])
    return t[-chars:]


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def console_script(name: str) -> List[str]:
    """``[python, -c, ...]`` that runs an installed console script through its entry point (not its shebang,
    which names the interpreter path of the machine that installed it)."""
    from importlib.metadata import entry_points

    eps = list(entry_points(group="console_scripts", name=name))
    if not eps:
        raise RuntimeError(f"console script {name} is not installed in {sys.executable}'s environment")
    mod, _, func = eps[0].value.partition(":")
    code = f"import sys; sys.argv[0] = {name!r}; from {mod} import {func.strip()} as _f; sys.exit(_f())"
    return [sys.executable, "-c", code]


def parse_result_line(stdout: str) -> Optional[dict]:
    for line in reversed((stdout or "").splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return None


class StepFailed(Exception):
    """A step failed with a message and (optionally) the tail of a subprocess's output."""

    def __init__(self, message: str, stderr_tail: str = "", timed_out: bool = False):
        super().__init__(message)
        self.stderr_tail = stderr_tail
        self.timed_out = timed_out


# ================================================================================================ parsers
def parse_trainer_speed(stdout: str) -> dict:
    """The table of bench_trainer_speed.py: ``{"device", "setup", "patch", "batch", "rows": [...]}``."""
    out: Dict[str, Any] = {"rows": []}
    row = re.compile(r"^(\S+)\s+([-+\d.eE]+|nan)\s+([-+\d.eE]+|nan)\s+([-+\d.eE]+|nan)\.\.([-+\d.eE]+|nan)\s*$")
    for line in stdout.splitlines():
        line = line.rstrip()
        if line.startswith("device:"):
            out["device"] = line[len("device:"):].strip()
        elif line.startswith("dataset "):
            out["setup"] = line.strip()
            m = re.search(r"patch \[([^\]]*)\]", line)
            if m:
                out["patch"] = [int(v) for v in re.findall(r"\d+", m.group(1))]
            m = re.search(r"batch (\d+)", line)
            if m:
                out["batch"] = int(m.group(1))
        else:
            m = row.match(line)
            if m and not line.startswith("trainer"):
                out["rows"].append({"trainer": m.group(1), "ms_per_iter": float(m.group(2)),
                                    "ratio": float(m.group(3)), "ratio_min": float(m.group(4)),
                                    "ratio_max": float(m.group(5))})
    return out


def _value(v: str) -> Any:
    try:
        return int(v) if re.fullmatch(r"-?\d+", v) else float(v)
    except ValueError:
        return v


def parse_occupancy(stdout: str) -> dict:
    """The tables of bench_occupancy.py, whatever their columns: ``rows`` (one per backend, method, points, chunk
    size and pass: the lines with as many fields as the header and a method name among them) and, with
    ``--backends torch triton``, ``comparison`` (torch vs triton: ratio and largest differences)."""
    out: Dict[str, Any] = {"rows": [], "header": None, "comparison": []}
    header: Optional[List[str]] = None
    kind = None
    for line in stdout.splitlines():
        if line.startswith("machine:"):
            out["machine"] = line[len("machine:"):].strip()
        elif line.startswith("mesh:"):
            out["mesh"] = line[len("mesh:"):].strip()
        fields = line.split()
        if not fields:
            continue
        if "method" in fields and "points" in fields:
            header, kind = re.sub(r"peak MiB", "peak_MiB", line).split(), "rows"
            out["header"] = header
        elif fields[0] == "form:pass":
            header, kind = fields, "comparison"
        elif header and len(fields) == len(header):
            rec = {k: _value(v) for k, v in zip(header, fields)}
            if kind == "rows" and ("exact" in fields or "dipole" in fields):
                out["rows"].append(rec)
            elif kind == "comparison" and re.match(r"(exact|dipole):", fields[0]):
                out["comparison"].append(rec)
    return out


# ================================================================================================ the check
class DeviceCheck:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.mode = "dry" if args.dry_run else "gpu"
        self.cfg = dict(MODES[self.mode])
        if args.parallel is not None:
            self.cfg["parallel"] = args.parallel
        self.device = self.cfg["device"]
        self.out = os.path.abspath(args.out_dir)
        self.work = os.path.abspath(args.work_dir) if args.work_dir else os.path.join(self.out, "work")
        self.logs = os.path.join(self.out, "logs")
        self.json_path = os.path.join(self.out, "device_check.json")
        self.md_path = os.path.join(self.out, "device_check.md")
        self.budget_s = float(args.budget_s if args.budget_s is not None else self.cfg["budget_s"])
        self.t0 = time.monotonic()
        self.lock = threading.RLock()
        self.procs: Dict[int, subprocess.Popen] = {}
        self.stopping = False
        self.selected = self._select(args.steps)
        self.results: Dict[str, Any] = {
            "schema": SCHEMA, "mode": "dry_run" if args.dry_run else "gpu", "device": self.device,
            "gpu_name": "CPU (dry run)" if args.dry_run else None, "started": _now(), "finished": None,
            "elapsed_s": 0.0, "budget_s": self.budget_s, "command": [sys.executable] + sys.argv,
            "repo": REPO, "git": self._git(), "settings": {k: v for k, v in self.cfg.items() if k != "timeouts"},
            "timeouts_s": self.cfg["timeouts"], "environment": {},
            "steps": {name: {"status": "pending" if name in self.selected else "not selected", "seconds": None}
                      for name in STEP_ORDER},
        }

    # -------------------------------------------------------------------------------------------- plumbing
    @staticmethod
    def _select(steps: Optional[Sequence[str]]) -> List[str]:
        if not steps:
            return list(STEP_ORDER)
        want = set()
        for s in steps:
            if s in STEP_GROUPS:
                want.update(STEP_GROUPS[s])
            elif s in STEP_ORDER:
                want.add(s)
            else:
                raise SystemExit(f"unknown step {s!r}; steps: {', '.join(STEP_ORDER)} (or the group 'smoke')")
        todo = list(want)
        while todo:  # requirements come along
            for r in REQUIRES.get(todo.pop(), []):
                if r not in want:
                    want.add(r)
                    todo.append(r)
        want.add("machine")
        return [s for s in STEP_ORDER if s in want]

    @staticmethod
    def _git() -> dict:
        info: Dict[str, Any] = {}
        try:
            info["commit"] = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True,
                                            timeout=10).stdout.strip() or None
            st = subprocess.run(["git", "-C", REPO, "status", "--porcelain"], capture_output=True, text=True,
                                timeout=10)
            info["changed_files"] = len(st.stdout.splitlines()) if st.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            info["commit"] = None
        return info

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def remaining(self) -> float:
        return self.budget_s - self.elapsed()

    def flush(self) -> None:
        with self.lock:
            self.results["elapsed_s"] = round(self.elapsed(), 1)
            os.makedirs(self.out, exist_ok=True)
            tmp = self.json_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.results, f, indent=2, default=str)
            os.replace(tmp, self.json_path)
            try:
                md = render_markdown(self.results)
            except Exception:  # noqa: BLE001 - the JSON above is what counts; never lose a run to the markdown
                md = f"## GPU: {self.results.get('gpu_name')}\n\nmarkdown failed:\n\n```\n{traceback.format_exc()}```\n"
            tmp = self.md_path + ".tmp"
            with open(tmp, "w") as f:
                f.write(md)
            os.replace(tmp, self.md_path)

    def step(self, name: str) -> dict:
        return self.results["steps"][name]

    def run_step(self, name: str, fn: Callable[[dict], Optional[dict]]) -> bool:
        """Run one step: time it, record its result or its failure, flush. Returns whether it ended ``ok``."""
        rec = self.step(name)
        if name not in self.selected:
            return False
        missing = [r for r in REQUIRES.get(name, []) if self.step(r)["status"] != "ok"]
        if self.stopping:
            rec.update(status="skipped", note="the check was interrupted")
        elif missing:
            rec.update(status="skipped", note=f"needs {', '.join(missing)} (not ok)")
        elif self.remaining() < MIN_START_S.get(name.split(":")[0], 5):
            rec.update(status="skipped", note=f"time budget of {self.budget_s:.0f} s used up "
                                              f"({max(0.0, self.remaining()):.0f} s left)")
        else:
            with self.lock:
                rec.update(status="running", started=_now())
            self.flush()
            t0 = time.monotonic()
            try:
                details = fn(rec) or {}
                with self.lock:
                    rec.update(details)
                    rec["status"] = "ok"
            except StepFailed as e:
                with self.lock:
                    rec.update(status="timeout" if e.timed_out else "failed", error=str(e), stderr_tail=e.stderr_tail)
            except Exception as e:  # noqa: BLE001 - a failing step must not stop the others
                with self.lock:
                    rec.update(status="failed", error=f"{type(e).__name__}: {e}",
                               stderr_tail=tail(traceback.format_exc()))
            rec["seconds"] = round(time.monotonic() - t0, 1)
        self.flush()
        return rec["status"] == "ok"

    def timeout(self, key: str) -> float:
        return max(1.0, min(float(self.cfg["timeouts"][key]), self.remaining()))

    def run_proc(self, log_name: str, argv: List[str], timeout: float, env: Optional[dict] = None) -> str:
        """Run a subprocess in its own process group (so a timeout kills its workers too), its output into
        ``logs/<log_name>.out|.err``; returns stdout, raises StepFailed on a non-zero exit or a timeout."""
        if self.stopping:
            raise StepFailed("the check was interrupted")
        os.makedirs(self.logs, exist_ok=True)
        base = os.path.join(self.logs, re.sub(r"[^A-Za-z0-9_.-]+", "_", log_name))
        with open(base + ".out", "w") as fo, open(base + ".err", "w") as fe:
            fo.write(f"$ {' '.join(argv)}\n")
            fo.flush()
            p = subprocess.Popen(argv, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, cwd=REPO,
                                 env=env if env is not None else self.env, start_new_session=True)
            with self.lock:
                self.procs[p.pid] = p
            try:
                rc = p.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                _kill_group(p)
                rc, timed_out = None, True
            finally:
                _kill_group(p, only_leftovers=True)  # workers that outlive their parent (DA, compile pools)
                with self.lock:
                    self.procs.pop(p.pid, None)
        out, err = _read(base + ".out"), _read(base + ".err")
        if timed_out:
            raise StepFailed(f"{log_name}: timed out after {timeout:.0f} s", tail(err) or tail(out), timed_out=True)
        if rc != 0:
            raise StepFailed(f"{log_name}: exit code {rc}", tail(err) or tail(out))
        return out

    def stop(self, signum=None, frame=None) -> None:
        """SIGTERM/SIGINT: kill the running subprocesses, mark what ran as interrupted, write the files."""
        self.stopping = True
        with self.lock:
            procs = list(self.procs.values())
        for p in procs:
            _kill_group(p)
        with self.lock:
            for rec in self.results["steps"].values():
                if rec["status"] in ("running", "pending"):
                    rec.update(status="interrupted" if rec["status"] == "running" else "skipped",
                               note=f"signal {signum}")
            self.results["finished"] = _now()
            self.results["interrupted"] = True
        self.flush()
        self.cleanup()
        os._exit(1)

    # -------------------------------------------------------------------------------------------- environment
    def setup(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        if os.path.exists(self.work):
            if not os.path.isfile(os.path.join(self.work, WORK_MARKER)) and os.listdir(self.work):
                raise SystemExit(f"{self.work} exists and was not made by this script; choose another OUT_DIR or "
                                 "--work_dir")
            shutil.rmtree(self.work)
        if os.path.isdir(self.logs):
            shutil.rmtree(self.logs)
        self.dirs = {k: os.path.join(self.work, k) for k in ("raw", "preprocessed", "results", "ext_trainers", "tmp")}
        for d in self.dirs.values():
            os.makedirs(d)
        with open(os.path.join(self.work, WORK_MARKER), "w") as f:
            f.write("scratch folder of benchmarks/device_check.py; removed at its end\n")
        from nnunet_topo.trainers import TRAINER_DIR

        env = dict(os.environ)
        removed = env.pop("nnUNet_compile", None)  # nnU-Net's default (compile on CUDA) is what is checked
        env.update(nnUNet_raw=self.dirs["raw"], nnUNet_preprocessed=self.dirs["preprocessed"],
                   nnUNet_results=self.dirs["results"],
                   nnUNet_extTrainer=os.pathsep.join([TRAINER_DIR, self.dirs["ext_trainers"]]),
                   nnUNet_n_proc_DA=self.cfg["n_proc_da"], nnUNet_def_n_proc=self.cfg["def_n_proc"],
                   TMPDIR=self.dirs["tmp"], PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        if self.mode == "dry":
            env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run must not touch a GPU even where there is one
        self.env = env
        keys = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer", "nnUNet_n_proc_DA",
                "nnUNet_def_n_proc", "TMPDIR", "CUDA_VISIBLE_DEVICES")
        self.results["environment"] = {k: env[k] for k in keys if k in env}
        self.results["environment"]["nnUNet_compile"] = \
            "unset (nnU-Net default)" if removed is None else f"unset here (the caller had {removed!r})"
        self.results["work_dir"] = self.work
        self.results["logs_dir"] = self.logs
        self.write_short_trainers()

    def write_short_trainers(self) -> None:
        imports = "".join(sorted({f"from nnunet_topo.trainers.{m} import {t}\n" for t, m, _ in SMOKE_TRAINERS}))
        classes = "".join(textwrap.dedent(f'''


            class {t}{SUFFIX}({t}):
                """{t}, {self.cfg["iterations"]} iteration(s) x 1 epoch (benchmarks/device_check.py)."""

                def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
                    super().__init__(plans, configuration, fold, dataset_json, device)
                    self.num_epochs = 1
                    self.num_iterations_per_epoch = {self.cfg["iterations"]}
                    self.num_val_iterations_per_epoch = 1
                    for k, v in OVERRIDES.items():
                        if hasattr(self, k):
                            setattr(self, k, v)
            ''') for t, _, _ in SMOKE_TRAINERS)
        text = ('"""Short smoke-run trainers written by benchmarks/device_check.py."""\nimport torch\n\n' + imports +
                f"\nOVERRIDES = {self.cfg['trainer_overrides']!r}" + classes)
        with open(os.path.join(self.dirs["ext_trainers"], "device_check_trainers.py"), "w") as f:
            f.write(text)

    def dataset_folder(self, kind: str) -> str:
        root = self.dirs["raw" if kind == "raw" else "preprocessed"]
        for n in sorted(os.listdir(root)):
            if n.startswith(f"Dataset{DATASET_ID:03d}_"):
                return os.path.join(root, n)
        raise StepFailed(f"no Dataset{DATASET_ID:03d}_* in {root}")

    def model_folder(self, trainer: str, plans: str) -> str:
        res = self.dirs["results"]
        name = os.path.basename(self.dataset_folder("raw"))
        return os.path.join(res, name, f"{trainer}__{plans}__{CONFIG}", "fold_0")

    # -------------------------------------------------------------------------------------------- steps
    def s_machine(self, rec: dict) -> dict:
        out = self.run_proc("machine", [sys.executable, os.path.abspath(__file__), "--worker", "machine"],
                            self.timeout("machine"))
        info = parse_result_line(out)
        if info is None:
            raise StepFailed("machine: no result line", tail(out))
        if self.mode == "gpu":
            self.results["gpu_name"] = info.get("gpu_name") or "no CUDA device"
            if not info.get("cuda_available"):
                raise StepFailed("torch.cuda.is_available() is False on this machine", json.dumps(info))
        return {"info": info}

    def s_prepare(self, rec: dict) -> dict:
        times: Dict[str, float] = {}
        rec["substeps_s"] = times

        def sub(name, argv, env=None):
            t0 = time.monotonic()
            out = self.run_proc(f"prepare_{name}", argv, self.timeout("prepare"), env)
            times[name] = round(time.monotonic() - t0, 1)
            self.flush()
            return out

        cfg = self.cfg
        make = console_script("nnUNetv2_topo_make_synthetic") + [
            "-d", str(DATASET_ID), "--preset", "acdc", "-n", str(cfg["num_training"]), "--num_test",
            str(cfg["num_test"]), "--seed", "0", "-o", self.dirs["raw"]]
        if cfg["shape"]:
            make += ["--shape"] + [str(v) for v in cfg["shape"]]
        sub("make_synthetic", make)
        raw = self.dataset_folder("raw")
        unl = os.path.join(raw, "imagesUnlabelled")  # nnUNetTrainerBettiSemi: the test images, unlabelled
        os.makedirs(unl, exist_ok=True)
        for n in sorted(os.listdir(os.path.join(raw, "imagesTs"))):
            shutil.copy(os.path.join(raw, "imagesTs", n), os.path.join(unl, "unl_" + n))
        npp = str(cfg["plan_np"])
        plan_env = {k: v for k, v in self.env.items() if k != "nnUNet_n_proc_DA"}  # 0 would starve the planner
        sub("plan_and_preprocess", console_script("nnUNetv2_plan_and_preprocess") + [
            "-d", str(DATASET_ID), "-c", CONFIG, "--verify_dataset_integrity", "-np", npp, "-npfp", npp], plan_env)
        sub("plan_whole_volume", console_script("nnUNetv2_topo_plan_whole_volume") + [
            "-d", str(DATASET_ID), "-c", CONFIG, "-o", WV_PLANS])
        sub("splits", [sys.executable, os.path.abspath(__file__), "--worker", "splits", "--folder",
                       self.dataset_folder("preprocessed")])
        pre = self.dataset_folder("preprocessed")
        plans = {}
        for p in (PLANS, WV_PLANS):
            with open(os.path.join(pre, p + ".json")) as f:
                c = json.load(f)["configurations"][CONFIG]
            plans[p] = {"patch_size": c["patch_size"], "batch_size": c["batch_size"], "spacing": c["spacing"]}
        return {"dataset": os.path.basename(raw), "plans": plans, "unlabelled_cases": len(os.listdir(unl))}

    def s_occupancy(self, rec: dict) -> dict:
        script = os.path.join(BENCH, "bench_occupancy.py")
        help_text = self.run_proc("occupancy_help", [sys.executable, script, "--help"], self.timeout("occupancy"))
        has_backends = "--backends" in help_text
        extra: List[str] = []
        if has_backends:
            extra += ["--backends"] + list(self.cfg["occ_backends"])
        if "--chunk-sizes" in help_text:  # the default chunk only: the size the library uses
            from nnunet_topo.occupancy import DEFAULT_CHUNK_SIZE
            extra += ["--chunk-sizes", str(DEFAULT_CHUNK_SIZE)]
        env = dict(self.env)
        if self.device == "cpu" and "triton" in extra:
            env["TRITON_INTERPRET"] = "1"  # Triton's interpreter: the triton path runs on the CPU (slowly)
        rows, runs, errors, comparison = [], [], [], []
        rec["comparison"] = comparison
        rec["rows"] = rows  # kept in the record even if a later run fails
        for faces in self.cfg["occ_faces"]:
            argv = [sys.executable, script, "--device", self.device, "--points"] + \
                [str(n) for n in self.cfg["occ_points"]] + ["--faces", str(faces), "--repeats",
                                                             str(self.cfg["occ_repeats"])] + extra
            try:
                out = self.run_proc(f"occupancy_{faces}faces", argv, self.timeout("occupancy"), env)
            except StepFailed as e:
                if "triton" not in extra:
                    raise
                # a failing triton backend must not cost the torch numbers: again with torch alone, then fail
                errors.append(f"--faces {faces} with --backends {' '.join(self.cfg['occ_backends'])}: {e}; "
                              f"{tail(e.stderr_tail, 3)}")
                rec["triton_errors"] = errors
                i = argv.index("--backends")
                argv = argv[:i] + ["--backends", "torch"] + [a for a in argv[i + 1:] if a not in
                                                             self.cfg["occ_backends"]]
                out = self.run_proc(f"occupancy_{faces}faces_torch", argv, self.timeout("occupancy"), env)
            parsed = parse_occupancy(out)
            if not parsed["rows"]:
                raise StepFailed(f"bench_occupancy.py --faces {faces}: no result rows in its output", tail(out))
            for r in parsed["rows"]:
                r.setdefault("faces", faces)
                r.setdefault("backend", "torch")
            rows.extend(parsed["rows"])
            comparison.extend(dict(r, faces=faces) for r in parsed["comparison"])
            runs.append({"faces": faces, "argv": argv[1:], "mesh": parsed.get("mesh"),
                         "header": parsed.get("header"), "machine": parsed.get("machine")})
            self.flush()
        rec.update(runs=runs, backends_option=has_backends)
        if errors:
            raise StepFailed("the triton backend failed (the torch rows were measured without it)",
                             "\n".join(errors))
        return {"rows": rows, "comparison": comparison, "runs": runs, "backends_option": has_backends,
                "triton_interpreter": env.get("TRITON_INTERPRET") == "1"}

    def s_betti_cost(self, rec: dict) -> dict:
        pre = self.dataset_folder("preprocessed")
        argv = [sys.executable, os.path.abspath(__file__), "--worker", "betti_cost", "--device", self.device,
                "--folder", pre, "--repeats", str(self.cfg["betti_repeats"]),
                "--reference_batch", str(self.cfg["betti_reference_batch"])]
        for p in self.cfg["betti_reference_patches"]:
            argv += ["--reference_patch", ",".join(str(v) for v in p)]
        out = self.run_proc("betti_cost", argv, self.timeout("betti_cost"))
        res = parse_result_line(out)
        if not res or not res.get("rows"):
            raise StepFailed("betti_cost: no result line", tail(out))
        return res

    def s_sync_step(self, rec: dict) -> dict:
        argv = [sys.executable, os.path.abspath(__file__), "--worker", "sync_step", "--device", self.device]
        out = self.run_proc("sync_step", argv, self.timeout("sync_step"))
        res = parse_result_line(out)
        if not res:
            raise StepFailed("sync_step: no result line", tail(out))
        if res.get("syncs"):
            raise StepFailed(f"mesh terms' forward+backward synchronised with the host: {res['syncs']}", tail(out))
        return res

    def s_smoke(self, trainer: str, plans: str, rec: dict) -> dict:
        name = trainer + SUFFIX
        argv = console_script("nnUNetv2_train") + [str(DATASET_ID), CONFIG, "0", "-tr", name, "-p", plans,
                                                   "-device", self.device]
        out = self.run_proc(f"smoke_{trainer}", argv, self.timeout("smoke"))
        folder = self.model_folder(name, plans)
        ckpt = os.path.join(folder, "checkpoint_final.pth")
        if not os.path.isfile(ckpt):
            raise StepFailed(f"nnUNetv2_train exited 0 but wrote no {ckpt}", tail(out))
        log = "".join(_read(os.path.join(folder, n)) for n in sorted(os.listdir(folder))
                      if n.startswith("training_log"))
        details: Dict[str, Any] = {"trainer": name, "plans": plans, "iterations": self.cfg["iterations"],
                                   "compiled": "Using torch.compile" in out + log,
                                   "validation_summary": os.path.isfile(os.path.join(folder, "validation",
                                                                                     "summary.json"))}
        m = re.findall(r"Epoch time: ([\d.]+) s", log)
        if m:
            details["epoch_time_s"] = float(m[-1])
        m = re.findall(r"train_loss (-?[\d.]+(?:e-?\d+)?|nan)", log)
        if m:
            details["train_loss"] = float(m[-1])
        if not details["validation_summary"]:
            raise StepFailed("nnU-Net's final validation wrote no validation/summary.json", tail(out))
        return details

    def _predict_common(self) -> List[str]:
        return ["-d", str(DATASET_ID), "-c", CONFIG, "-tr", PREDICT_TRAINER + SUFFIX, "-p", WV_PLANS, "-f", "0",
                "-device", self.device]

    def s_predict(self, rec: dict) -> dict:
        raw = self.dataset_folder("raw")
        out_dir = os.path.join(self.work, "pred")
        npp = "1" if self.mode == "dry" else "2"
        self.run_proc("predict", console_script("nnUNetv2_predict") + [
            "-i", os.path.join(raw, "imagesTs"), "-o", out_dir, "-npp", npp, "-nps", npp] + self._predict_common(),
            self.timeout("predict"))
        files = sorted(n for n in os.listdir(out_dir) if n.endswith(".nii.gz"))
        if len(files) != self.cfg["num_test"]:
            raise StepFailed(f"expected {self.cfg['num_test']} predictions in {out_dir}, found {files}")
        return {"trainer": PREDICT_TRAINER + SUFFIX, "cases": len(files)}

    def s_predict_meshes(self, rec: dict) -> dict:
        raw = self.dataset_folder("raw")
        out_dir = os.path.join(self.work, "meshes")
        self.run_proc("predict_meshes", console_script("nnUNetv2_topo_predict_meshes") + [
            "-i", os.path.join(raw, "imagesTs"), "-o", out_dir, "--format", "vtk"] + self._predict_common(),
            self.timeout("predict_meshes"))
        files = sorted(n for n in os.listdir(out_dir) if n.endswith(".vtk"))
        if not files or not os.path.isfile(os.path.join(out_dir, "meshes.json")):
            raise StepFailed(f"no meshes / meshes.json in {out_dir}")
        return {"trainer": PREDICT_TRAINER + SUFFIX, "mesh_files": len(files)}

    def s_evaluate(self, rec: dict) -> dict:
        raw = self.dataset_folder("raw")
        pred = os.path.join(self.work, "pred")
        self.run_proc("evaluate", console_script("nnUNetv2_topo_evaluate_folder") + [
            os.path.join(raw, "labelsTs"), pred, "-djfile", os.path.join(raw, "dataset.json"), "-pfile",
            os.path.join(self.dataset_folder("preprocessed"), WV_PLANS + ".json"), "-np", "1"],
            self.timeout("evaluate"))
        with open(os.path.join(pred, "summary_topology.json")) as f:
            summary = json.load(f)
        details: Dict[str, Any] = {"cases": len(summary.get("metric_per_case", []))}
        fm = summary.get("foreground_mean") or {}
        if "Dice" in fm:
            details["mean_dice"] = fm["Dice"]
        tm = summary.get("topology_mean") or {}
        if "TVS" in tm:
            details["TVS"] = tm["TVS"]
        return details

    def s_trainer_speed(self, rec: dict) -> dict:
        cfg = self.cfg
        sets = {k: v for k, v in cfg["trainer_overrides"].items()}
        argv = [sys.executable, os.path.join(BENCH, "bench_trainer_speed.py"), "-d", str(DATASET_ID), "-c", CONFIG,
                "--device", self.device, "--whole_volume", "--iters", str(cfg["speed_iters"]), "--rounds",
                str(cfg["speed_rounds"]), "--warmup", str(cfg["speed_warmup"]), "--set", json.dumps(sets),
                "--trainers"] + list(cfg["speed_trainers"])
        out = self.run_proc("trainer_speed", argv, self.timeout("trainer_speed"))
        parsed = parse_trainer_speed(out)
        got = {r["trainer"] for r in parsed["rows"]}
        missing = [t for t in ["nnUNetTrainer"] + list(cfg["speed_trainers"]) if t not in got]
        if missing:
            raise StepFailed(f"bench_trainer_speed.py printed no row for {missing}", tail(out))
        parsed["argv"] = argv[1:]
        return parsed

    # -------------------------------------------------------------------------------------------- main
    def run(self) -> int:
        self.setup()
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        self.flush()
        self.run_step("machine", self.s_machine)
        self.run_step("prepare", self.s_prepare)
        self.run_step("occupancy", self.s_occupancy)
        self.run_step("betti_cost", self.s_betti_cost)
        self.run_step("sync_step", self.s_sync_step)
        self.run_smoke()
        self.run_step("trainer_speed", self.s_trainer_speed)
        with self.lock:
            self.results["finished"] = _now()
        self.flush()
        self.cleanup()
        bad = [n for n in self.selected if self.step(n)["status"] != "ok"]
        print(f"device check: {len(self.selected) - len(bad)}/{len(self.selected)} steps ok in "
              f"{self.elapsed():.0f} s; {self.json_path}, {self.md_path}" + (f"; not ok: {bad}" if bad else ""))
        return 1 if bad else 0

    def run_smoke(self) -> None:
        def job(trainer: str, plans: str) -> None:
            self.run_step(f"smoke:{trainer}", lambda rec: self.s_smoke(trainer, plans, rec))
            if trainer == PREDICT_TRAINER:
                self.run_step("predict", self.s_predict)
                self.run_step("predict_meshes", self.s_predict_meshes)
                self.run_step("evaluate", self.s_evaluate)

        jobs = [(t, p) for t, _, p in SMOKE_TRAINERS
                if f"smoke:{t}" in self.selected or (t == PREDICT_TRAINER and "predict" in self.selected)]
        with ThreadPoolExecutor(max_workers=max(1, int(self.cfg["parallel"]))) as pool:
            for f in [pool.submit(job, t, p) for t, p in jobs]:
                f.result()

    def cleanup(self) -> None:
        if not self.args.keep_work and os.path.isfile(os.path.join(self.work, WORK_MARKER)):
            shutil.rmtree(self.work, ignore_errors=True)


def _kill_group(p: subprocess.Popen, only_leftovers: bool = False) -> None:
    """SIGTERM then SIGKILL to the process group of ``p`` (its own session: DA workers, compile workers)."""
    try:
        pgid = os.getpgid(p.pid) if p.poll() is None else p.pid
    except ProcessLookupError:
        pgid = p.pid
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            break
        if only_leftovers and sig == signal.SIGTERM:
            time.sleep(0.2)
        try:
            p.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone: is anybody left in the group?
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            break


# ================================================================================================ markdown
def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _secs(v: Any) -> str:
    return "" if v is None else f"{float(v):.1f}"


def _note(rec: dict) -> str:
    if rec.get("status") in ("ok", "pending", "not selected"):
        return _cell(rec.get("note", ""))
    last = [ln for ln in (rec.get("stderr_tail") or "").splitlines() if ln.strip()]
    msg = rec.get("error") or rec.get("note") or ""
    if last:
        msg = f"{msg}: {last[-1].strip()}" if msg else last[-1].strip()
    return _cell(msg[:300])


def render_markdown(res: dict) -> str:
    steps = res["steps"]
    gpu = res.get("gpu_name") or "unknown"
    info = (steps.get("machine") or {}).get("info") or {}
    lines = [f"## GPU: {gpu}", ""]
    who = [f"torch {info['torch']}" if info.get("torch") else None,
           f"CUDA {info['cuda']}" if info.get("cuda") else None,
           f"nnU-Net {info['nnunetv2']}" if info.get("nnunetv2") else None,
           f"{info['cpu_count']} CPU cores" if info.get("cpu_count") else None]
    commit = (res.get("git") or {}).get("commit")
    lines.append(f"`bash benchmarks/device_check.sh OUT{' --dry-run' if res['mode'] == 'dry_run' else ''}` of "
                 f"{res['started'][:10]}" + (f", commit {commit[:10]}" if commit else "") +
                 (", " + ", ".join(w for w in who if w) if any(who) else "") +
                 f"; {res.get('elapsed_s', 0):.0f} s in all" +
                 ("" if res.get("finished") else " (**unfinished**: the run stopped here)") + ".")
    lines += ["", "| step | status | seconds | note |", "|---|---|---|---|"]
    for name in STEP_ORDER:
        rec = steps[name]
        lines.append(f"| {name} | {rec['status']} | {_secs(rec.get('seconds'))} | {_note(rec)} |")

    s = res.get("settings", {})
    lines += ["", f"### Trainer smoke runs (`nnUNetv2_train ... -device {res['device']}`, 1 epoch x "
                  f"{s.get('iterations')} iteration(s), nnU-Net's final validation; up to {s.get('parallel')} "
                  "side by side, wall seconds)", "",
              "| trainer | plans | status | seconds | torch.compile | note |", "|---|---|---|---|---|---|"]
    for t, _, plans in SMOKE_TRAINERS:
        rec = steps[f"smoke:{t}"]
        comp = rec.get("compiled")
        lines.append(f"| {t} | {plans} | {rec['status']} | {_secs(rec.get('seconds'))} | "
                     f"{'' if comp is None else ('on' if comp else 'off')} | {_note(rec)} |")
    for name in ("predict", "predict_meshes", "evaluate"):
        rec = steps[name]
        extra = {"predict": f"{rec.get('cases', '')} case(s)", "predict_meshes": f"{rec.get('mesh_files', '')} mesh "
                 "file(s)", "evaluate": f"mean Dice {_cell(rec.get('mean_dice'))}, TVS {_cell(rec.get('TVS'))}"}[name]
        note = extra if rec["status"] == "ok" else _note(rec)
        lines.append(f"| `{name}` ({PREDICT_TRAINER}) | {WV_PLANS} | {rec['status']} | {_secs(rec.get('seconds'))} "
                     f"| | {note} |")

    rec = steps["trainer_speed"]
    lines += ["", "### Per-iteration time, ratio to nnUNetTrainer (`bench_trainer_speed.py --whole_volume`, "
                  "same batches, interleaved rounds)", ""]
    if rec.get("rows"):
        lines += [f"{_cell(rec.get('setup'))}; topology terms (L_TPM included) on from the first step "
                  "(`topology_start_epoch=0`); torch.compile as nnU-Net decides (on for CUDA, off for the mesh "
                  "trainers).", "",
                  "| trainer | ms/iter (median) | ratio (median of rounds) | min..max |", "|---|---|---|---|"]
        for r in rec["rows"]:
            lines.append(f"| {r['trainer']} | {r['ms_per_iter']:.1f} | {r['ratio']:.3f} | "
                         f"{r['ratio_min']:.3f}..{r['ratio_max']:.3f} |")
    else:
        lines.append(f"No numbers: {rec['status']}. {_note(rec)}")

    rec = steps["occupancy"]
    lines += ["", "### Occupancy throughput (`bench_occupancy.py`, icosphere, uniform points, float32)", ""]
    if rec.get("rows"):
        lines += ["| backend | method | points | faces | pass | ms | Mpairs/s | peak MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rec["rows"]:
            lines.append(f"| {_cell(r.get('backend'))} | {_cell(r.get('method'))} | {_cell(r.get('points'))} | "
                         f"{_cell(r.get('faces'))} | {_cell(r.get('pass'))} | {_cell(r.get('ms'))} | "
                         f"{_cell(r.get('Mpairs/s'))} | {_cell(r.get('peak_MiB'))} |")
        if rec.get("comparison"):
            lines += ["", "torch vs triton (ratio = torch ms / triton ms, > 1: Triton faster; largest differences "
                          "of the winding numbers and their gradients)" +
                      (" — Triton's CPU interpreter, not a speed" if rec.get("triton_interpreter") else "") + ":", "",
                      "| form:pass | points | faces | torch ms | triton ms | ratio | max\\|dw\\| | grad rel |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in rec["comparison"]:
                lines.append(f"| {_cell(r.get('form:pass'))} | {_cell(r.get('n_points'))} | {_cell(r.get('faces'))} | "
                             f"{_cell(r.get('torch_ms'))} | {_cell(r.get('triton_ms'))} | {_cell(r.get('ratio'))} | "
                             f"{_cell(r.get('max|dw|'))} | {_cell(r.get('grad_rel'))} |")
    else:
        lines.append(f"No numbers: {rec['status']}. {_note(rec)}")

    rec = steps["sync_step"]
    lines += ["", "### Host synchronisation in a step's mesh terms (issue 26)", ""]
    if rec.get("mode"):
        lines.append(f"{rec['mode']} on {rec['device']}, {', '.join(rec.get('terms') or ['tpm'])}: "
                     f"{len(rec.get('syncs') or [])} synchronising op(s); critical points {rec.get('critical_points')}"
                     f", MIE {rec.get('mie_critical_points')}.")
    else:
        lines.append(f"No result: {rec['status']}. {_note(rec)}")

    rec = steps["betti_cost"]
    lines += ["", "### Betti loss cost per step (`BettiPriorLoss` forward+backward, nnUNetTrainerBetti defaults, "
                  "softmax on the device, persistence on the CPU)", ""]
    if rec.get("rows"):
        lines += ["| patch | batch | source | downsample | every | threads | ms fwd+bwd (median) | ms/step |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rec["rows"]:
            lines.append(f"| {'x'.join(str(v) for v in r['patch'])} | {r['batch']} | {r['source']} | "
                         f"{r['downsample']} | {r['every']} | {r['threads']} | {r['ms_fwd_bwd']:.1f} | "
                         f"{r['ms_per_step']:.1f} |")
    else:
        lines.append(f"No numbers: {rec['status']}. {_note(rec)}")
    return "\n".join(lines) + "\n"


# ================================================================================================ workers
def worker_machine(args) -> dict:
    import torch

    info: Dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available()}
    try:
        info["affinity_cores"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    if torch.cuda.is_available():
        info["gpu_name"] = torch.cuda.get_device_name()
        info["capability"] = list(torch.cuda.get_device_capability())
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
        info["cudnn"] = torch.backends.cudnn.version()
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("nnunetv2", "nnunet-topo", "triton", "numpy", "cripser"):
        try:
            info[pkg.replace("-", "_")] = version(pkg)
        except PackageNotFoundError:
            info[pkg.replace("-", "_")] = None
    import nnunet_topo
    from nnunet_topo.trainers import TRAINER_DIR

    info["nnunet_topo_path"] = os.path.dirname(nnunet_topo.__file__)
    info["trainer_dir"] = TRAINER_DIR
    if not os.path.realpath(TRAINER_DIR).startswith(os.path.realpath(REPO)):
        info["warning"] = f"nnunet_topo is imported from outside this repository ({TRAINER_DIR})"
    return info


def worker_splits(args) -> dict:
    """nnU-Net's own 5-fold split (``do_split``: sorted identifiers, seed 12345), written once before trainers run
    side by side."""
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    with open(os.path.join(args.folder, PLANS + ".json")) as f:
        ident = json.load(f)["configurations"][CONFIG]["data_identifier"]
    data = os.path.join(args.folder, ident)
    keys = sorted(infer_dataset_class(data).get_identifiers(data))
    path = os.path.join(args.folder, "splits_final.json")
    if not os.path.isfile(path):
        save_json(generate_crossval_split(keys, seed=12345, n_splits=5), path)
    return {"cases": len(keys), "splits_file": path}


class _ClassView:
    """Stands in for a trainer instance when calling its methods on class attributes (no nnU-Net set-up)."""

    def __init__(self, cls, **attrs):
        self._cls = cls
        self.__dict__.update(attrs)

    def __getattr__(self, name):
        v = getattr(self._cls, name)
        return v.__get__(self, type(self)) if callable(v) and hasattr(v, "__get__") else v


def worker_betti_cost(args) -> dict:
    import statistics
    import types

    import torch

    from nnunet_topo.losses.betti import BettiPriorLoss
    from nnunet_topo.trainers.nnUNetTrainerBetti import nnUNetTrainerBetti as T

    device = torch.device(args.device)
    with open(os.path.join(args.folder, PLANS + ".json")) as f:
        conf = json.load(f)["configurations"][CONFIG]
    with open(os.path.join(args.folder, "dataset.json")) as f:
        labels = json.load(f)["labels"]
    num_classes = len([v for v in labels.values() if isinstance(v, int)])
    class_ids = [int(v) for k, v in labels.items() if isinstance(v, int) and v != 0 and k != "ignore"]
    cases = [(list(conf["patch_size"]), int(conf["batch_size"]), "plans (synthetic dataset)")]
    for p in args.reference_patch or []:
        cases.append(([int(v) for v in p.split(",")], args.reference_batch, "reference patch"))
    every = int(getattr(T, "betti_every", 1) or 1)
    rows = []
    torch.manual_seed(0)
    for patch, batch, source in cases:
        view = _ClassView(T, configuration_manager=types.SimpleNamespace(patch_size=patch))
        try:
            factor = int(T.betti_factor(view))
        except AttributeError:  # an older trainer without betti_factor()
            factor = int(getattr(T, "betti_downsample", 2) or 2)
        try:
            threads = int(T.betti_workers(view))
        except AttributeError:
            threads = None
        loss = BettiPriorLoss(class_ids, target="patch", downsample=factor, softmax=True, num_workers=threads)
        # a smooth random field (realistic numbers of local extrema), as benchmarks/bench_betti_cost.py
        field = torch.nn.functional.avg_pool3d(torch.randn(batch, num_classes, *patch, device=device), 5, 1, 2)
        target = field.argmax(1, keepdim=True).float()
        logits = (field * 40).detach().requires_grad_(True)
        times = []
        for i in range(args.repeats + 1):  # the first call is a warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss(logits, target).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append((time.perf_counter() - t0) * 1000)
            logits.grad = None
        ms = statistics.median(times)
        rows.append({"patch": patch, "batch": batch, "source": source, "classes": class_ids, "downsample": factor,
                     "every": every, "threads": threads, "ms_fwd_bwd": round(ms, 2),
                     "ms_per_step": round(ms / every, 2), "repeats": args.repeats, "device": args.device})
    return {"rows": rows, "trainer_defaults": {
        k: getattr(T, k, None) for k in ("betti_weight", "betti_downsample", "betti_max_pooled_voxels", "betti_every",
                                         "betti_num_workers")}}


def worker_sync_step(args) -> dict:
    """One TPMLoss, MIELoss and shape-regulariser forward + backward each (both sources of critical points, the
    trainers' cap) on two balls pushed into each other over a missing septum, after a warm-up: under
    ``torch.cuda.set_sync_debug_mode("error")`` on a GPU (a synchronising op raises), under
    :class:`nnunet_topo.voxelize.HostSyncRecorder` on the CPU (issue 26 item 3)."""
    import numpy as np
    import torch
    import trimesh

    from nnunet_topo import occupancy
    from nnunet_topo.frames import voxel_to_normalized
    from nnunet_topo.frames import normalized_to_mm
    from nnunet_topo.losses.mesh_regularisers import mesh_regularisers
    from nnunet_topo.losses.mie import MIELoss
    from nnunet_topo.losses.tpm import TPMLoss
    from nnunet_topo.topology_spec import parse_topology
    from nnunet_topo.voxelize import HostSyncRecorder

    device = torch.device(args.device)
    occupancy.SYNC_FREE_CHECKS = True
    labels = {"background": 0, "LV": 1, "RV": 2, "MYO": 3}
    spec = parse_topology({"labels": labels, "topology": {
        "rules": [{"type": "exclusion", "a": "LV", "b": "RV"}], "mesh_structures": {"LV": ["LV"], "RV": ["RV"]}}})
    shape, spacing = (16, 48, 64), (2.0, 1.0, 1.0)
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) * sp for n, sp in zip(shape, spacing)],
                             indexing="ij")
    d_lv = ((z - 15) ** 2 + (y - 24) ** 2 + (x - 24) ** 2).sqrt()
    d_rv = ((z - 15) ** 2 + (y - 24) ** 2 + (x - 38) ** 2).sqrt()
    ref = torch.zeros(shape, dtype=torch.long)
    ref[(d_lv <= 9) | (d_rv <= 9)] = 3
    ref[d_lv <= 7] = 1
    ref[d_rv <= 7] = 2
    pred = ref.clone()
    pred[(ref == 3) & (d_lv < d_rv) & (x > 28) & (x < 34)] = 1  # a missing septum: label-map critical points
    pred[(ref == 3) & (d_rv <= d_lv) & (x > 28) & (x < 34)] = 2
    ref, pred = ref[None].to(device), pred[None].to(device)
    logits = torch.nn.functional.one_hot(pred, 4).permute(0, 4, 1, 2, 3).float() * 5.0
    meshes, faces = [], []
    for cx in (26.0, 36.0):  # radius 7 mm, centres 10 mm apart: the meshes overlap (mesh critical points)
        ico = trimesh.creation.icosphere(subdivisions=3, radius=7.0)
        v_mm = torch.tensor(ico.vertices + np.asarray([cx, 24.0, 15.0]), dtype=torch.float32)
        v = voxel_to_normalized(v_mm.flip(-1) / torch.tensor(spacing), shape)
        meshes.append(v[None].to(device).requires_grad_())
        faces.append(torch.tensor(ico.faces, device=device))
    loss = TPMLoss(spec, ["LV", "RV"], method="dipole", smoothing=1.5, spacing=spacing)
    mie = MIELoss(spec, ["LV", "RV"], method="dipole", smoothing=1.5, spacing=spacing, num_points=256)
    mm = [normalized_to_mm(v, shape, spacing) for v in meshes]
    edge_refs = [torch.ones(f.shape[0] * 3 // 2, device=device) for f in faces]  # closed meshes: E = 3F/2
    terms = {"tpm": lambda: loss(meshes, faces, logits, ref[:, None])["total"],
             "mie": lambda: mie(meshes, faces, logits, ref[:, None])["total"],
             "regularisers": lambda: sum(mesh_regularisers(mm, faces, edge_refs).values())}
    syncs: list = []
    for name, term in terms.items():
        term().backward(retain_graph=True)  # warm-up: faces range-checked and edges built once per faces tensor
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                term().backward(retain_graph=True)
            except RuntimeError as err:
                syncs.append(f"{name}: {str(err).splitlines()[0]}")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            with HostSyncRecorder() as rec:
                term().backward(retain_graph=True)
            syncs += [f"{name}: {op}" for op in rec.syncs]
    return {"device": str(device), "mode": "set_sync_debug_mode('error')" if device.type == "cuda" else
            "HostSyncRecorder", "terms": list(terms), "syncs": syncs,
            "critical_points": {k: int(v) for k, v in loss.last_counts.items()},
            "mie_critical_points": int(mie.last_num_critical)}


WORKERS = {"machine": worker_machine, "splits": worker_splits, "betti_cost": worker_betti_cost,
           "sync_step": worker_sync_step}


# ================================================================================================ entry
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", help="output folder (device_check.json, device_check.md, logs/)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="the same steps on the CPU at tiny sizes")
    parser.add_argument("--steps", nargs="+", default=None,
                        help=f"run only these steps (and what they need): {', '.join(STEP_ORDER)}, or 'smoke'")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="wall-clock budget; every subprocess timeout is capped by what is left of it "
                             "(default 470 on the GPU, 1500 in the dry run)")
    parser.add_argument("--parallel", type=int, default=None, help="trainer smoke runs side by side "
                                                                   "(default 3 on the GPU, 2 in the dry run)")
    parser.add_argument("--work_dir", default=None, help="scratch folder (default OUT_DIR/work)")
    parser.add_argument("--keep_work", action="store_true", help="keep the scratch folder at the end")
    # internal: the steps that run Python code of their own do it in a subprocess of this file
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--reference_patch", action="append", help=argparse.SUPPRESS)
    parser.add_argument("--reference_batch", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(RESULT_PREFIX + json.dumps(WORKERS[args.worker](args), default=str), flush=True)
        return 0
    if not args.out_dir:
        parser.error("OUT_DIR is required")
    return DeviceCheck(args).run()


if __name__ == "__main__":
    sys.exit(main())
