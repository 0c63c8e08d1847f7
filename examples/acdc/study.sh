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
#             augmentation), until its Dice goals (pseudo Dice, see ACDC_BACKBONE) or 4000 iterations; evaluated, then
#             archived in float16 into $RESULTS_DIR/acdc_backbone_fp16.pt (examples/acdc/backbone_archive.py; 11 MB,
#             committed), and every arm starts from the rounded weights ($WORK/backbone_start.pth, named in
#             $WORK/backbone_checkpoint.txt; their sha256 in $WORK/backbone_id.txt). A new work folder (the machine
#             that had the old one is gone) restores the archive instead of training a new backbone.
#   finetune  stage 2: every arm from the backbone with -pretrained_weights, 1000 iterations each (the *_acdcFT
#             variants of trainers/nnUNetTrainer_acdcFinetune.py): the plain-loss control (two seeds), ProjPool, Betti,
#             Mesh, MIE; the head alone on the control's final checkpoint (nnUNetTrainerMesh_headOnly_acdcFT, network
#             frozen: the mesh share at 0, and "add meshes to the nnU-Net you already trained"); TPM (λ 0.5, two
#             seeds; λ 1) from the Mesh fine-tune's checkpoint for 500 more iterations against Mesh continued for the
#             same 500 (*_acdcFT2). FT_QUEUE orders them; an arm starts as soon as its parent is trained, two at once
#             (STUDY_PARALLEL), and is evaluated (as stage evaluate does: the control with its refinement and the
#             marching cubes of its segmentations) and collected right after its training, so
#             $RESULTS_DIR/acdc_fold0.json holds every finished arm's row and per-case values (commit it). An arm
#             trained in an earlier session is left to stage evaluate (the slots go to trainings). One thread per job.
#   scratch   (FT_QUEUE trains this pair after the first five arms; this stage then only checks) issue 27:
#             nnUNetTrainerProjPool_acdcScratch (ProjPool from scratch with its default two-phase schedule,
#             plain for 500 iterations, then its term for 500) against nnUNetTrainerMeshROI_acdcScratch (the same 1000
#             plain), both from nnU-Net's random initialisation, two at once; their label evaluation
#             (eval/<ROW>_label.json; the collector compares the two), then the collector
#   evaluate  (what stage finetune did per arm is skipped) nnUNetv2_topo_evaluate_folder on nnU-Net's fold-0
#             validation outputs of the backbone and every arm (eval/<ROW>_label.json); the mesh arms' meshes of
#             the validation images (nnUNetv2_topo_predict_meshes --format vtp -> meshes_<ROW>/) and their mesh
#             evaluation (eval/<ROW>_mesh.json); nnUNetv2_topo_refine
#             of the control (keep_present, STUDY_REFINE_STEPS steps, default 10 -> refine_<CONTROL>/, row
#             <CONTROL>+refine); nnUNetv2_topo_repair_meshes of REPAIR_ARMS' meshes (repaired_<ROW>/repair.json:
#             how far each model's meshes must move, issue 25); marching cubes of the control's validation
#             segmentations (python -m nnunet_topo.cli.segmentation_meshes -> meshes_<CONTROL>+marching_cubes/) and
#             their mesh evaluation
#   external  the control (nnUNetv2_predict), its refinement, Mesh, TPM and MIE (nnUNetv2_topo_predict_meshes --format
#             vtp) on the unlabelled LGE volumes ($STUDY_EXTERNAL_IMAGES, default ../shared/data/external_lge/imagesTs)
#             -> external_lge_predictions/<ROW>/; label-free measures (python -m nnunet_topo.cli.label_free ->
#             eval/external_<ROW>_label_free.json); documentation/results/external_lge_predictions.tar.gz (< 15 MB)
#   collect   examples/acdc/collect_results.py: documentation/results/acdc_fold0.json and the tables
#             (logs/tables.md); runs every time it is named (no done marker)
# Data: $NNUNET_TOPO_ACDC_H5 (default ../shared/data/acdc). Work dir: $NNUNET_TOPO_STUDY_DIR (default
# ./acdc_study_output); only a folder this script created is ever written into. STUDY_DEVICE: cpu (default) or cuda.
# STUDY_RESULTS_DIR: where the JSON and the external archive go (default documentation/results);
# STUDY_BACKBONE_ARCHIVE: the archived backbone (default $STUDY_RESULTS_DIR/acdc_backbone_fp16.pt).
# STUDY_THREADS: torch/OpenMP threads per job while stages finetune and scratch run jobs side by side (default 1).
# The seconds of every stage and step go to $WORK/logs/stage_seconds.tsv (step, seconds, host/cores/device, date).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO="$PWD"
[ "${STUDY_SKIP_SETUP:-0}" = "1" ] || bash scripts/setup_env.sh
export PATH="$REPO/.venv/bin:$PATH"
H5="${NNUNET_TOPO_ACDC_H5:-$REPO/../shared/data/acdc}"
WORK="${NNUNET_TOPO_STUDY_DIR:-$REPO/acdc_study_output}"
DEVICE="${STUDY_DEVICE:-cpu}"
STAGES="${STUDY_STAGES:-data backbone finetune scratch evaluate external collect}"
RESULTS_DIR="${STUDY_RESULTS_DIR:-$REPO/documentation/results}"
BACKBONE_ARCHIVE="${STUDY_BACKBONE_ARCHIVE:-$RESULTS_DIR/acdc_backbone_fp16.pt}"
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
  printf '%s\t%s\t%s\t%s\n' "$name" $((SECONDS - t0)) "$(hostname)/$(nproc --all)cpu/$DEVICE" "$(date -Is)" >> "$WORK/logs/stage_seconds.tsv"
}
collect_now() {  # the collector (documentation/results/acdc_fold0.json, logs/tables.md), one at a time
  mkdir -p "$RESULTS_DIR"
  local lock=(); command -v flock > /dev/null && lock=(flock "$WORK/logs/collect.lock")  # util-linux; else unlocked
  ${lock[@]+"${lock[@]}"} python examples/acdc/collect_results.py --work "$WORK" \
    --out "$RESULTS_DIR/acdc_fold0.json" > "$WORK/logs/tables.md"
}
trained() {  # trained TRAINER: trained and validated by nnU-Net (its fold-0 validation summary exists)
  [ -f "$(model_dir "$1")/validation/summary.json" ]
}
train() {  # train TRAINER [extra nnUNetv2_train args]: resumes with --c when a checkpoint exists
  local tr="$1"; shift; local out; out="$(model_dir "$tr")"
  trained "$tr" && return 0
  if [ -f "$out/checkpoint_final.pth" ]; then  # trained (or stopped at its Dice goals), not yet validated
    nnUNetv2_train $ID $CONF 0 -tr "$tr" -p $PLANS -device "$DEVICE" --val >> "$WORK/logs/train_$tr.log" 2>&1
  elif [ -f "$out/checkpoint_latest.pth" ] || [ -f "$out/checkpoint_best.pth" ]; then
    nnUNetv2_train $ID $CONF 0 -tr "$tr" -p $PLANS -device "$DEVICE" --c >> "$WORK/logs/train_$tr.log" 2>&1
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
  local start="$WORK/backbone_start.pth" ckpt
  ckpt="$(model_dir $BACKBONE_TR)/checkpoint_final.pth"
  if [ ! -f "$start" ] && [ ! -f "$ckpt" ] && [ -f "$BACKBONE_ARCHIVE" ]; then
    # a new work folder (its machine is gone): the archived backbone, not a new one, so earlier rows stay comparable
    python examples/acdc/backbone_archive.py restore "$BACKBONE_ARCHIVE" "$start"
  elif [ ! -f "$start" ]; then
    train $BACKBONE_TR
    [ -f "$ckpt" ] || { echo "error: the backbone has no $ckpt; see $WORK/logs/train_$BACKBONE_TR.log" >&2; exit 1; }
    evaluate $BACKBONE_TR label "$(model_dir $BACKBONE_TR)/validation"
    python examples/acdc/backbone_archive.py save "$ckpt" "$BACKBONE_ARCHIVE.tmp" "$start"
    mv "$BACKBONE_ARCHIVE.tmp" "$BACKBONE_ARCHIVE"
    # what the float16 rounding does to the backbone's own validation (eval/<BACKBONE>+fp16_label.json)
    cp "$start" "$(model_dir $BACKBONE_TR)/checkpoint_fp16.pth"
    [ -f "$WORK/eval/$BACKBONE_TR+fp16_label.json" ] || timed "predict_${BACKBONE_TR}_fp16" nnUNetv2_predict \
      -i "$WORK/val_images" -o "$WORK/backbone_fp16_validation" -d $ID -c $CONF -tr $BACKBONE_TR -p $PLANS -f 0 \
      -chk checkpoint_fp16.pth -device "$DEVICE" -npp 1 -nps 1 --disable_progress_bar \
      > "$WORK/logs/predict_backbone_fp16.log" 2>&1
    evaluate "$BACKBONE_TR+fp16" label "$WORK/backbone_fp16_validation"
  fi
  echo "$start" > "$WORK/backbone_checkpoint.txt"
  collect_now
}

