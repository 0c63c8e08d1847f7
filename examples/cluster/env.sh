# The environment of every job of the recipe (sourced by submit.sh and by each job script). Edit the paths once.
# A value already exported (in ~/.bashrc, or by the caller) is kept: each line only fills in what is unset.

# 1. Your Python environment with a CUDA build of torch + nnunet-topo (README "Install on your own machine or
#    cluster"). Either a venv, or your cluster's torch module plus a venv made with --system-site-packages:
# module load cuda/12.4 python/3.11            # whatever your cluster calls them (the jobs run with set -u: a
#                                              # module script that trips over it goes between set +u and set -u)
VENV=${VENV:-$HOME/venvs/nnunet-topo}          # skipped if it has no bin/activate (the commands must be on PATH)
if [ -f "$VENV/bin/activate" ]; then
  source "$VENV/bin/activate"
fi

# 2. nnU-Net's three folders (shared storage that every node sees)
export nnUNet_raw=${nnUNet_raw:-/path/to/nnUNet_raw}
export nnUNet_preprocessed=${nnUNet_preprocessed:-/path/to/nnUNet_preprocessed}
export nnUNet_results=${nnUNet_results:-/path/to/nnUNet_results}

# 3. where nnU-Net finds the nnunet-topo trainers (keeps the folders already listed, e.g. your own subclasses)
export nnUNet_extTrainer="$(nnUNetv2_topo_trainer_path)"

# optional: nnU-Net's data-augmentation workers per GPU job (default: its own choice from the CPU count)
# export nnUNet_n_proc_DA=12
