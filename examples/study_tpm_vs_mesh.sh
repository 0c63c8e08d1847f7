#!/usr/bin/env bash
# Short synthetic study: nnUNetTrainerTPM vs nnUNetTrainerMesh (lambda_TP = 0), trained the same way, on the CPU.
# Prints the evaluator tables (Dice, Betti error, TVS; mesh Dice, Chamfer, mesh TVS) of both. Work dir:
# $NNUNET_TOPO_STUDY_DIR (default ./study_output); only a folder this script created is ever replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH"
WORK="${NNUNET_TOPO_STUDY_DIR:-$PWD/study_output}"
if [ -e "$WORK" ]; then
  if [ -f "$WORK/.nnunet_topo_study" ]; then rm -rf "$WORK"; else
    echo "error: $WORK exists and was not created by this study; set NNUNET_TOPO_STUDY_DIR" >&2; exit 2; fi
fi
mkdir -p "$WORK"/{raw,preprocessed,results}; touch "$WORK/.nnunet_topo_study"
export nnUNet_raw="$WORK/raw" nnUNet_preprocessed="$WORK/preprocessed" nnUNet_results="$WORK/results"
export nnUNet_extTrainer="$(nnUNetv2_topo_trainer_path)" nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-1}"
ID=502; DS="$nnUNet_raw/Dataset502_SynthACDC"
set -x
nnUNetv2_topo_make_synthetic -d $ID --preset acdc -n 10 --num_test 4 --seed 1
nnUNetv2_plan_and_preprocess -d $ID -c 3d_fullres -np 1 -npfp 1
nnUNetv2_topo_plan_whole_volume -d $ID -c 3d_fullres
for TR in nnUNetTrainerMesh_cpuStudy nnUNetTrainerTPM_cpuStudy; do
  nnUNetv2_train $ID 3d_fullres 0 -tr $TR -p nnUNetPlansWholeVolume -device cpu
  C=(-d $ID -c 3d_fullres -tr $TR -p nnUNetPlansWholeVolume -f 0 -device cpu)
  nnUNetv2_predict -i "$DS/imagesTs" -o "$WORK/pred_$TR" "${C[@]}" -npp 1 -nps 1
  nnUNetv2_topo_predict_meshes -i "$DS/imagesTs" -o "$WORK/meshes_$TR" "${C[@]}" --format vtk
done
for TR in nnUNetTrainerMesh_cpuStudy nnUNetTrainerTPM_cpuStudy; do
  echo "=== $TR ==="
  nnUNetv2_topo_evaluate_folder "$DS/labelsTs" "$WORK/pred_$TR" -djfile "$DS/dataset.json" \
    -pfile "$nnUNet_preprocessed/Dataset502_SynthACDC/nnUNetPlansWholeVolume.json" --mesh_folder "$WORK/meshes_$TR"
done