# Stage 2's arms, "TRAINER:PARENT" (backbone; scratch: nnU-Net's random initialisation, issue 27's pair; or the
# trainer whose final checkpoint it starts from), in the order of what they decide first: issue 21's evidence
# (control, Mesh, head-only, TPM against Mesh continued), issue 27's pair, then the rest of issue 22's rows. A trainer
# starts as soon as its parent is trained, STUDY_PARALLEL (default 2) at a time, and is evaluated and collected at
# once (documentation/results/acdc_fold0.json keeps its row when the work folder is lost)
FT_QUEUE=(nnUNetTrainerMeshROI_acdcFT:backbone nnUNetTrainerMesh_acdcFT:backbone
  nnUNetTrainerMesh_headOnly_acdcFT:nnUNetTrainerMeshROI_acdcFT
  nnUNetTrainerTPM_acdcFT2:nnUNetTrainerMesh_acdcFT nnUNetTrainerMesh_acdcFT2:nnUNetTrainerMesh_acdcFT
  nnUNetTrainerProjPool_acdcScratch:scratch nnUNetTrainerMeshROI_acdcScratch:scratch
  nnUNetTrainerMeshROI_acdcFT_seed2:backbone nnUNetTrainerTPM_acdcFT2_seed2:nnUNetTrainerMesh_acdcFT
  nnUNetTrainerProjPool_acdcFT:backbone nnUNetTrainerBetti_acdcFT:backbone nnUNetTrainerMIE_acdcFT:backbone
  nnUNetTrainerTPM_lambda1_acdcFT2:nnUNetTrainerMesh_acdcFT)
