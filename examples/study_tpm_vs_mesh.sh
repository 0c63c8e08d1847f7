#!/usr/bin/env bash
# Short synthetic study: nnUNetTrainerMesh (lambda_TP = 0) vs nnUNetTrainerTPM vs nnUNetTrainerMIE, trained the same
# way (the _cpuStudy variants: 15 epochs x 20 iterations), on the CPU. Prints the evaluator tables (Dice, Betti
# error, TVS; mesh Dice, Chamfer, mesh TVS on a fine isotropic grid) of each.
# Work dir: $NNUNET_TOPO_STUDY_DIR (default ./study_output). Resumable: a step whose output exists is skipped (run it
# again after an interruption); NNUNET_TOPO_STUDY_FRESH=1 starts over. Only a folder this script created is ever
# replaced. STUDY_TRAINERS overrides the list of trainers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
WORK="${NNUNET_TOPO_STUDY_DIR:-$PWD/study_output}"
if [ -e "$WORK" ] && [ ! -f "$WORK/.nnunet_topo_study" ]; then
  echo "error: $WORK exists and was not created by this study; set NNUNET_TOPO_STUDY_DIR" >&2; exit 2
fi
if [ "${NNUNET_TOPO_STUDY_FRESH:-0}" = "1" ] && [ -e "$WORK" ]; then rm -rf "$WORK"; fi
mkdir -p "$WORK"/{raw,preprocessed,results}; touch "$WORK/.nnunet_topo_study"
export nnUNet_raw="$WORK/raw" nnUNet_preprocessed="$WORK/preprocessed" nnUNet_results="$WORK/results"
export nnUNet_extTrainer="$(nnUNetv2_topo_trainer_path)" nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-1}"
ID=502; DS="$nnUNet_raw/Dataset502_SynthACDC"; PP="$nnUNet_preprocessed/Dataset502_SynthACDC"
TRAINERS=(${STUDY_TRAINERS:-nnUNetTrainerMesh_cpuStudy nnUNetTrainerTPM_cpuStudy nnUNetTrainerMIE_cpuStudy})
set -x
[ -f "$DS/dataset.json" ] || nnUNetv2_topo_make_synthetic -d $ID --preset acdc -n 10 --num_test 4 --seed 1
[ -f "$PP/nnUNetPlans.json" ] || nnUNetv2_plan_and_preprocess -d $ID -c 3d_fullres -np 1 -npfp 1
[ -f "$PP/nnUNetPlansWholeVolume.json" ] || nnUNetv2_topo_plan_whole_volume -d $ID -c 3d_fullres
for TR in "${TRAINERS[@]}"; do
  C=(-d $ID -c 3d_fullres -tr $TR -p nnUNetPlansWholeVolume -f 0 -device cpu)
  MODEL="$nnUNet_results/Dataset502_SynthACDC/${TR}__nnUNetPlansWholeVolume__3d_fullres/fold_0"
  if [ ! -f "$MODEL/checkpoint_final.pth" ]; then
    if [ -f "$MODEL/checkpoint_latest.pth" ]; then CONT=--c; else CONT=; fi
    nnUNetv2_train $ID 3d_fullres 0 -tr $TR -p nnUNetPlansWholeVolume -device cpu $CONT
  fi
  [ -f "$WORK/pred_$TR/.done" ] || { nnUNetv2_predict -i "$DS/imagesTs" -o "$WORK/pred_$TR" "${C[@]}" -npp 1 -nps 1 \
    && touch "$WORK/pred_$TR/.done"; }
  [ -f "$WORK/meshes_$TR/meshes.json" ] || nnUNetv2_topo_predict_meshes -i "$DS/imagesTs" -o "$WORK/meshes_$TR" \
    "${C[@]}" --format vtk
done
for TR in "${TRAINERS[@]}"; do
  echo "=== $TR ==="
  nnUNetv2_topo_evaluate_folder "$DS/labelsTs" "$WORK/pred_$TR" -djfile "$DS/dataset.json" \
    -pfile "$PP/nnUNetPlansWholeVolume.json" --mesh_folder "$WORK/meshes_$TR"
done
