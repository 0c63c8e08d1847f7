#!/usr/bin/env bash
# ACDC study (issue 11, documentation/results.md): every trainer through nnU-Net's own commands on real cine MRI,
# nnU-Net's ACDC 5-fold split (by patient), fold 0 (40 validation volumes), the same CPU budget for every trainer:
# the *_acdcStudy variants (trainers/nnUNetTrainer_shortRuns.py: 20 epochs x 20 iterations, batch size 2, no
# mirroring at inference) on the heart-ROI mesh configuration at a study spacing of 10 x 4.5 x 4.5 mm. Then
# nnUNetv2_topo_refine on the baseline, the evaluator on the validation cases (labels; meshes for the mesh trainers),
# documentation/results/acdc_fold0_400it.json and the tables (history: the fine-tune study, study.sh, replaced it).
#
#   bash examples/acdc/study_400it.sh      # about 2 h on 2 CPU cores; resumable: run it again after an interruption
#
# Data: $NNUNET_TOPO_ACDC_H5 (default ../shared/data/acdc: the WSL4MIS h5 volumes, see its README for the terms).
# Work dir: $NNUNET_TOPO_STUDY_DIR (default ./acdc_study_output). A step whose output exists is skipped;
# NNUNET_TOPO_STUDY_FRESH=1 starts over. Only a folder this script created is ever replaced. STUDY_TRAINERS overrides
# the list of trainers; STUDY_REFINE_STEPS the refinement steps (default 10); STUDY_DEVICE the device (default cpu).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO="$PWD"
bash scripts/setup_env.sh
export PATH="$REPO/.venv/bin:$PATH"
H5="${NNUNET_TOPO_ACDC_H5:-$REPO/../shared/data/acdc}"
WORK="${NNUNET_TOPO_STUDY_DIR:-$REPO/acdc_study_output}"
DEVICE="${STUDY_DEVICE:-cpu}"
if [ -e "$WORK" ] && [ ! -f "$WORK/.nnunet_topo_study" ]; then
  echo "error: $WORK exists and was not created by this study; set NNUNET_TOPO_STUDY_DIR" >&2; exit 2
fi
if [ "${NNUNET_TOPO_STUDY_FRESH:-0}" = "1" ] && [ -e "$WORK" ]; then rm -rf "$WORK"; fi
mkdir -p "$WORK"/{raw,preprocessed,results,logs,eval,val_images,val_labels}; touch "$WORK/.nnunet_topo_study"
export nnUNet_raw="$WORK/raw" nnUNet_preprocessed="$WORK/preprocessed" nnUNet_results="$WORK/results"
export nnUNet_extTrainer="$(nnUNetv2_topo_trainer_path)" nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-1}"
ID=127; NAME=Dataset127_ACDCh5; DS="$nnUNet_raw/$NAME"; PP="$nnUNet_preprocessed/$NAME"
PLANS=nnUNetPlansMesh4.5mm; CONF=3d_mesh
# order: the comparisons the study is for first (baseline + refinement, Mesh vs TPM), so an interrupted run has them
TRAINERS=(${STUDY_TRAINERS:-nnUNetTrainer_acdcStudy nnUNetTrainerMesh_acdcStudy nnUNetTrainerTPM_acdcStudy \
  nnUNetTrainerMIE_acdcStudy nnUNetTrainerBetti_acdcStudy nnUNetTrainerProjPool_acdcStudy})
BASE=nnUNetTrainer_acdcStudy
set -x
# 1. data: nnU-Net raw dataset + nnU-Net's ACDC split; the topology block must hold on every reference
[ -f "$DS/dataset.json" ] || python examples/acdc/convert_acdc_h5.py -i "$H5" -o "$nnUNet_raw" -d $ID
[ -f "$WORK/logs/check_rules.ok" ] || { nnUNetv2_topo_check_rules -d $ID | tee "$WORK/logs/check_rules.txt" \
  && touch "$WORK/logs/check_rules.ok"; }
# 2. plans: nnU-Net's planner at the study spacing, the heart-ROI mesh configuration on top, batch size 2 (the CPU
#    budget; nnU-Net would pick 8 for a GPU), preprocessing
[ -f "$PP/dataset_fingerprint.json" ] || nnUNetv2_extract_fingerprint -d $ID -np 2
[ -f "$PP/nnUNetPlans_4.5mm.json" ] || nnUNetv2_plan_experiment -d $ID -overwrite_target_spacing 10 4.5 4.5 \
  -overwrite_plans_name nnUNetPlans_4.5mm