FT_ARMS=("${FT_QUEUE[@]%%:*}")
parent_checkpoint() {  # parent_checkpoint PARENT: the checkpoint its children start from; fails while not trained
  if [ "$1" = scratch ]; then echo ""; return; fi
  if [ "$1" = backbone ]; then cat "$WORK/backbone_checkpoint.txt"; return; fi
  trained "$1" && echo "$(model_dir "$1")/checkpoint_final.pth"
}
finetune_arm() {  # finetune_arm TRAINER CHECKPOINT: train (from CHECKPOINT unless empty), evaluate, collect
  if trained "$1"; then :  # trained before: no 0-second record
  elif [ -n "$2" ]; then timed "train_$1" train "$1" -pretrained_weights "$2"; else timed "train_$1" train "$1"; fi
  evaluate_arm "$1"
  collect_now
}

parallel_threads() {  # parallel_threads N: with N jobs at once, one torch/OpenMP thread each unless STUDY_THREADS says
  # (nnU-Net gives every CPU training all cores: two at once on 2 cores ran 2.2x slower per step,
  # benchmarks/bench_parallel_threads.py); stage evaluate, one job at a time, keeps the defaults
  [ "$1" -gt 1 ] || return 0
  export NNUNET_TOPO_CPU_THREADS="${STUDY_THREADS:-1}" OMP_NUM_THREADS="${STUDY_THREADS:-1}"
}

