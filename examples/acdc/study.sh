#!/usr/bin/env bash
# ACDC fine-tune study (issue 22, documentation/results.md): one well-trained backbone, every trainer fine-tuned from
# it with equal budgets, through nnU-Net's own commands on real cine MRI; nnU-Net's ACDC 5-fold split (by patient),
# fold 0 (40 validation volumes), the heart-ROI mesh configuration at 10 x 4.5 x 4.5 mm.
#
#   bash examples/acdc/study.sh                 # every stage; resumable: run it again after an interruption
#   STUDY_STAGES="data backbone" bash examples/acdc/study.sh     # only these stages
#
# Stages (each skips what is done; an interrupted training continues with --c):
#   data      convert the h5 volumes, check the rules, plan (nnU-Net's planner + nnUNetv2_topo_plan_mesh), preprocess
#   backbone  stage 1: nnUNetTrainerMeshROI_acdcBackbone (nnU-Net's loss, the mesh trainers' heart-ROI sampling and
#             augmentation), 4000 iterations; its checkpoint path is written to $WORK/backbone_checkpoint.txt
#   finetune  stage 2: every arm from the backbone with -pretrained_weights, 1000 iterations each (the *_acdcFT
#             variants of trainers/nnUNetTrainer_shortRuns.py): the plain-loss control (two seeds), ProjPool, Betti,
#             Mesh, MIE; then TPM (λ 0.5, two seeds; λ 1) from the Mesh fine-tune's checkpoint for 500 more iterations
#             against Mesh continued for the same 500 (*_acdcFT2). Two trainings at once (STUDY_PARALLEL, default 2).
# Data: $NNUNET_TOPO_ACDC_H5 (default ../shared/data/acdc). Work dir: $NNUNET_TOPO_STUDY_DIR (default
# ./acdc_study_output); only a folder this script created is ever written into. STUDY_DEVICE: cpu (default) or cuda.
# The seconds of every stage go to $WORK/logs/stage_seconds.tsv (stage, seconds, host, date).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO="$PWD"
[ "${STUDY_SKIP_SETUP:-0}" = "1" ] || bash scripts/setup_env.sh
export PATH="$REPO/.venv/bin:$PATH"
H5="${NNUNET_TOPO_ACDC_H5:-$REPO/../shared/data/acdc}"
WORK="${NNUNET_TOPO_STUDY_DIR:-$REPO/acdc_study_output}"
DEVICE="${STUDY_DEVICE:-cpu}"
STAGES="${STUDY_STAGES:-data backbone finetune}"
if [ -e "$WORK" ] && [ ! -f "$WORK/.nnunet_topo_study" ]; then
  echo "error: $WORK exists and was not created by this study; set NNUNET_TOPO_STUDY_DIR" >&2; exit 2
fi
mkdir -p "$WORK"/{raw,preprocessed,results,logs,eval,val_images,val_labels}; touch "$WORK/.nnunet_topo_study"
export nnUNet_raw="$WORK/raw" nnUNet_preprocessed="$WORK/preprocessed" nnUNet_results="$WORK/results"
export nnUNet_extTrainer="$(nnUNetv2_topo_trainer_path)" nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-1}"
ID=127; NAME=Dataset127_ACDCh5; DS="$nnUNet_raw/$NAME"; PP="$nnUNet_preprocessed/$NAME"
PLANS=nnUNetPlansMesh4.5mm; CONF=3d_mesh
BACKBONE_TR=nnUNetTrainerMeshROI_acdcBackbone
model_dir() { echo "$nnUNet_results/$NAME/${1}__${PLANS}__${CONF}/fold_0"; }
timed() {  # timed NAME COMMAND...: run, append the seconds to stage_seconds.tsv
  local name="$1"; shift; local t0=$SECONDS
  "$@"
  printf '%s\t%s\t%s\t%s\n' "$name" $((SECONDS - t0)) "$(hostname)/$(nproc)cpu/$DEVICE" "$(date -Is)" >> "$WORK/logs/stage_seconds.tsv"
}
train() {  # train TRAINER [extra nnUNetv2_train args]: resumes with --c when a checkpoint exists
  local tr="$1"; shift; local out; out="$(model_dir "$tr")"
  [ -f "$out/validation/summary.json" ] && return 0
  if [ -f "$out/checkpoint_latest.pth" ] || [ -f "$out/checkpoint_final.pth" ]; then
    nnUNetv2_train $ID $CONF 0 -tr "$tr" -p $PLANS -device "$DEVICE" --c > "$WORK/logs/train_$tr.log" 2>&1
  else
    nnUNetv2_train $ID $CONF 0 -tr "$tr" -p $PLANS -device "$DEVICE" "$@" > "$WORK/logs/train_$tr.log" 2>&1
  fi
}