if [ ! -f "$PP/$PLANS.json" ]; then
  nnUNetv2_topo_plan_mesh -d $ID -p nnUNetPlans_4.5mm -o $PLANS
  python - "$PP/$PLANS.json" <<'EOF'
import json, sys
p = json.load(open(sys.argv[1])); p["configurations"]["3d_mesh"]["batch_size"] = 2
json.dump(p, open(sys.argv[1], "w"), indent=2)
EOF
fi
[ -f "$WORK/logs/preprocess.ok" ] || { nnUNetv2_preprocess -d $ID -plans_name $PLANS -c $CONF -np 2 \
  && touch "$WORK/logs/preprocess.ok"; }
# the 40 validation volumes of fold 0 (nnU-Net's split) as image / label folders
python - "$PP/splits_final.json" "$DS" "$WORK" <<'EOF'
import json, os, sys
split, ds, work = sys.argv[1:4]
for case in json.load(open(split))[0]["val"]:
    for src, dst in ((f"{ds}/imagesTr/{case}_0000.nii.gz", f"{work}/val_images/{case}_0000.nii.gz"),
                     (f"{ds}/labelsTr/{case}.nii.gz", f"{work}/val_labels/{case}.nii.gz")):
        if not os.path.exists(dst):
            os.symlink(src, dst)
EOF
# 3. train fold 0 (+ refinement of the baseline) (resumed with --c after an interruption), evaluate nnU-Net's validation outputs; meshes
for TR in "${TRAINERS[@]}"; do
  MODEL="$nnUNet_results/$NAME/${TR}__${PLANS}__${CONF}"
  if [ ! -f "$MODEL/fold_0/validation/summary.json" ]; then
    if [ -f "$MODEL/fold_0/checkpoint_latest.pth" ] || [ -f "$MODEL/fold_0/checkpoint_final.pth" ]; then CONT=--c; else CONT=; fi
    nnUNetv2_train $ID $CONF 0 -tr $TR -p $PLANS -device "$DEVICE" $CONT 2>&1 | tail -n 5
  fi
  [ -f "$WORK/eval/${TR}_label.json" ] || nnUNetv2_topo_evaluate_folder "$WORK/val_labels" "$MODEL/fold_0/validation" \
    -djfile "$DS/dataset.json" -pfile "$PP/$PLANS.json" -o "$WORK/eval/${TR}_label.json" -np 2 > /dev/null
  if [ "$TR" = "$BASE" ]; then  # test-time refinement (Clough) of the baseline
    [ -f "$WORK/refine/refinement_summary.json" ] || nnUNetv2_topo_refine -i "$WORK/val_images" -o "$WORK/refine" \
      -d $ID -c $CONF -tr $BASE -p $PLANS -f 0 -device "$DEVICE" --steps "${STUDY_REFINE_STEPS:-10}"
    [ -f "$WORK/eval/${BASE}+refine_label.json" ] || nnUNetv2_topo_evaluate_folder "$WORK/val_labels" "$WORK/refine" \
      -djfile "$DS/dataset.json" -pfile "$PP/$PLANS.json" -o "$WORK/eval/${BASE}+refine_label.json" -np 2 > /dev/null
  fi
  case "$TR" in nnUNetTrainerMesh*|nnUNetTrainerTPM*|nnUNetTrainerMIE*)
    [ -f "$WORK/meshes_$TR/meshes.json" ] || nnUNetv2_topo_predict_meshes -i "$WORK/val_images" -o "$WORK/meshes_$TR" \
      -d $ID -c $CONF -tr $TR -p $PLANS -f 0 -device "$DEVICE" --format vtp || true  # cases without mesh: exit 1, recorded
    [ -f "$WORK/eval/${TR}_mesh.json" ] || nnUNetv2_topo_evaluate_folder "$WORK/val_labels" "$WORK/meshes_$TR" \
      -djfile "$DS/dataset.json" -pfile "$PP/$PLANS.json" --mesh_folder "$WORK/meshes_$TR" \
      -o "$WORK/eval/${TR}_mesh.json" -np 2 > /dev/null ;;
  esac
done
set +x
# 4. the JSON and the tables
python examples/acdc/collect_results_400it.py --work "$WORK" --out documentation/results/acdc_fold0_400it.json
