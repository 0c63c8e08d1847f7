#!/bin/bash
# A 5-fold nnU-Net cross-validation with an nnunet-topo trainer on a SLURM cluster, as three dependent submissions:
#   1. precompute.sbatch  nnUNetv2_topo_precompute: the work every fold would repeat, once (CPU)
#   2. train_fold.sbatch  an array, one nnUNetv2_train per fold, after 1 succeeded (afterok)
#   3. post.sbatch        summarize_cv, find_best_configuration, the ensemble on the test images, meshes, QC report,
#                         after every fold succeeded (afterok on the array)
# Edit the variables below (or set them when calling: DATASET=27 TRAINER=nnUNetTrainerTPM bash submit.sh), the paths in
# env.sh, and the #SBATCH lines (partition, GPUs, time) of the three job scripts. Before: nnUNetv2_plan_and_preprocess
# (and, for a mesh configuration, nnUNetv2_topo_plan_mesh + nnUNetv2_preprocess); README "End to end".
set -euo pipefail
export RECIPE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$RECIPE_DIR/env.sh"

export DATASET=${DATASET:-27}                       # dataset ID or name
export CONFIGURATION=${CONFIGURATION:-3d_mesh}      # e.g. 3d_fullres, or 3d_mesh from nnUNetv2_topo_plan_mesh
export PLANS=${PLANS:-nnUNetPlansMesh}              # plans identifier (nnUNetPlans for 3d_fullres)
export TRAINER=${TRAINER:-nnUNetTrainerTPM}         # any nnU-Net or nnunet-topo trainer
export FOLDS=${FOLDS:-"0 1 2 3 4"}                  # the array's tasks; the post job ensembles these folds
export TEST_IMAGES=${TEST_IMAGES:-}                 # e.g. $nnUNet_raw/Dataset027_NAME/imagesTs; empty: no test step
export TEST_LABELS=${TEST_LABELS:-}                 # e.g. $nnUNet_raw/Dataset027_NAME/labelsTs; empty: no QC report
OUTPUT_DIR=${OUTPUT_DIR:-$PWD/topo_cluster_output}   # test predictions, meshes, QC report (and the job logs)
mkdir -p "$OUTPUT_DIR" && export OUTPUT_DIR=$(cd "$OUTPUT_DIR" && pwd)
export LOG_DIR=${LOG_DIR:-$OUTPUT_DIR/logs}
export DEVICE=${DEVICE:-cuda}                       # nnUNetv2_train / _predict -device
export NUM_GPUS=${NUM_GPUS:-1}                      # GPUs per fold (nnUNetv2_train -num_gpus; DDP); #SBATCH --gres too
export NUM_PROCESSES=${NUM_PROCESSES:-4}            # CPU processes of find_best_configuration, predict, report
export MESH_FORMAT=${MESH_FORMAT:-vtk}              # vtk, vtp, ply, obj or stl
mkdir -p "$LOG_DIR"

# --parsable prints "ID" (or "ID;cluster"); --kill-on-invalid-dep: a job whose dependency failed is removed, not
# left pending forever; --export=ALL: the jobs see the variables above (some sites default to --export=NONE)
submit() { local out; out=$(sbatch --parsable --export=ALL --kill-on-invalid-dep=yes "$@"); echo "${out%%;*}"; }
pre=$(submit --job-name=topo_precompute --output="$LOG_DIR/precompute_%j.log" "$RECIPE_DIR/precompute.sbatch")
folds=$(submit --job-name=topo_fold --array="${FOLDS// /,}" --dependency="afterok:$pre" \
  --output="$LOG_DIR/fold_%A_%a.log" "$RECIPE_DIR/train_fold.sbatch")
post=$(submit --job-name=topo_post --dependency="afterok:$folds" --output="$LOG_DIR/post_%j.log" \
  "$RECIPE_DIR/post.sbatch")
echo "submitted: precompute $pre -> folds $folds (array ${FOLDS// /,}) -> post $post; logs in $LOG_DIR"