stage_finetune() {
  local n="${STUDY_PARALLEL:-2}" item ckpt started tr
  parallel_threads "$n"
  local pending=() rest
  # an arm trained in an earlier session is evaluated by stage evaluate: the two slots go to the trainings (the
  # control's refinement, 2-3 h, and a repair, about 1 h, must not hold a slot while arms wait to train)
  for item in "${FT_QUEUE[@]}"; do trained "${item%%:*}" || pending+=("$item"); done
  while [ ${#pending[@]} -gt 0 ]; do
    started=0; rest=()
    for item in "${pending[@]}"; do
      if [ $started -eq 0 ] && [ "$(jobs -rp | wc -l)" -lt "$n" ] && ckpt="$(parent_checkpoint "${item#*:}")"; then
        finetune_arm "${item%%:*}" "$ckpt" &
        started=1
      else
        rest+=("$item")
      fi
    done
    pending=(${rest[@]+"${rest[@]}"})
    if [ $started -eq 0 ]; then
      if [ "$(jobs -rp | wc -l)" -eq 0 ]; then
        echo "error: their parents did not finish: ${pending[*]}" >&2; exit 1
      fi
      wait -n || true
    fi
  done
  wait
  for tr in "${FT_ARMS[@]}"; do
    trained "$tr" || { echo "error: $tr did not finish" >&2; exit 1; }
  done
}

CONTROL=nnUNetTrainerMeshROI_acdcFT
SCRATCH=()  # issue 27's pair: FT_QUEUE's arms whose parent is "scratch"
for item in "${FT_QUEUE[@]}"; do [ "${item#*:}" = scratch ] && SCRATCH+=("${item%%:*}"); done
EVAL_ARGS=(-djfile "$DS/dataset.json" -pfile "$PP/$PLANS.json" -np 2)
is_mesh_arm() {  # the arms with a mesh head (nnUNetTrainerMeshROI, the control, has none)
  case "$1" in nnUNetTrainerMesh_*|nnUNetTrainerTPM*|nnUNetTrainerMIE*) return 0 ;; esac; return 1
}
# issue 25's displacement per trainer: the repair (30-160 s per case on 2 cores, 40 cases) of the arms that answer
# "how far must a Mesh model's meshes move, how far a TPM model's" (Mesh continued against TPM: the same iterations),
# and of the first Mesh arm and the head alone; the other mesh arms are not repaired (hours of CPU for no new question)
REPAIR_ARMS=(nnUNetTrainerMesh_acdcFT nnUNetTrainerMesh_acdcFT2 nnUNetTrainerTPM_acdcFT2
  nnUNetTrainerMesh_headOnly_acdcFT)
is_repair_arm() { local a; for a in "${REPAIR_ARMS[@]}"; do [ "$a" = "$1" ] && return 0; done; return 1; }
predict_meshes() {  # predict_meshes TRAINER IMAGES OUT: exit code 1 (some cases without mesh, in meshes.json) is fine
  nnUNetv2_topo_predict_meshes -i "$2" -o "$3" -d $ID -c $CONF -tr "$1" -p $PLANS -f 0 -device "$DEVICE" \
    --format vtp --overwrite || [ $? -eq 1 ]
}
marching_cubes() {  # marching_cubes SEGMENTATIONS OUT: as predict_meshes, exit code 1 is fine
  python -m nnunet_topo.cli.segmentation_meshes -i "$1" -o "$2" -djfile "$DS/dataset.json" --format vtp --overwrite \
    || [ $? -eq 1 ]
}
repair() {  # repair MESHES OUT: nnUNetv2_topo_repair_meshes; exit code 1 (cases not repaired, in repair.json) is fine;
  # an interrupted repair keeps its finished cases (--continue_repair)
  nnUNetv2_topo_repair_meshes -i "$1" -o "$2" -djfile "$DS/dataset.json" --overwrite --continue_repair \
    || [ $? -eq 1 ]
}
refine() {  # refine IMAGES OUT: nnUNetv2_topo_refine of the control (keep_present, the default)
  nnUNetv2_topo_refine -i "$1" -o "$2" -d $ID -c $CONF -tr $CONTROL -p $PLANS -f 0 -device "$DEVICE" \
    --steps "${STUDY_REFINE_STEPS:-10}" --overwrite
}
evaluate() {  # evaluate ROW KIND PREDICTIONS [--mesh_folder MESHES]: eval/ROW_KIND.json unless it exists
  local row="$1" kind="$2" pred="$3"; shift 3
  [ -f "$WORK/eval/${row}_$kind.json" ] && return 0
  # --chill for meshes: a case without mesh is left out of the mesh means (the collector counts it)
  timed "eval_${row}_$kind" nnUNetv2_topo_evaluate_folder "$WORK/val_labels" "$pred" "${EVAL_ARGS[@]}" \
    -o "$WORK/eval/${row}_$kind.json" "$@" > "$WORK/logs/eval_${row}_$kind.log" 2>&1
}

stage_scratch() {  # what FT_QUEUE did for the pair is skipped (train and evaluate skip what is done)
  local tr
  parallel_threads ${#SCRATCH[@]}
  for tr in "${SCRATCH[@]}"; do finetune_arm "$tr" "" & done
  wait
  for tr in "${SCRATCH[@]}"; do
    trained "$tr" || { echo "error: $tr did not finish" >&2; exit 1; }
  done
}

evaluate_arm() {  # evaluate_arm TRAINER: label evaluation; a mesh arm's meshes, their evaluation and repair
  local tr="$1" mc="$WORK/meshes_${CONTROL}+marching_cubes"
  evaluate "$tr" label "$(model_dir "$tr")/validation"
  if is_mesh_arm "$tr"; then
    [ -f "$WORK/meshes_$tr/meshes.json" ] || timed "meshes_$tr" predict_meshes "$tr" "$WORK/val_images" \
      "$WORK/meshes_$tr" > "$WORK/logs/meshes_$tr.log" 2>&1
    evaluate "$tr" mesh "$WORK/meshes_$tr" --mesh_folder "$WORK/meshes_$tr" --chill
  fi
  # the control's refinement and marching cubes of its segmentations (the alternatives a user would try first):
  # right after its training, as its own rows are
  if [ "$tr" = $CONTROL ]; then
    [ -f "$WORK/refine_$CONTROL/refinement_summary.json" ] || timed "refine_$CONTROL" refine "$WORK/val_images" \
      "$WORK/refine_$CONTROL" > "$WORK/logs/refine_$CONTROL.log" 2>&1
    evaluate "$CONTROL+refine" label "$WORK/refine_$CONTROL"
    [ -f "$mc/meshes.json" ] || timed "marching_cubes_$CONTROL" marching_cubes "$(model_dir $CONTROL)/validation" \
      "$mc" > "$WORK/logs/marching_cubes_$CONTROL.log" 2>&1
    evaluate "$CONTROL+marching_cubes" mesh "$(model_dir $CONTROL)/validation" --mesh_folder "$mc" --chill
  fi
  # issue 25: how far the repair must move this model's meshes (repaired_<ROW>/repair.json, the collector)
  if is_repair_arm "$tr" && [ ! -f "$WORK/repaired_$tr/repair.json" ]; then
    timed "repair_$tr" repair "$WORK/meshes_$tr" "$WORK/repaired_$tr" > "$WORK/logs/repair_$tr.log" 2>&1
  fi
}

stage_evaluate() {
  local tr missing=()
  [ -n "${STUDY_THREADS:-}" ] || unset NNUNET_TOPO_CPU_THREADS OMP_NUM_THREADS  # one job at a time: all cores
  for tr in $BACKBONE_TR "${FT_ARMS[@]}"; do
    if ! trained "$tr"; then
      [ "$tr" = $BACKBONE_TR ] || missing+=("$tr")  # a restored backbone has no training folder here
      continue
    fi
    evaluate_arm "$tr"
  done
  if [ ${#missing[@]} -gt 0 ]; then echo "error: not trained yet: ${missing[*]} (stage finetune)" >&2; exit 1; fi
}

EXT_IMAGES="${STUDY_EXTERNAL_IMAGES:-$REPO/../shared/data/external_lge/imagesTs}"
EXT="$WORK/external_lge_predictions"
EXT_MESH_ARMS=(nnUNetTrainerMesh_acdcFT nnUNetTrainerTPM_acdcFT2 nnUNetTrainerMIE_acdcFT)
EXT_TAR="$RESULTS_DIR/external_lge_predictions.tar.gz"
EXT_TAR_MAX_BYTES=$((15 * 1024 * 1024))
label_free() {  # label_free ROW [--mesh_folder MESHES]: eval/external_ROW_label_free.json unless it exists
  local row="$1"; shift
  [ -f "$WORK/eval/external_${row}_label_free.json" ] && return 0
  timed "external_label_free_$row" python -m nnunet_topo.cli.label_free "$EXT/$row" -djfile "$DS/dataset.json" "$@" \
    -o "$WORK/eval/external_${row}_label_free.json" > "$WORK/logs/external_label_free_$row.log" 2>&1
}

pack_external() {  # pack_external FILE: external_lge_predictions/ as a reproducible .tar.gz (sorted, fixed times)
  tar --sort=name --mtime=2026-01-01 --owner=0 --group=0 --numeric-owner -C "$WORK" -cf - external_lge_predictions \
    | gzip -n -9 > "$1"
}

stage_external() {
  # ../shared/data/external_lge/README: MS-CMRSeg 2019 LGE (research use; cite Zhuang, TPAMI 2019), 20 volumes, no
  # labels on purpose; real oblique geometry 0.73-0.76 x 0.73-0.76 x 5 mm (nnU-Net resamples to the plans' 10 x 4.5 x
  # 4.5 mm and writes back on the image grid; meshes are in world mm), LGE contrast instead of cine bSSFP
  [ -d "$EXT_IMAGES" ] || { echo "error: no external images at $EXT_IMAGES (STUDY_EXTERNAL_IMAGES)" >&2; exit 1; }
  mkdir -p "$EXT"
  local tr
  if [ ! -f "$WORK/logs/external_$CONTROL.ok" ]; then
    timed "external_predict_$CONTROL" nnUNetv2_predict -i "$EXT_IMAGES" -o "$EXT/$CONTROL" -d $ID -c $CONF \
      -tr $CONTROL -p $PLANS -f 0 -device "$DEVICE" -npp 1 -nps 1 --disable_progress_bar \
      > "$WORK/logs/external_predict_$CONTROL.log" 2>&1
    touch "$WORK/logs/external_$CONTROL.ok"
  fi
  [ -f "$EXT/$CONTROL+refine/refinement_summary.json" ] || timed "external_refine_$CONTROL" refine "$EXT_IMAGES" \
    "$EXT/$CONTROL+refine" > "$WORK/logs/external_refine_$CONTROL.log" 2>&1
  for tr in "${EXT_MESH_ARMS[@]}"; do
    [ -f "$EXT/$tr/meshes.json" ] || timed "external_meshes_$tr" predict_meshes "$tr" "$EXT_IMAGES" "$EXT/$tr" \
      > "$WORK/logs/external_meshes_$tr.log" 2>&1
  done
  label_free "$CONTROL"
  label_free "$CONTROL+refine"
  for tr in "${EXT_MESH_ARMS[@]}"; do label_free "$tr" --mesh_folder "$EXT/$tr"; done
  # the archive: every model's segmentations (+ meshes, meshes.json), the label-free measures, what it is
  mkdir -p "$EXT/label_free"
  cp "$WORK"/eval/external_*_label_free.json "$EXT/label_free/"
  cat > "$EXT/README.txt" <<TXT
Predictions of the ACDC fine-tune study's models (nnunet-topo, examples/acdc/study.sh, issue 22) on the 20 LGE MRI
volumes of MS-CMRSeg 2019 (research use; cite X. Zhuang, IEEE TPAMI 41(12), 2019). No labels were used; their
accuracy is measured outside the project. Folders (one per model, named after its nnU-Net trainer class):
  $CONTROL/            the control (nnU-Net's loss, heart-ROI sampling), nnUNetv2_predict
  $CONTROL+refine/     the control refined by nnUNetv2_topo_refine (keep_present, ${STUDY_REFINE_STEPS:-10} steps)
  ${EXT_MESH_ARMS[*]}: segmentation CASE.nii.gz + meshes CASE_<structure>.vtp (world mm, ITK/LPS) + meshes.json
  (a case a model could not mesh is listed there with its reason)
  label_free/          python -m nnunet_topo.cli.label_free per model: rule violations, Betti priors, cases meshed
TXT
  mkdir -p "$RESULTS_DIR"
  timed external_pack pack_external "$EXT_TAR.tmp"
  local size; size=$(stat -c %s "$EXT_TAR.tmp")
  if [ "$size" -ge $EXT_TAR_MAX_BYTES ]; then
    echo "error: $EXT_TAR.tmp is $size bytes (>= 15 MB); not committed" >&2; exit 1
  fi
  mv "$EXT_TAR.tmp" "$EXT_TAR"; echo "wrote $EXT_TAR ($size bytes)"
}

stage_collect() {
  collect_now
  cat "$WORK/logs/tables.md"
}

for STAGE in $STAGES; do
  if [ -f "$WORK/logs/stage_$STAGE.done" ]; then echo "stage $STAGE: done"; continue; fi
  echo "stage $STAGE: $(date -Is)"
  timed "$STAGE" "stage_$STAGE"
  [ "$STAGE" = collect ] || touch "$WORK/logs/stage_$STAGE.done"
done