stage_data() {
  [ -f "$DS/dataset.json" ] || python examples/acdc/convert_acdc_h5.py -i "$H5" -o "$nnUNet_raw" -d $ID
  [ -f "$WORK/logs/check_rules.ok" ] || { nnUNetv2_topo_check_rules -d $ID > "$WORK/logs/check_rules.txt" \
    && touch "$WORK/logs/check_rules.ok"; }
  # nnU-Net's planner at the study spacing, the heart-ROI mesh configuration on top, batch size 2 (the CPU budget)
  [ -f "$PP/dataset_fingerprint.json" ] || nnUNetv2_extract_fingerprint -d $ID -np 2
  [ -f "$PP/nnUNetPlans_4.5mm.json" ] || nnUNetv2_plan_experiment -d $ID -overwrite_target_spacing 10 4.5 4.5 \
    -overwrite_plans_name nnUNetPlans_4.5mm
  if [ ! -f "$PP/$PLANS.json" ]; then
    nnUNetv2_topo_plan_mesh -d $ID -p nnUNetPlans_4.5mm -o $PLANS
    python - "$PP/$PLANS.json" <<'PY'
import json, sys
p = json.load(open(sys.argv[1])); p["configurations"]["3d_mesh"]["batch_size"] = 2
json.dump(p, open(sys.argv[1], "w"), indent=2)
PY
  fi
  [ -f "$WORK/logs/preprocess.ok" ] || { nnUNetv2_preprocess -d $ID -plans_name $PLANS -c $CONF -np 2 \
    && touch "$WORK/logs/preprocess.ok"; }
  # the topology block of this version (mesh rules: RV vs LV_epi, LV_endo inside LV_epi) in the raw and preprocessed
  # dataset.json (a dataset converted by an earlier version lacks the mesh rules; the labels are unchanged)
  python - "$DS/dataset.json" "$PP/dataset.json" <<'PY'
import json, sys
sys.path.insert(0, "examples/acdc")
from convert_acdc_h5 import acdc_topology
for path in sys.argv[1:]:
    dj = json.load(open(path))
    if dj.get("topology") != acdc_topology():
        dj["topology"] = acdc_topology()
        json.dump(dj, open(path, "w"), indent=2)
        print(f"{path}: topology block updated (mesh rules)")
PY
  # the 40 validation volumes of fold 0 (nnU-Net's split) as image / label folders (links)
  python - "$PP/splits_final.json" "$DS" "$WORK" <<'PY'
import json, os, sys
split, ds, work = sys.argv[1:4]
for case in json.load(open(split))[0]["val"]:
    for src, dst in ((f"{ds}/imagesTr/{case}_0000.nii.gz", f"{work}/val_images/{case}_0000.nii.gz"),
                     (f"{ds}/labelsTr/{case}.nii.gz", f"{work}/val_labels/{case}.nii.gz")):
        if not os.path.exists(dst):
            os.symlink(src, dst)
PY
}

stage_backbone() {
  train $BACKBONE_TR
  local ckpt; ckpt="$(model_dir $BACKBONE_TR)/checkpoint_final.pth"
  [ -f "$ckpt" ] || { echo "error: the backbone has no $ckpt; see $WORK/logs/train_$BACKBONE_TR.log" >&2; exit 1; }
  echo "$ckpt" > "$WORK/backbone_checkpoint.txt"
}

FT_FIRST=(nnUNetTrainerMeshROI_acdcFT nnUNetTrainerMesh_acdcFT nnUNetTrainerMIE_acdcFT nnUNetTrainerProjPool_acdcFT
  nnUNetTrainerBetti_acdcFT nnUNetTrainerMeshROI_acdcFT_seed2)
FT_FROM_MESH=(nnUNetTrainerTPM_acdcFT2 nnUNetTrainerMesh_acdcFT2 nnUNetTrainerTPM_lambda1_acdcFT2
  nnUNetTrainerTPM_acdcFT2_seed2)
parallel_train() {  # parallel_train CHECKPOINT TRAINER...: STUDY_PARALLEL trainings at a time, each -pretrained_weights
  local ckpt="$1"; shift; local n="${STUDY_PARALLEL:-2}" tr
  for tr in "$@"; do
    while [ "$(jobs -rp | wc -l)" -ge "$n" ]; do wait -n; done
    timed "train_$tr" train "$tr" -pretrained_weights "$ckpt" &
  done
  wait
}

stage_finetune() {
  local backbone; backbone="$(cat "$WORK/backbone_checkpoint.txt")"
  parallel_train "$backbone" "${FT_FIRST[@]}"
  parallel_train "$(model_dir nnUNetTrainerMesh_acdcFT)/checkpoint_final.pth" "${FT_FROM_MESH[@]}"
  for tr in "${FT_FIRST[@]}" "${FT_FROM_MESH[@]}"; do
    [ -f "$(model_dir "$tr")/validation/summary.json" ] || { echo "error: $tr did not finish" >&2; exit 1; }
  done
}

for STAGE in $STAGES; do
  if [ -f "$WORK/logs/stage_$STAGE.done" ]; then echo "stage $STAGE: done"; continue; fi
  echo "stage $STAGE: $(date -Is)"
  timed "$STAGE" "stage_$STAGE"
  touch "$WORK/logs/stage_$STAGE.done"
done
